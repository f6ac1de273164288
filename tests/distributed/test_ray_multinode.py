"""A Ray cluster of two nodes on one host (a head and a second `ray start`, one CPU and a resource of their own
each) and a job placed STRICT_SPREAD: its two workers run on different nodes and give the probe, plan, losses
and adapter of the same job on one node (the DeepSpeed launcher, 2 ranks)."""

import json

import pytest
import torch
import yaml

from helpers.ranks import read_jsonl, run_train, save_tiny_llama, tiny_run_config
from helpers.ray_cluster import local_ray, second_node

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              # the second `ray start` resolves the head's 127.0.0.1 to the host's own address, where the head
              # (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, bound to loopback) does not listen: it never joins
              pytest.mark.skip(reason="second Ray node on loopback does not join yet (docs/MULTINODE.md)")]


def test_strict_spread_job_runs_on_both_nodes_and_equals_one_node(tmp_path):
    from safetensors.torch import load_file

    model_dir = save_tiny_llama(tmp_path / "model")
    one_node = tmp_path / "one-node"
    config = tiny_run_config(model_dir, one_node)
    run_train(config, tmp_path, nprocs=2)

    ray_config = dict(config, ray={"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "name": "run",
                                   "storage_path": str(tmp_path / "storage")})
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(ray_config))
    with local_ray(num_cpus=1, resources={"node_a": 1}) as cluster, \
            second_node(cluster, num_cpus=1, resources={"node_b": 1}):
        proc = cluster.submit(["--config", str(path)], timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    run = tmp_path / "storage" / "run"
    notes = [json.loads((run / "workers" / f"rank-{rank:05d}.json").read_text()) for rank in range(2)]
    assert len({note["node_id"] for note in notes}) == 2 and sorted(n["node_rank"] for n in notes) == [0, 1]

    probe, reference = (json.loads((out / "probe.json").read_text()) for out in (run, one_node))
    assert probe["tokens"] == reference["tokens"]
    for got, want in zip(probe["layers"], reference["layers"], strict=True):
        assert got["score"] == pytest.approx(want["score"], rel=1e-6)
    assert json.loads((run / "plan.json").read_text()) == json.loads((one_node / "plan.json").read_text())
    losses = [[row["loss"] for row in read_jsonl(out / "metrics.jsonl")] for out in (run, one_node)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    adapter, want = (load_file(str(out / "adapter/adapter_model.safetensors")) for out in (run, one_node))
    assert adapter.keys() == want.keys()
    for name, tensor in adapter.items():
        assert torch.allclose(tensor, want[name], rtol=1e-4, atol=1e-6), name
