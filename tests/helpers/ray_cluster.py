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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from aletheia_ds.launchers.deepspeed import free_port
from helpers.ranks import ROOT

VENV_BIN = str(Path(sys.executable).parent)
# what the workers need, passed the way a user passes it: the job's runtime_env
CPU_WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",
    "GLOO_SOCKET_IFNAME": "lo",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
# NVLink multicast stays off on shared GPU hosts (one program using it can take the host's GPUs out of service)
GPU_WORKER_ENV = {
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


@dataclass
class LocalRay:
    gcs_address: str
    dashboard_url: str
    env: dict
    temp_dir: Path
    head: subprocess.Popen
    worker_env: dict

    def submit_cmd(self, args: list[str], script: str = "launch/ray_train.py", **job) -> list[str]:
        """`ray job submit --working-dir <repo> -- python SCRIPT ARGS` (it waits for the job); `job`:
        submission_id, env_vars (added to the workers' environment)."""
        env_vars = {**self.worker_env, **job.get("env_vars", {})}
        submission = ["--submission-id", job["submission_id"]] if job.get("submission_id") else []
        return [
            os.path.join(VENV_BIN, "ray"),
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
            "python",
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
            [os.path.join(VENV_BIN, "ray"), "job", "stop", "--no-wait", "--address", self.dashboard_url, submission_id],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,
        )


def cluster_env(token: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
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


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the session `ray start` leads: its raylet, GCS, agents and workers."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
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
    num_cpus: int, num_gpus: int = 0, startup_timeout: float = 180.0, resources: dict[str, float] | None = None
) -> Iterator[LocalRay]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = cluster_env(secrets.token_hex(16))
    port, dashboard_port = free_port(), free_port()
    log = temp_dir / "head.log"
    cmd = [
        os.path.join(VENV_BIN, "ray"),
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
        head = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_dashboard(url, head, time.monotonic() + startup_timeout, log)
        worker_env = GPU_WORKER_ENV if num_gpus else CPU_WORKER_ENV
        yield LocalRay(f"127.0.0.1:{port}", url, env, temp_dir, head, worker_env)
    finally:
        _stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
