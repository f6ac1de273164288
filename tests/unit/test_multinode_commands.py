"""Multi-node launch commands without starting anything: one launcher per node (--node-rank, no ssh), and
`aletheia-ds train --slurm --dry-run` in a fake SLURM allocation. (Two simulated nodes really running the job:
tests/distributed/test_multinode.py.)"""

import os
import shlex

import pytest

from aletheia_ds.cli import main
from aletheia_ds.launchers.deepspeed import expand_nodelist, slurm_launch

CONFIG = "launch/configs/tiny_cpu.yaml"
ALLOCATION = {
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "31337",
    "SLURM_GPUS_ON_NODE": "8",
    "TMPDIR": "/scratch/job",
}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,10]", ["gpu01", "gpu02", "gpu03", "gpu10"]),
        ("a[8-10]-ib,login2", ["a8-ib", "a9-ib", "a10-ib", "login2"]),
    ],
)
def test_slurm_node_lists_expand_as_scontrol_does(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def dry_run(monkeypatch, capsys, env: dict, *flags: str) -> tuple[int, list[str]]:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["train", "--config", CONFIG, *flags, "--dry-run", "train.max_steps=5"])
    return code, capsys.readouterr()


def test_slurm_dry_run_prints_this_nodes_launcher(monkeypatch, capsys, root):
    monkeypatch.chdir(root)
    code, out = dry_run(monkeypatch, capsys, ALLOCATION, "--slurm")
    assert code == 0, out.err
    lines = out.out.strip().splitlines()
    assert lines[:4] == [
        "# SLURM job 31337: node 1 of 2 (gpu07 gpu08), 8 ranks per node, master gpu07:21337",
        "# hostfile /scratch/job/aletheia_ds-hosts-31337 (written on each node):",
        "#   gpu07 slots=8",
        "#   gpu08 slots=8",
    ]
    cmd = shlex.split(lines[4])
    assert cmd[cmd.index("--hostfile") :] == [
        "--hostfile",
        "/scratch/job/aletheia_ds-hosts-31337",
        "--num_nodes",
        "2",
        "--num_gpus",
        "8",
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "gpu07",
        "--master_port",
        "21337",
        "launch/train.py",
        "--config",
        CONFIG,
        "train.max_steps=5",
    ]
    assert len(lines) == 5 and not (root / "aletheia_ds-hosts-31337").exists()


def test_slurm_ranks_per_node_from_the_flag_when_the_job_asked_for_no_gpus(monkeypatch):
    env = dict(ALLOCATION, SLURM_NODEID="0")
    del env["SLURM_GPUS_ON_NODE"]
    launch = slurm_launch(env, "launch/train.py", [], ranks_per_node=1, master_port=29555)
    assert (launch.node_rank, launch.ranks_per_node, launch.master_addr, launch.master_port) == (0, 1, "gpu07", 29555)
    assert launch.command[launch.command.index("--node_rank") + 1] == "0"


@pytest.mark.parametrize(
    "env, flags, error",
    [
        ({}, ["--slurm"], "error: --slurm: SLURM_JOB_NODELIST is unset; run inside an allocation"),
        (
            {k: v for k, v in ALLOCATION.items() if k != "SLURM_GPUS_ON_NODE"},
            ["--slurm"],
            "error: --num-gpus: give the ranks per node (SLURM_GPUS_ON_NODE is unset",
        ),
        (
            dict(ALLOCATION, SLURM_NNODES="3"),
            ["--slurm"],
            "error: --slurm: SLURM_NNODES=3 and SLURM_NODEID=1 do not fit",
        ),
        (ALLOCATION, ["--slurm", "--node-rank", "0"], "error: --slurm: the allocation gives the hosts"),
        ({}, ["--node-rank", "1", "--master-addr", "n0"], "error: --hostfile: required with --num-nodes/--node-rank"),
    ],
)
def test_bad_multinode_flags_are_one_line(monkeypatch, capsys, root, env, flags, error):
    monkeypatch.chdir(root)
    code, out = dry_run(monkeypatch, capsys, env, *flags)
    assert code == 2 and out.err.startswith(error) and len(out.err.strip().splitlines()) == 1, out.err


def test_node_rank_launches_one_node_without_ssh(monkeypatch, capsys, root, tmp_path):
    monkeypatch.chdir(root)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-0 slots=2\nnode-1 slots=2\n")
    code, out = dry_run(
        monkeypatch,
        capsys,
        {},
        "--hostfile",
        str(hostfile),
        "--num-nodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "node-0",
        "--master-port",
        "29501",
    )
    assert code == 0, out.err
    cmd = shlex.split(out.out.strip().splitlines()[-1])
    assert cmd[cmd.index("--hostfile") : cmd.index("launch/train.py")] == [
        "--hostfile",
        str(hostfile),
        "--num_nodes",
        "2",
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "node-0",
        "--master_port",
        "29501",
    ]
    code, out = dry_run(monkeypatch, capsys, {}, "--hostfile", str(hostfile), "--node-rank", "1")
    assert code == 2 and out.err.startswith("error: --master-addr: required with --node-rank")
