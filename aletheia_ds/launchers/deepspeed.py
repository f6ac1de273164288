"""The one builder of `deepspeed` launcher commands and of the environment their ranks run in.

    deepspeed_command("launch/train.py", ["--config", "run.yaml"], num_gpus=2)
    -> [python, -m, deepspeed.launcher.runner, --num_gpus, 2, --master_addr, 127.0.0.1, --master_port, P, ...]

Used by `aletheia-ds train --num-gpus N`, the benchmarks under tools/ and the distributed tests. Pure: builds
lists and dicts, starts nothing.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on loopback right now (for MASTER_PORT and test clusters)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runner() -> list[str]:
    """The `deepspeed` console script when it is on PATH, else the same runner through this interpreter."""
    found = shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def deepspeed_command(script: str, script_args: Sequence[str], *, num_gpus: Optional[int] = None,
                      include: Optional[str] = None, hostfile: Optional[str] = None,
                      master_addr: Optional[str] = None, master_port: Optional[int] = None,
                      module: bool = False, interpreter_runner: bool = False) -> list[str]:
    """`deepspeed [--hostfile F] [--num_gpus N | --include host:ids] [--master_addr A --master_port P] script args`.

    `module`: `script` is a module name (`--module aletheia_ds.train`). `interpreter_runner`: run the launcher
    with this interpreter even when a `deepspeed` script is on PATH (tests and tools pin the venv's python).
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"] if interpreter_runner else runner()
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if include:
        cmd += ["--include", include]
    elif num_gpus:
        cmd += ["--num_gpus", str(num_gpus)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + (["--module", script] if module else [script]) + list(script_args)


def local_command(script: str, script_args: Sequence[str], num_gpus: int) -> list[str]:
    """`num_gpus` ranks on this machine over loopback on a fresh port (tools and tests)."""
    return deepspeed_command(script, script_args, num_gpus=num_gpus, master_addr="127.0.0.1",
                             master_port=free_port(), interpreter_runner=True)


def rank_env(cpu: bool, **extra: str) -> dict[str, str]:
    """The environment launched ranks need: this checkout importable, no hub access, unbuffered output; on CPU
    also DeepSpeed's CPU accelerator, gloo on loopback and one OpenMP thread per rank."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if cpu:
        env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    else:
        env.pop("DS_ACCELERATOR", None)
        env.pop("GLOO_SOCKET_IFNAME", None)
    env.update(extra)
    return env
