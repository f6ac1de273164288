"""PYTHONPATH=/tmp/site python3 tools/ray_smoke.py [--gpus N]

Is this interpreter ready for `ray job submit ... launch/ray_train.py`? In order, stopping at the first failure:
  1. names each requirement of Ray (core, [default], [train]) and of the packages that came with it that is
     missing or at a version their metadata excludes: a note, not a failure (Ray Train and `ray job` run
     without py-spy, tensorboardX, virtualenv or google-api-core), so that a failure further on can be read against it;
  2. ray.train.torch and the --require'd modules (deepspeed, pydantic) import; prints where each came from;
  3. a head starts on loopback (token auth, its own temp dir and ports, `--block` in a session of its own);
     `ray job submit --working-dir` runs a driver there; a Ray Train job of one worker (gloo; with --gpus, one
     worker per GPU over NCCL) all-reduces a tensor; the head stops. Only that head's processes are signalled:
     never `ray stop`, which stops every Ray on the host.
Used by tools/ray_bundle.sh --check (on the machine that packs the bundle) and tools/ray_gpu.sh setup (on the
GPU host).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unmet_requirements(extras=("default", "train")) -> list[str]:
    """Requirements that are missing or at a version their metadata excludes: Ray's (core and `extras`), and
    those of every package that came with it (the bundle's folder), e.g. opentelemetry-proto's protobuf range."""
    from packaging.requirements import Requirement

    folder = os.path.dirname(os.path.dirname(importlib.util.find_spec("ray").origin))
    owners = [("ray", extras), *((d.metadata["Name"], ()) for d in metadata.distributions(path=[folder]))]
    unmet = []
    for owner, owner_extras in owners:
        for line in metadata.requires(owner) or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": extra}) for extra in ("", *owner_extras)):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{req.name} (missing; {owner} needs {req.specifier or 'any version'})")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{req.name} {have} ({owner} needs {req.specifier})")
    return sorted(set(unmet))


def train_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    total = torch.ones(1, device=device) * (context.get_world_rank() + 1)
    dist.all_reduce(total)
    world = context.get_world_size()
    # a wrong sum fails the worker, and with it trainer.fit()
    assert total.item() == world * (world + 1) / 2, f"all-reduce over {world} workers gave {total.item()}"
    ray.train.report({"sum": total.item(), "device": str(device)})


def run_job(address: str, gpus: int) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.init(address=address)
    workers = gpus or 1
    storage = tempfile.mkdtemp(prefix="ray-smoke-")
    trainer = TorchTrainer(
        train_loop,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus)),
        run_config=ray.train.RunConfig(storage_path=storage, name="smoke"),
    )
    try:
        trainer.fit()
    finally:
        ray.shutdown()  # before the head goes
        shutil.rmtree(storage, ignore_errors=True)


def submit_job(ray_cli: list[str], dashboard: int, temp: str) -> None:
    """`ray job submit --working-dir`: the upload, the dashboard's job server and a driver on the head."""
    work = os.path.join(temp, "job")
    os.makedirs(work)
    with open(os.path.join(work, "job.py"), "w") as handle:
        handle.write("import ray\nray.init()\nprint('job sees', ray.cluster_resources()['CPU'], 'CPUs')\n")
    cmd = [*ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", work]
    proc = subprocess.run([*cmd, "--", sys.executable, "job.py"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or "job sees" not in proc.stdout:
        raise SystemExit(
            f"error: ray job submit failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    print("ray job submit ok:", next(line for line in proc.stdout.splitlines() if "job sees" in line))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=0, help="Ray Train workers on this many GPUs (NCCL)")
    parser.add_argument("--require", nargs="*", default=["deepspeed", "pydantic"], help="modules that must import")
    args = parser.parse_args()

    # set before Ray is imported, which reads them once: without the first, ray.init swaps 127.0.0.1 for the
    # host's external address, where a head kept on loopback does not listen
    os.environ.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
    )
    unmet = unmet_requirements()
    if unmet:
        print(
            f"note: requirements not met here (Ray {metadata.version('ray')} and what came with it): {'; '.join(unmet)}"
        )
    import ray
    import ray.train.torch  # noqa: F401

    for module in [ray, *map(importlib.import_module, args.require)]:
        print(f"{module.__name__} {getattr(module, '__version__', '?')}: {os.path.dirname(module.__file__)}")

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = free_port(), free_port()
    ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]
    cmd = [*ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", temp]
    cmd += ["--num-cpus", str(max(2, args.gpus)), "--num-gpus", str(args.gpus), "--disable-usage-stats"]
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    try:
        address = f"127.0.0.1:{port}"
        while True:
            if head.poll() is not None:
                raise SystemExit(f"error: ray start exited with {head.returncode}:\n{tail(log.name)}")
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
                break
            except OSError:
                if time.monotonic() - started > 180:
                    raise SystemExit(f"error: the head did not come up in 180 s:\n{tail(log.name)}") from None
                time.sleep(1)
        print(f"head up on {address} in {time.monotonic() - started:.0f} s")
        submit_job(ray_cli, dashboard, temp)
        run_job(address, args.gpus)
        print(f"ray train job ok: {max(args.gpus, 1)} worker(s) all-reduced over {'NCCL' if args.gpus else 'gloo'}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        shutil.rmtree(temp, ignore_errors=True)
    print("ray smoke ok")
    return 0


def tail(path: str, lines: int = 40) -> str:
    with open(path, errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
