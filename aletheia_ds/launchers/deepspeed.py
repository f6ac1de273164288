"""The one builder of `deepspeed` launcher commands and of the environment their ranks run in.

    deepspeed_command("launch/train.py", ["--config", "run.yaml"], num_gpus=2)
    -> [python, -m, deepspeed.launcher.runner, --num_gpus, 2, --master_addr, 127.0.0.1, --master_port, P, ...]

    deepspeed_command(..., hostfile="hosts", num_nodes=2, node_rank=1, master_addr="node-1", master_port=P)
    -> [deepspeed, --hostfile, hosts, --num_nodes, 2, --no_ssh, --node_rank, 1, ...]   (one such launcher per node)

Used by `aletheia-ds train --num-gpus N` (and --hostfile, --node-rank, --slurm), the benchmarks under tools/ and
the distributed tests. Pure but for `SlurmLaunch.write_hostfile`: builds lists, dicts and text, starts nothing.
See docs/MULTINODE.md for what a multi-node run needs per node and what it needs shared.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..config import ConfigError

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


def deepspeed_command(
    script: str,
    script_args: Sequence[str],
    *,
    num_gpus: Optional[int] = None,
    include: Optional[str] = None,
    hostfile: Optional[str] = None,
    num_nodes: Optional[int] = None,
    node_rank: Optional[int] = None,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
    module: bool = False,
    interpreter_runner: bool = False,
) -> list[str]:
    """`deepspeed [--hostfile F] [--num_nodes M] [--num_gpus N | --include host:ids] [--no_ssh --node_rank R]
    [--master_addr A --master_port P] script args`.

    `node_rank`: this launcher starts only the ranks of node R of the hostfile; a launcher on every other node
    starts theirs (srun, a scheduler, one shell per node). `module`: `script` is a module name (`--module
    aletheia_ds.train`). `interpreter_runner`: run the launcher with this interpreter even when a `deepspeed`
    script is on PATH (tests and tools pin the venv's python).
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"] if interpreter_runner else runner()
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_nodes:
        cmd += ["--num_nodes", str(num_nodes)]
    if include:
        cmd += ["--include", include]
    elif num_gpus:
        cmd += ["--num_gpus", str(num_gpus)]
    if node_rank is not None:
        # without --no_ssh the runner would ssh (pdsh) into every host of the hostfile and start all nodes itself
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return cmd + (["--module", script] if module else [script]) + list(script_args)


def local_command(script: str, script_args: Sequence[str], num_gpus: int) -> list[str]:
    """`num_gpus` ranks on this machine over loopback on a fresh port (tools and tests)."""
    return deepspeed_command(
        script,
        script_args,
        num_gpus=num_gpus,
        master_addr="127.0.0.1",
        master_port=free_port(),
        interpreter_runner=True,
    )


def hostfile_text(hosts: Sequence[str], ranks_per_node: int) -> str:
    """A DeepSpeed hostfile: `host slots=N` per node, in node-rank order."""
    return "".join(f"{host} slots={ranks_per_node}\n" for host in hosts)


def node_commands(
    script: str,
    script_args: Sequence[str],
    hostfile: str,
    num_nodes: int,
    ranks_per_node: int,
    master_addr: str,
    master_port: int,
) -> list[list[str]]:
    """One launcher command per node of `hostfile`, each starting only its node's ranks (no ssh): what srun runs
    on each node of a SLURM job, and what the tests run side by side on one host to simulate nodes."""
    return [
        deepspeed_command(
            script,
            script_args,
            hostfile=hostfile,
            num_nodes=num_nodes,
            num_gpus=ranks_per_node,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            interpreter_runner=True,
        )
        for node_rank in range(num_nodes)
    ]


# ------------------------------------------------------------------------------------------------ SLURM
def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in order, as `scontrol show hostnames` prints it: `gpu[01-02,07],login1` ->
    gpu01 gpu02 gpu07 login1 (a range keeps its zero padding)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                for host in expand_nodelist(f"{prefix}{number:0{len(first)}d}{suffix}"):
                    hosts.append(host)
    return hosts


@dataclass
class SlurmLaunch:
    """What one node of a SLURM allocation runs: the DeepSpeed launcher for its own ranks."""

    job_id: str
    hosts: list[str]
    node_rank: int
    ranks_per_node: int
    master_addr: str
    master_port: int
    hostfile: Path
    command: list[str]

    def write_hostfile(self) -> None:
        # each node writes its own copy (the same text) beside the job's other node-local files
        self.hostfile.write_text(hostfile_text(self.hosts, self.ranks_per_node))

    def describe(self) -> str:
        """The launch in words and the hostfile, as `#` lines a shell would skip."""
        lines = [
            f"# SLURM job {self.job_id}: node {self.node_rank} of {len(self.hosts)} ({' '.join(self.hosts)}), "
            f"{self.ranks_per_node} ranks per node, master {self.master_addr}:{self.master_port}",
            f"# hostfile {self.hostfile} (written on each node):",
        ]
        hostfile = hostfile_text(self.hosts, self.ranks_per_node).splitlines()
        return "\n".join(lines + [f"#   {line}" for line in hostfile])


def slurm_port(job_id: str) -> int:
    """A master port of the job's own, so that two jobs whose first node is the same host do not collide."""
    return 20000 + int(job_id) % 10000 if job_id.isdigit() else 29500


def _slurm_int(env: Mapping[str, str], key: str) -> int:
    value = env.get(key, "")
    if not value.isdigit():
        raise ConfigError(
            f"--slurm: {key} is {value!r}, not a number; run inside an allocation (sbatch/srun, one task per node)"
        )
    return int(value)


def slurm_launch(
    env: Mapping[str, str],
    script: str,
    script_args: Sequence[str],
    *,
    module: bool = False,
    ranks_per_node: Optional[int] = None,
    master_port: Optional[int] = None,
) -> SlurmLaunch:
    """The launch of this node of a SLURM job (one task per node), from SLURM_JOB_NODELIST, SLURM_NNODES,
    SLURM_NODEID, SLURM_JOB_ID and SLURM_GPUS_ON_NODE: master = the first host of the node list."""
    if not env.get("SLURM_JOB_NODELIST"):
        raise ConfigError(
            "--slurm: SLURM_JOB_NODELIST is unset; run inside an allocation (sbatch/srun, one task per node)"
        )
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    num_nodes, node_rank = _slurm_int(env, "SLURM_NNODES"), _slurm_int(env, "SLURM_NODEID")
    if num_nodes != len(hosts) or node_rank >= num_nodes:
        raise ConfigError(
            f"--slurm: SLURM_NNODES={num_nodes} and SLURM_NODEID={node_rank} do not fit "
            f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r} ({len(hosts)} hosts)"
        )
    if ranks_per_node is None:
        if not env.get("SLURM_GPUS_ON_NODE", "").isdigit():
            raise ConfigError(
                "--num-gpus: give the ranks per node (SLURM_GPUS_ON_NODE is unset: the job asked for "
                "no --gpus-per-node)"
            )
        ranks_per_node = int(env["SLURM_GPUS_ON_NODE"])
    job_id = env.get("SLURM_JOB_ID", "0")
    port = master_port or slurm_port(job_id)
    hostfile = Path(env.get("TMPDIR") or "/tmp") / f"aletheia_ds-hosts-{job_id}"
    command = deepspeed_command(
        script,
        script_args,
        hostfile=str(hostfile),
        num_nodes=num_nodes,
        num_gpus=ranks_per_node,
        node_rank=node_rank,
        master_addr=hosts[0],
        master_port=port,
        module=module,
    )
    return SlurmLaunch(job_id, hosts, node_rank, ranks_per_node, hosts[0], port, hostfile, command)


def rank_env(cpu: bool, **extra: str) -> dict[str, str]:
    """The environment launched ranks need: this checkout importable, no hub access, unbuffered output; on CPU
    also DeepSpeed's CPU accelerator, gloo on loopback, one OpenMP thread per rank and no visible GPU (on a GPU
    host the ranks would otherwise take CUDA and NCCL and fail against the CPU accelerator)."""
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if cpu:
        env.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("DS_ACCELERATOR", None)
        env.pop("GLOO_SOCKET_IFNAME", None)
    env.update(extra)
    return env
