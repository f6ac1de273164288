"""Ray Train across two Ray nodes on one host: a head on 127.0.0.1 and a second node on 127.0.0.2, one CPU each,
and a job of 2 workers that STRICT_SPREAD puts one on each node. The second node is lost mid-training (its
raylet, agents and worker SIGKILLed together); a replacement node joins, Ray restarts the worker group from the
last checkpoint, and the run ends with the probe, plan, losses and adapter of one uninterrupted node of 2 ranks.
"""

import json
import re

import pytest
import torch
from helpers.ranks import read_jsonl, run_train, save_tiny_llama, tiny_run_config
from helpers.ray_cluster import kill_past_checkpoint, local_ray, ray_config, read_notes, write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, SAVE_EVERY = 12, 4


def test_two_node_job_survives_a_lost_node_and_equals_one_node(tmp_path):
    from safetensors.torch import load_file

    model_dir = save_tiny_llama(tmp_path / "model")
    train = {"max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": 2}
    # the reference: one node of 2 ranks, uninterrupted, with the DeepSpeed launcher
    one_node = tmp_path / "one-node"
    run_train(tiny_run_config(model_dir, one_node, train=train), tmp_path, nprocs=2, timeout=400)

    config = ray_config(model_dir, tmp_path, placement_strategy="STRICT_SPREAD", max_failures=1)
    config["train"].update(train)
    # one cache folder on the file system both nodes share: each node's first rank tokenizes (data.cache_shared
    # false), the first to rename its copy into place wins
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    run = tmp_path / "storage" / "run"
    job_log = tmp_path / "job.log"
    with local_ray(num_cpus=1) as cluster:  # nodes and head stopped on the way out, whatever happened
        second = cluster.add_node("127.0.0.2", num_cpus=1)
        job = cluster.start(["--config", str(write_config(config, tmp_path))], job_log)
        try:
            before = kill_past_checkpoint(job, run, job_log, lambda notes: second.kill())
            replacement = cluster.add_node("127.0.0.3", num_cpus=1)  # as an autoscaler (or the operator) would
            job.wait(timeout=540)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        head_id = _head_node_id(before["notes"], second.node_id)
    log = job_log.read_text()
    assert job.returncode == 0, log[-6000:]

    # 1. placement: one worker per node, each the first (local rank 0) of a node of its own; after the loss the
    #    restarted group ran on the head and the replacement, resuming from the run's storage
    first, restarted = before["notes"], read_notes(run)
    assert {n["node_id"] for n in first} == {head_id, second.node_id}
    assert {n["node_id"] for n in restarted} == {head_id, replacement.node_id}
    for notes in (first, restarted):
        assert [n["rank"] for n in notes] == [0, 1] and [n["local_rank"] for n in notes] == [0, 0]
        assert sorted(n["node_rank"] for n in notes) == [0, 1]
    assert not any(n["resumed"] for n in first) and all(n["resumed"] for n in restarted)
    assert "[FailurePolicy] RETRY" in log
    resumed = re.findall(rf"resume: {re.escape(str(run / 'checkpoints'))}/step-(\d+), step (\d+) of {STEPS}", log)
    assert len(resumed) == 1 and int(resumed[0][1]) <= before["checkpoint_step"], log[-6000:]

    # 2. the same job as one node of 2 ranks: probe, plan, every step's loss, the adapter
    probe, reference = (json.loads((out / "probe.json").read_text()) for out in (run, one_node))
    assert probe["world_size"] == 2 and probe["tokens"] == reference["tokens"]
    for got, want in zip(probe["layers"], reference["layers"], strict=True):
        assert got["score"] == pytest.approx(want["score"], rel=1e-6)
    assert json.loads((run / "plan.json").read_text()) == json.loads((one_node / "plan.json").read_text())
    rows, reference_rows = read_jsonl(run / "metrics.jsonl"), read_jsonl(one_node / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference_rows], rel=1e-6, abs=0)
    # the steps the lost group logged come out bit for bit the same after the restart
    for old in before["rows"]:
        assert rows[old["step"] - 1]["loss"] == old["loss"]
    adapter, want = (load_file(str(out / "adapter/adapter_model.safetensors")) for out in (run, one_node))
    assert adapter.keys() == want.keys()
    for name, tensor in adapter.items():
        assert torch.allclose(tensor, want[name], rtol=1e-4, atol=1e-6), name

    # 3. rank-0-only outputs: the job's lines come from rank 0's process alone (Ray prefixes each worker's line
    #    with its pid and node address)
    speakers = {int(pid) for pid in re.findall(r"\(RayTrainWorker pid=(\d+)[,)].*plan \(top_pct\)", log)}
    assert speakers == {n["pid"] for n in first + restarted if n["rank"] == 0}, speakers
    # 4. the data cache: one folder per source (train, eval) whichever node renamed first, no partial one left
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != "raw")
    assert len(cached) == 2 and not any(name.startswith(".tmp-") for name in cached), cached


def _head_node_id(notes: list[dict], lost: str) -> str:
    others = {n["node_id"] for n in notes} - {lost}
    assert len(others) == 1, notes
    return others.pop()
