"""Ray Train around aletheia_ds.train.main: the driver of launch/ray_train.py and the loop of each worker.

    driver:  config -> absolute paths, run directory = ray.storage_path/ray.name -> connect -> does the
             cluster fit the workers? -> TorchTrainer(ScalingConfig, RunConfig, FailureConfig).fit()
    worker:  aletheia_ds.train.main(cfg, RayObserver) inside the process group Ray Train created: the same
             probe -> plan -> train -> export as `deepspeed launch/train.py`, DeepSpeed inside the worker

The driver never builds the model: each worker builds its partition of it under zero.Init (ZeRO-3).
Only launch/ray_train.py (and its tests) import this module: the package itself does not need Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

from ..config import ConfigError, RunConfig, Stopped, TrainingError, exit_code, load_config
from ..io import write_json_atomic

if TYPE_CHECKING:
    from ..train import StopSignal

# config keys holding local paths: the driver makes them absolute, the workers run in other directories
PATH_KEYS = (
    ("model", "path"),
    ("model", "tokenizer"),
    ("data", "train"),
    ("data", "eval"),
    ("data", "chat_template"),
    ("probe", "report"),
    ("plan", "plan"),
    ("plan", "cost"),
    ("deepspeed", "config"),
)
WORKERS_DIR = "workers"
CONNECT_TIMEOUT_S = 5.0


# ------------------------------------------------------------------------------------------------ driver
def for_ray(cfg: RunConfig, cwd: Path) -> RunConfig:
    """Relative paths resolved against the driver's directory; train.output_dir = storage_path/name."""
    tree = cfg.model_dump()

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else cwd / path)

    for section, key in PATH_KEYS:
        value = tree[section][key]
        if isinstance(value, list):  # data.train as a list of {path, weight} sources
            tree[section][key] = [{**source, "path": absolute(source["path"])} for source in value]
        elif value:
            tree[section][key] = absolute(value)
    storage = Path(cfg.ray.storage_path or "~/ray_results").expanduser()
    if not storage.is_absolute():
        if "_ray_pkg_" in str(cwd):
            # `ray job submit --working-dir` runs the driver in an unpacked copy that Ray deletes later
            raise ConfigError(
                f"ray.storage_path: {cfg.ray.storage_path!r} is relative and this job runs in Ray's "
                f"temporary copy of the working directory ({cwd}); give an absolute path on storage "
                "every node sees"
            )
        storage = cwd / storage
    name = cfg.ray.name or Path(cfg.train.output_dir).name or "aletheia_ds"
    tree["ray"].update(storage_path=str(storage), name=name)
    tree["train"]["output_dir"] = str(storage / name)
    return RunConfig.model_validate(tree)


def _host_port(address: str) -> Optional[tuple[str, int]]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:
        return None
    return (parsed.hostname, port) if parsed.hostname and port else None


def connect(address: Optional[str]) -> str:
    """ray.init on the cluster; a ConfigError naming the address when it cannot be reached."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS")
    hint = "start one with `ray start --head`, or fix ray.address / RAY_ADDRESS"
    host_port = _host_port(target) if target and target not in ("auto", "local") else None
    if host_port:
        # ray.init retries an unreachable GCS for about a minute; a TCP connect answers in seconds
        try:
            socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise ConfigError(
                f"ray.address: cannot reach a Ray cluster at {target} ({err.strerror or type(err).__name__}); {hint}"
            ) from None
    try:
        ray.init(address=address, log_to_driver=True)
    except Exception as err:  # ray.init raises ConnectionError, RuntimeError or ValueError, by cause
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ConfigError(
            f"ray.address: cannot connect to the Ray cluster at {target or 'auto'} ({first}); {hint}"
        ) from None
    return target or ray.get_runtime_context().gcs_address


def worker_resources(scaling) -> dict[str, float]:
    """What Ray Train will ask for each worker (its own defaults included)."""
    need = {
        "CPU": scaling.num_cpus_per_worker,
        "GPU": scaling.num_gpus_per_worker,
        **scaling.additional_resources_per_worker,
    }
    return {k: float(v) for k, v in need.items() if v}


def missing_resources(
    need: dict[str, float], workers: int, nodes: list[dict[str, float]], one_per_node: bool = False
) -> Optional[str]:
    """None when `workers` bundles of `need` fit on `nodes` (a worker's bundle lies on one node; with
    `one_per_node`, as STRICT_SPREAD places them, no two on the same node), else what is missing, in words."""
    fits = [min(math.floor(node.get(k, 0.0) / amount + 1e-9) for k, amount in need.items()) for node in nodes]
    if one_per_node:
        fits = [min(fit, 1) for fit in fits]
    if sum(fits) >= workers:
        return None
    short = []
    for key, amount in need.items():
        have = sum(node.get(key, 0.0) for node in nodes)
        if workers * amount > have + 1e-9:
            short.append(
                f"{key}: {workers} workers x {amount:g} = {workers * amount:g} needed, the cluster has {have:g}"
            )
    if short:
        return "; ".join(short)
    if one_per_node:
        return (
            f"STRICT_SPREAD puts each worker on a node of its own and only {sum(fits)} of the "
            f"{len(nodes)} nodes can hold one of {need}"
        )
    offer = ", ".join("{" + ", ".join(f"{k}: {node.get(k, 0.0):g}" for k in need) + "}" for node in nodes)
    return (
        f"only {sum(fits)} of {workers} workers fit: each needs {need} on one node, the nodes offer "
        f"{offer or 'nothing'}"
    )


def check_cluster_fits(cfg: RunConfig, scaling, address: str) -> None:
    import ray

    need = worker_resources(scaling)
    nodes = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node.get("Alive")]
    missing = missing_resources(need, cfg.ray.num_workers, nodes, cfg.ray.placement_strategy == "STRICT_SPREAD")
    if missing:
        raise ConfigError(
            f"ray: the cluster at {address} cannot run ray.num_workers={cfg.ray.num_workers} workers "
            f"of {need}: {missing}; lower ray.num_workers or ray.resources_per_worker, or add nodes "
            "(ray.check_resources=false waits for an autoscaler instead)"
        )
    free = ray.available_resources()
    busy = [k for k, amount in need.items() if free.get(k, 0.0) + 1e-9 < cfg.ray.num_workers * amount]
    if busy:
        print(f"ray: {', '.join(busy)} in use by other work; the job starts when enough is free", flush=True)


class StopRelay:
    """The job's stop channel (a Ray actor the driver owns). Python takes signals in the main thread only, and Ray
    Train runs each worker's loop in a thread of its own, so a stop asked of the driver (`ray job stop`, a
    scheduler's SIGTERM) reaches the workers through `request`/`wait`; the stopped workers leave their last line
    and exit status here for the driver."""

    def __init__(self):
        import asyncio

        self.requested = asyncio.Event()
        self.outcome: Optional[tuple[str, int]] = None

    async def request(self) -> None:
        self.requested.set()

    async def wait(self) -> None:
        """Returns once a stop is requested (each worker keeps one call waiting)."""
        await self.requested.wait()

    async def stopped(self, message: str, status: int) -> None:
        self.outcome = (message, status)

    async def result(self) -> Optional[tuple[str, int]]:
        return self.outcome


def relay_sigterm(relay) -> None:
    """The driver's SIGTERM (what `ray job stop` and schedulers send) asks the workers to stop after their step
    with a checkpoint, instead of ending the driver, which would take the workers down with it."""

    def on_sigterm(signum, frame) -> None:
        print("ray: SIGTERM: every worker stops after its current step and writes a checkpoint", flush=True)
        relay.request.remote()

    signal.signal(signal.SIGTERM, on_sigterm)


def stop_wait_note(cfg: RunConfig) -> Optional[str]:
    """`ray job stop` SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM (the job supervisor reads it
    from the job's runtime_env, as the driver does): a line when that leaves no time for the checkpoint."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # not a `ray job submit` job: no job supervisor
        return None
    try:
        wait_s = float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))  # Ray's default
    except ValueError:
        return None
    if wait_s >= cfg.train.stop_grace_s:
        return None
    return (
        f"ray: `ray job stop` kills this job {wait_s:g} s after its SIGTERM (RAY_JOB_STOP_WAIT_TIME_S), too soon "
        f'for a checkpoint; submit with --runtime-env-json \'{{"env_vars": {{"RAY_JOB_STOP_WAIT_TIME_S": '
        f'"{cfg.train.stop_grace_s:g}"}}}}\' to stop within train.stop_grace_s'
    )


def fit(cfg: RunConfig) -> Any:
    """Run the job on the cluster; returns Ray Train's Result. A job told to stop (SIGTERM to the driver or to a
    worker) ends with its checkpoint and raises Stopped (exit 75)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.constants import is_v2_enabled
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not is_v2_enabled():
        raise ConfigError("RAY_TRAIN_V2_ENABLED=0: launch/ray_train.py uses Ray Train's current API; unset it")
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.ray.num_workers,
        use_gpu=cfg.ray.use_gpu,
        resources_per_worker=cfg.ray.resources_per_worker,
        placement_strategy=cfg.ray.placement_strategy,
    )
    # Ray Train lists the run's checkpoints (<run>/checkpoints/step-N, written in place) and deletes the ones
    # beyond train.keep_last; a restarted worker group resumes from the newest
    run_config = ray.train.RunConfig(
        storage_path=cfg.ray.storage_path,
        name=cfg.ray.name,
        failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last),
    )
    address = connect(cfg.ray.address)
    if cfg.ray.check_resources:
        check_cluster_fits(cfg, scaling, address)
    print(
        f"ray: {cfg.ray.num_workers} workers of {worker_resources(scaling)} on {address}; run directory "
        f"{cfg.train.output_dir}",
        flush=True,
    )
    if (Path(cfg.train.output_dir) / "checkpoint_manager_snapshot.json").is_file():
        print(
            f"ray: {cfg.train.output_dir} holds checkpoints of an earlier job named {cfg.ray.name!r}: this job "
            "continues from the newest (another ray.name starts afresh)",
            flush=True,
        )
    note = stop_wait_note(cfg)
    if note:
        print(note, flush=True)
    # Ray Train would send each line a worker prints to its log and to stdout; the job's log shows it twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # passed on to the workers by Ray Train
    # the relay lives on the driver's node: placed anywhere, it could sit on a worker node that is lost mid-run,
    # taking the stop channel (and the driver's final read of it) with it
    relay = (
        ray.remote(num_cpus=0)(StopRelay)
        .options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        )
        .remote()
    )
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "stop_relay": relay},
        scaling_config=scaling,
        run_config=run_config,
    )
    previous = signal.getsignal(signal.SIGTERM)
    relay_sigterm(relay)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        failures = getattr(err, "worker_failures", None) or {}
        for failure in failures.values():
            # every rank meets the same bad input, or the same all-reduced non-finite loss: one line is enough
            if isinstance(failure, (ConfigError, TrainingError)):
                raise failure from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopped = ray.get(relay.result.remote())
    if stopped:
        raise Stopped(*stopped)
    return result


def cli(argv: Optional[list[str]] = None) -> int:
    """Entry for launch/ray_train.py, with launch/train.py's exit codes: 0 when the run finished, 2 with one
    line for bad input or an unreachable or too small cluster, 3 for a training error (non-finite loss), 75 for a
    job stopped by SIGTERM (to the driver, as `ray job stop` sends it, or to a worker) after its checkpoint, 1 for
    any other failure of the workers (Ray has printed their tracebacks)."""
    try:
        cfg = for_ray(load_config(sys.argv[1:] if argv is None else argv), Path.cwd())
        cfg.require_paths()  # here, before any worker starts: the same files must be there on every node
        result = fit(cfg)
    except (ConfigError, TrainingError) as err:
        return exit_code(err)
    except Exception as err:  # ray.train.TrainingFailedError and friends, after Ray's own report
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(f"error: training failed on the Ray workers: {first}", file=sys.stderr, flush=True)
        return 1
    out = Path(cfg.train.output_dir)
    results = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    # ru_maxrss is in KiB on Linux: the driver's own peak, which stays small since it never builds the model
    driver_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"ray: done in {result.path}: probe.json, plan.json, metrics.jsonl, eval.json, adapter/; held-out loss "
        f"{results.get('eval_loss_before', float('nan')):.4f} -> {results.get('eval_loss_after', float('nan')):.4f}; "
        f"driver peak RSS {driver_rss_gib:.2f} GiB",
        flush=True,
    )
    return 0


# ------------------------------------------------------------------------------------------------ worker
def digest(blob: Any) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class RayObserver:
    """aletheia_ds.train.RunObserver for Ray Train: progress and metrics through ray.train.report, checkpoints as
    ray.train.Checkpoint, and a note per worker in <run>/workers/ (node, process, the plan it trains, how much
    of the base model it holds)."""

    keeps_checkpoints = True  # CheckpointConfig(num_to_keep=train.keep_last) deletes the old ones

    def __init__(self, out: Path, stop_relay: Any = None):
        self.out = out
        self.note: dict[str, Any] = {}
        self.stop_relay = stop_relay
        self.done = threading.Event()  # training ended: the thread waiting on the relay returns

    def started(self, ctx, model) -> None:
        import ray

        from ..dist import held_parameter_elements, peak_host_rss_gib

        held, total = held_parameter_elements(model)
        train_ctx = ray.train.get_context()
        self.note = {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "local_rank": train_ctx.get_local_rank(),
            "node_rank": train_ctx.get_node_rank(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(ctx.device),
            # which of its node's GPUs Ray gave this worker (the host's numbering), whatever the device index says
            "gpu_ids": ray.get_runtime_context().get_accelerator_ids().get("GPU", []),
            "zero_stage": ctx.zero_stage,
            # right after the build, before any DeepSpeed engine: what zero.Init left on this rank
            "base_parameter_elements": {"held": held, "total": total},
            "peak_host_rss_gib_after_build": peak_host_rss_gib(),
        }

    def planned(self, report, plan) -> None:
        import ray.train

        from ..adapters.peft_config import plan_json

        # a resumed run (report None) trains the checkpoint's plan: no probe this time
        self.note.update(
            plan_sha256=digest(plan_json(plan)),
            plan_layers=plan.layers,
            resumed=report is None,
            probe_sha256=digest(report.to_json()) if report is not None else None,
        )
        write_json_atomic(self.out / WORKERS_DIR / f"rank-{self.note['rank']:05d}.json", self.note)
        probe = {"probe_tokens": report.tokens, "probe_seconds": report.seconds} if report is not None else {}
        ray.train.report(
            {
                "stage": "planned",
                "layers": plan.layers,
                "adapters": len(plan.modules),
                "score_captured": plan.score_captured,
                "resumed": report is None,
                **probe,
            }
        )

    def step(self, row: dict, checkpoint: Optional[Path] = None) -> None:
        import ray.train

        metrics = {"stage": "train", **row}
        if checkpoint is not None and self.note["rank"] == 0:
            # already complete in the run's storage (every rank wrote its part): listed, not copied
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint(str(checkpoint)),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
        else:
            ray.train.report(metrics)

    def finished(self, results: dict) -> None:
        import ray.train

        self.done.set()
        ray.train.report({"stage": "done", **results})

    def watch_stop(self, stop_signal: "StopSignal") -> None:
        """SIGTERM to this worker process, or a stop relayed from the driver, sets `stop_signal`: every rank then
        ends its step and the ranks write a checkpoint together (Run.stop_if_asked)."""
        import ray

        global _WORKER_STOP
        _WORKER_STOP = stop_signal
        # Ray's own handler in the worker's main thread would end the process (a worker failure, which Ray Train
        # retries from an older checkpoint); that thread is the actor's, and only it may install another:
        # __ray_call__ runs a function there as an actor method (Ray's compiled graphs use it the same way)
        ray.get(ray.get_runtime_context().current_actor.__ray_call__.remote(_take_sigterm))
        if self.stop_relay is not None:
            threading.Thread(target=self._wait_for_stop, args=(stop_signal,), daemon=True, name="stop-relay").start()

    def _wait_for_stop(self, stop_signal: "StopSignal") -> None:
        import ray

        asked = self.stop_relay.wait.remote()
        while not self.done.is_set():
            ready, _ = ray.wait([asked], timeout=1.0)
            if ready:
                ray.get(asked)  # raises instead when the driver (the relay's owner) is gone
                stop_signal.request()
                return

    def stopped(self, stop: Stopped) -> None:
        """Every rank stopped after the same step with a checkpoint; rank 0 leaves the line for the driver."""
        import ray

        self.done.set()
        if self.note.get("rank") == 0 and self.stop_relay is not None:
            ray.get(self.stop_relay.stopped.remote(str(stop), stop.status))


_WORKER_STOP: Optional["StopSignal"] = None  # the stop flag of the job this worker process trains


def _take_sigterm(actor: Any) -> None:
    """Run in the worker actor's main thread: SIGTERM only raises the job's stop flag."""

    def on_sigterm(signum, frame) -> None:
        if _WORKER_STOP is not None:
            _WORKER_STOP.request()

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_loop(config: dict) -> None:
    """One Ray Train worker: the same job as one rank of `deepspeed launch/train.py`."""
    import ray.train

    from ..train import main

    cfg = RunConfig.model_validate(config["config"])
    checkpoint = ray.train.get_checkpoint()  # after a failure: the newest checkpoint this run reported
    if checkpoint is not None:
        cfg.train.resume = checkpoint.path
    if cfg.ray.use_gpu:
        # Ray shares CUDA_VISIBLE_DEVICES among a node's workers; its device index for this worker is what
        # LOCAL_RANK must say, since aletheia_ds.dist and DeepSpeed pick the GPU by LOCAL_RANK
        import ray.train.torch

        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index)
    observer = RayObserver(Path(cfg.train.output_dir), config.get("stop_relay"))
    try:
        main(cfg, observer)
    except Stopped as stop:
        # returned, not raised: Ray Train would retry a failed worker group, and this job was told to stop
        observer.stopped(stop)
