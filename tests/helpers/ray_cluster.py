"""A real local Ray cluster on loopback for the tests: `ray start --head --block` in its own session, with token
auth and its own temp dir and ports; stopped by signalling that session only (never `ray stop`, which would
stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from aletheia_ds.launchers.deepspeed import free_port
from helpers.ranks import NCCL_ENV, ROOT, read_jsonl, tiny_run_config

VENV_BIN = str(Path(sys.executable).parent)
# the venv's `ray`, else the one on PATH (tools/ray_gpu.sh makes one for a Ray unpacked onto PYTHONPATH)
RAY = os.path.join(VENV_BIN, "ray") if os.path.exists(os.path.join(VENV_BIN, "ray")) else shutil.which("ray") or "ray"
# what the workers need, passed the way a user passes it: the job's runtime_env
CPU_WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",
    "GLOO_SOCKET_IFNAME": "lo",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
GPU_WORKER_ENV = {**NCCL_ENV, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# ray_config's section for workers of one GPU each
GPU_WORKERS = {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}


@dataclass
class RayNode:
    """A worker node of a LocalRay (tests/helpers/ray_node.py in a session of its own)."""

    ip: str
    node_id: str
    proc: subprocess.Popen
    temp_dir: Path

    def kill(self) -> None:
        """The node lost at once, as a host that fails: SIGKILL to its raylet, agents and workers together."""
        _stop_session(self.proc, graceful=False)


@dataclass
class LocalRay:
    gcs_address: str
    dashboard_url: str
    env: dict
    temp_dir: Path
    head: subprocess.Popen
    worker_env: dict
    nodes: list[RayNode] = field(default_factory=list)

    def add_node(
        self,
        ip: str,
        num_cpus: int,
        resources: dict | None = None,
        timeout: float = 120.0,
        num_gpus: int = 0,
        visible_devices: str | None = None,
    ) -> RayNode:
        """One more node on this host at its own loopback address (127.0.0.2, ...), joined to the head. Its own temp
        dir, as on a host of its own: with the head's, the head's log monitor would also forward this node's
        worker logs, and the job's log would show every line of them twice. `visible_devices`: the host's GPUs this
        node has (its CUDA_VISIBLE_DEVICES, e.g. "1"), as local_ray's."""
        temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        log = temp_dir / "node.log"
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("ray_node.py")),
            "--address",
            self.gcs_address,
            "--node-ip",
            ip,
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            str(num_gpus),
            "--resources",
            json.dumps(resources or {}),
            "--temp-dir",
            str(temp_dir),
        ]
        with log.open("w") as handle:
            proc = subprocess.Popen(
                cmd,
                env=_node_env(self.env, visible_devices),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = RayNode(ip, "", proc, temp_dir)
        self.nodes.append(node)  # stopped with the cluster from here on
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = [line for line in log.read_text().splitlines() if line.startswith("node up: ")]
            if up:
                node.node_id = up[0].removeprefix("node up: ").strip()
                return node
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the Ray node at {ip} did not join:\n{log.read_text()[-3000:]}")

    def submit_cmd(self, args: list[str], script: str = "launch/ray_train.py", **job) -> list[str]:
        """`ray job submit --working-dir <repo> -- python SCRIPT ARGS` (it waits for the job); `job`:
        submission_id, env_vars (added to the workers' environment)."""
        env_vars = {**self.worker_env, **job.get("env_vars", {})}
        submission = ["--submission-id", job["submission_id"]] if job.get("submission_id") else []
        return [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            *submission,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--",
            sys.executable,  # the driver runs on this host's head: a GPU image may have no `python`, only python3
            script,
            *args,
        ]

    def submit(self, args: list[str], timeout: int, **job) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.submit_cmd(args, **job), cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self, args: list[str], log: Path, **job) -> subprocess.Popen:
        """The job submitted in the background; its output goes to `log`."""
        with log.open("w") as handle:
            return subprocess.Popen(
                self.submit_cmd(args, **job), cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, text=True
            )

    def stop(self, submission_id: str) -> None:
        """`ray job stop --no-wait`: SIGTERM to the job's driver (Ray SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S later)."""
        subprocess.run(
            [RAY, "job", "stop", "--no-wait", "--address", self.dashboard_url, submission_id],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )


def cluster_env(token: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    # the checkout and tests/ stay off the cluster's path (jobs import Ray's copy of the working directory); other
    # entries stay: on a host without Ray installed, Ray itself comes from PYTHONPATH (tools/ray_gpu.sh)
    own = {ROOT.resolve(), (ROOT / "tests").resolve()}
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() not in own]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    env.update(
        PATH=os.pathsep.join([VENV_BIN, env.get("PATH", "")]),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # otherwise Ray binds the machine's external address
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def _node_env(env: dict, visible_devices: str | None) -> dict:
    """A node started with CUDA_VISIBLE_DEVICES owns those GPUs of the host only: Ray counts its GPU slots in that
    list and hands a worker of slot i the host's GPU visible_devices[i] (Worker.original_visible_accelerator_ids),
    as a host of that many GPUs would."""
    return env if visible_devices is None else {**env, "CUDA_VISIBLE_DEVICES": visible_devices}


def _wait_for_dashboard(url: str, head: subprocess.Popen, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # answering, if only to say we need the token
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise RuntimeError(f"the Ray dashboard at {url} did not come up:\n{log.read_text()[-3000:]}")


def _stop_session(proc: subprocess.Popen, graceful: bool = True) -> None:
    """SIGTERM, then SIGKILL, to the session `ray start` leads: its raylet, GCS, agents and workers."""
    signals = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)) if graceful else ((signal.SIGKILL, 5.0),)
    for sig, grace in signals:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            proc.poll()
            time.sleep(0.5)


def _own_ports() -> list[str]:
    """Every port of a node's own, so that parallel test runs (and a second node) on this machine do not collide."""
    return [
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--object-store-memory",
        str(300 * 2**20),
    ]


@contextlib.contextmanager
def local_ray(
    num_cpus: int,
    num_gpus: int = 0,
    startup_timeout: float = 180.0,
    resources: dict[str, float] | None = None,
    visible_devices: str | None = None,
) -> Iterator[LocalRay]:
    """A head of `num_cpus` and `num_gpus`; `visible_devices`: the host's GPUs the head has (its
    CUDA_VISIBLE_DEVICES, e.g. "0"), else all of them."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = cluster_env(secrets.token_hex(16))
    if num_gpus:  # conftest's CPU defaults would reach the workers through the raylet: DeepSpeed's CPU accelerator
        env.pop("DS_ACCELERATOR", None)
        env.pop("GLOO_SOCKET_IFNAME", None)
    port, dashboard_port = free_port(), free_port()
    log = temp_dir / "head.log"
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-port",
        str(dashboard_port),
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        str(num_gpus),
        "--temp-dir",
        str(temp_dir),
        "--resources",
        json.dumps(resources or {}),
        "--ray-client-server-port",
        str(free_port()),
        *_own_ports(),
    ]
    with log.open("w") as handle:
        head = subprocess.Popen(
            cmd, env=_node_env(env, visible_devices), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    nodes: list[RayNode] = []  # LocalRay.add_node's, stopped before the head
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_dashboard(url, head, time.monotonic() + startup_timeout, log)
        worker_env = GPU_WORKER_ENV if num_gpus else CPU_WORKER_ENV
        yield LocalRay(f"127.0.0.1:{port}", url, env, temp_dir, head, worker_env, nodes)
    finally:
        for node in nodes:
            _stop_session(node.proc)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        _stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_config(model_dir: Path, tmp_path: Path, **ray_section) -> dict:
    """The tiny job of helpers.ranks.tiny_run_config for launch/ray_train.py: its run in tmp_path/storage/run."""
    config = tiny_run_config(model_dir, tmp_path / "unused")
    # relative paths: the driver resolves them in Ray's copy of the working directory
    config["model"]["tokenizer"] = "examples/tiny/tokenizer"
    config["data"].update(train="examples/tiny/train.jsonl", eval="examples/tiny/eval.jsonl")
    config["deepspeed"]["config"] = "ds_configs/zero3.json"
    config["ray"] = {"num_workers": 2, "storage_path": str(tmp_path / "storage"), "name": "run", **ray_section}
    return config


def write_config(config: dict, tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_notes(run: Path, world_size: int = 2) -> list[dict]:
    """workers/rank-N.json of every rank (aletheia_ds.launchers.ray.RayObserver)."""
    return [json.loads((run / "workers" / f"rank-{rank:05d}.json").read_text()) for rank in range(world_size)]


def kill_past_checkpoint(
    job: subprocess.Popen, run: Path, job_log: Path, kill: Callable[[list[dict]], object], timeout: float = 400.0
) -> dict:
    """`kill(notes)` once Ray Train has registered a checkpoint and a later step is logged; returns the workers'
    notes, the metrics rows and the newest checkpoint's step as they were just before the kill."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended before the kill:\n{job_log.read_text()[-4000:]}"
        latest = run / "checkpoints" / "latest"
        # Ray writes its snapshot when it registers a checkpoint: from then on a restart resumes
        if (run / "checkpoint_manager_snapshot.json").is_file() and latest.is_file():
            try:
                rows = read_jsonl(run / "metrics.jsonl")
            except json.JSONDecodeError:  # caught mid-line
                rows = []
            notes = read_notes(run)
            # read last, just before the kill: no later checkpoint can be the one the run resumes from
            step = int(latest.read_text().strip().removeprefix("step-"))
            if rows and rows[-1]["step"] > step:
                kill(notes)
                return {"notes": notes, "rows": rows, "checkpoint_step": step}
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint within {timeout} s:\n{job_log.read_text()[-4000:]}")


def wait_for_restart(job: subprocess.Popen, run: Path, job_log: Path, timeout: float = 400.0) -> list[dict]:
    """Wait until every worker of the group Ray restarted after a failure has written its note (resumed from a
    checkpoint); returns the notes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended before its restart:\n{job_log.read_text()[-4000:]}"
        notes = read_notes(run)  # each written atomically: the first group's until replaced
        if all(n["resumed"] for n in notes):
            return notes
        time.sleep(0.2)
    raise AssertionError(f"no restarted worker group within {timeout} s:\n{job_log.read_text()[-4000:]}")
