"""Two "nodes" of one rank each, started as a multi-node job is (a DeepSpeed launcher per node with --hostfile
--no_ssh --node_rank R, master on loopback), run the real job and give the probe, plan, losses and adapter of one
node with 2 ranks. On CPU (gloo) each node has one CPU rank; on GPU (NCCL, bf16) node R has the host's GPU R, so
the one-node reference runs on the same two GPUs. The nodes share one file system here, as nodes on NFS or Lustre
do: both first ranks tokenize into one data.cache_dir (data.cache_shared=false) at once."""

import subprocess

import pytest
from helpers.ranks import (
    ROOT,
    assert_same_job,
    device_env,
    devices,
    run_train,
    save_tiny_llama,
    tiny_run_config,
    train_cmd,
)

from aletheia_ds.launchers.deepspeed import deepspeed_command, free_port, hostfile_text, node_commands

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def two_node_commands(script_args: list[str], tmp_path, device: str) -> list[list[str]]:
    """Each node's launcher command: what srun runs on each node (aletheia_ds.launchers.deepspeed.node_commands)."""
    hostfile = tmp_path / "hosts"
    script, master_port = str(ROOT / "launch/train.py"), free_port()
    if device == "cpu":
        hostfile.write_text(hostfile_text(["node-0", "node-1"], 1))  # names only: no ssh reaches them
        return node_commands(
            script, script_args, str(hostfile), 2, ranks_per_node=1, master_addr="127.0.0.1", master_port=master_port
        )
    # on one host both launchers would give their rank GPU 0 (DeepSpeed's launch sets CUDA_VISIBLE_DEVICES to the
    # node's ids in the hostfile, whatever the launcher was started with): each "node" lists the host's 2 GPUs and
    # --include gives node R the host's GPU R, as a host of its own would have its own GPU 0
    hostfile.write_text(hostfile_text(["node-0", "node-1"], 2))
    return [
        deepspeed_command(
            script,
            script_args,
            hostfile=str(hostfile),
            include="node-0:0@node-1:1",
            node_rank=node_rank,
            master_addr="127.0.0.1",
            master_port=master_port,
            interpreter_runner=True,
        )
        for node_rank in range(2)
    ]


def run_two_nodes(config: dict, tmp_path, device: str) -> list[str]:
    """Both node launchers side by side; returns their logs."""
    script_args = train_cmd(config, tmp_path, nprocs=0)[2:]  # the written config, without `python launch/train.py`
    nodes = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=device_env(device), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in two_node_commands(script_args, tmp_path, device)
    ]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=400)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-5000:]
    return logs


@pytest.mark.parametrize("device", devices(gpus=2))
def test_two_nodes_equal_one_node_of_two_ranks(tmp_path, device):
    model_dir = save_tiny_llama(tmp_path / "model")
    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    run_train(tiny_run_config(model_dir, one_node), tmp_path, nprocs=2, env=device_env(device))
    config = tiny_run_config(model_dir, two_nodes, data={"cache_dir": str(tmp_path / "cache")})
    logs = run_two_nodes(config, tmp_path, device)

    # each launcher started one rank of a world of 2: node 1's rank is global rank 1
    assert "node_rank=1" in logs[1] and "'node-1': [1]" in logs[1] and "dist_world_size=2" in logs[1]
    if device == "gpu":  # node 1's rank on the host's GPU 1
        assert "Setting CUDA_VISIBLE_DEVICES=1" in logs[1], logs[1][-5000:]
    # rank 0 alone speaks: node 1's log has none of the job's lines
    assert "plan (top_pct)" in logs[0] and "plan (top_pct)" not in logs[1]

    assert_same_job(two_nodes, one_node, device)
    # one cache per source (train, eval) under its key, whichever node renamed its copy into place first; no
    # partial folder left behind
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != "raw")
    assert len(cached) == 2 and not any(name.startswith(".tmp-") for name in cached), cached
