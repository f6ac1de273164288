"""Two "nodes" of one CPU rank each, started as a multi-node job is (a DeepSpeed launcher per node with
--num_nodes 2 --node_rank R --no_ssh, master on loopback), run the real job and give the probe, plan, losses
and adapter of one node with 2 ranks. The nodes share one file system here, as nodes on NFS or Lustre do: both
first ranks tokenize into one data.cache_dir (data.cache_shared=false) at once."""

import json
import subprocess

import pytest
import torch
from helpers.ranks import ROOT, read_jsonl, run_train, save_tiny_llama, tiny_run_config, train_cmd

from aletheia_ds.launchers.deepspeed import free_port, hostfile_text, node_commands, rank_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def run_two_nodes(config: dict, tmp_path) -> list[str]:
    """Both node launchers side by side; returns their logs."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text(hostfile_text(["node-0", "node-1"], 1))  # names only: no ssh reaches them
    script_args = train_cmd(config, tmp_path, nprocs=0)[2:]  # the written config, without `python launch/train.py`
    commands = node_commands(
        str(ROOT / "launch/train.py"),
        script_args,
        str(hostfile),
        num_nodes=2,
        ranks_per_node=1,
        master_addr="127.0.0.1",
        master_port=free_port(),
    )
    nodes = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=rank_env(cpu=True), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in commands
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


def test_two_nodes_equal_one_node_of_two_ranks(tmp_path):
    from safetensors.torch import load_file

    model_dir = save_tiny_llama(tmp_path / "model")
    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    run_train(tiny_run_config(model_dir, one_node), tmp_path, nprocs=2)
    logs = run_two_nodes(tiny_run_config(model_dir, two_nodes, data={"cache_dir": str(tmp_path / "cache")}), tmp_path)

    # each launcher started one rank of a world of 2: node 1's rank is global rank 1
    assert "node_rank=1" in logs[1] and "'node-1': [1]" in logs[1] and "dist_world_size=2" in logs[1]
    # rank 0 alone speaks: node 1's log has none of the job's lines
    assert "plan (top_pct)" in logs[0] and "plan (top_pct)" not in logs[1]

    probe, reference = (json.loads((out / "probe.json").read_text()) for out in (two_nodes, one_node))
    assert probe["world_size"] == reference["world_size"] == 2 and probe["tokens"] == reference["tokens"]
    for got, want in zip(probe["layers"], reference["layers"], strict=True):
        assert got["score"] == pytest.approx(want["score"], rel=1e-6)
    assert json.loads((two_nodes / "plan.json").read_text()) == json.loads((one_node / "plan.json").read_text())
    losses = [[row["loss"] for row in read_jsonl(out / "metrics.jsonl")] for out in (two_nodes, one_node)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    adapter, want = (load_file(str(out / "adapter/adapter_model.safetensors")) for out in (two_nodes, one_node))
    assert adapter.keys() == want.keys()
    for name, tensor in adapter.items():
        assert torch.allclose(tensor, want[name], rtol=1e-4, atol=1e-6), name
    # one cache per source (train, eval) under its key, whichever node renamed its copy into place first; no
    # partial folder left behind
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != "raw")
    assert len(cached) == 2 and not any(name.startswith(".tmp-") for name in cached), cached
