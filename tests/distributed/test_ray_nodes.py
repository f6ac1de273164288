"""Ray Train across two Ray nodes on one host: a head on 127.0.0.1 and a second node on 127.0.0.2, one CPU each
(and on GPU one GPU each: the head the host's GPU 0, the second node GPU 1), and a job of 2 workers that
STRICT_SPREAD puts one on each node. The second node is lost mid-training (its raylet, agents and worker SIGKILLed
together); a replacement node joins (on GPU: with GPU 1 again, free once the lost worker is gone), Ray restarts the
worker group from the last checkpoint, and the run ends with the probe, plan, losses and adapter of one
uninterrupted node of 2 ranks on the same devices.
"""

import re

import pytest
from helpers.ranks import TOLERANCE, assert_same_job, device_env, devices, run_train, save_tiny_llama, tiny_run_config
from helpers.ray_cluster import (
    GPU_WORKERS,
    kill_past_checkpoint,
    local_ray,
    ray_config,
    read_notes,
    wait_for_restart,
    write_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS, SAVE_EVERY, KILL_AFTER = 12, 4, 6


@pytest.mark.parametrize("device", devices(gpus=2))
def test_two_node_job_survives_a_lost_node_and_equals_one_node(tmp_path, device):
    gpu = device == "gpu"

    def node_gpu(index: int) -> dict:  # one GPU of the host's per node, as a host of one GPU would have
        return {"num_gpus": 1, "visible_devices": str(index)} if gpu else {}

    model_dir = save_tiny_llama(tmp_path / "model")
    train = {"max_steps": STEPS, "save_every": SAVE_EVERY, "keep_last": 2}
    # the reference: one node of 2 ranks, uninterrupted, with the DeepSpeed launcher
    one_node = tmp_path / "one-node"
    run_train(
        tiny_run_config(model_dir, one_node, train=train), tmp_path, nprocs=2, timeout=400, env=device_env(device)
    )

    config = ray_config(
        model_dir, tmp_path, placement_strategy="STRICT_SPREAD", max_failures=1, **(GPU_WORKERS if gpu else {})
    )
    config["train"].update(train)
    # one cache folder on the file system both nodes share: each node's first rank tokenizes (data.cache_shared
    # false), the first to rename its copy into place wins
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    run = tmp_path / "storage" / "run"
    job_log = tmp_path / "job.log"
    # the workers wait after step KILL_AFTER while this file exists (tests/workers/ray_pause_between_steps.py): the
    # node is lost between a checkpoint and the next however fast the steps are (on GPU, milliseconds each)
    pause = tmp_path / "pause"
    pause.touch()
    args = [str(pause), str(KILL_AFTER), "--config", str(write_config(config, tmp_path))]
    with local_ray(num_cpus=1, **node_gpu(0)) as cluster:  # nodes and head stopped on the way out
        second = cluster.add_node("127.0.0.2", num_cpus=1, **node_gpu(1))
        job = cluster.start(args, job_log, script="tests/workers/ray_pause_between_steps.py")
        try:
            before = kill_past_checkpoint(job, run, job_log, lambda notes: second.kill())
            # as an autoscaler (or the operator) would
            replacement = cluster.add_node("127.0.0.3", num_cpus=1, **node_gpu(1))
            # the head's worker waits until Ray ends it, never in a collective with the lost one (NCCL on one host
            # may wait there for its timeout rather than fail); the restarted group then runs through
            wait_for_restart(job, run, job_log)
            pause.unlink()
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
    if gpu:  # each worker on its node's own GPU, in the host's numbering
        gpu_by_node = {n["node_id"]: n["gpu_ids"] for n in first + restarted}
        assert gpu_by_node == {head_id: ["0"], second.node_id: ["1"], replacement.node_id: ["1"]}, gpu_by_node
        assert {n["device"] for n in first + restarted} == {"cuda:0"}
    assert not any(n["resumed"] for n in first) and all(n["resumed"] for n in restarted)
    assert "[FailurePolicy] RETRY" in log
    resumed = re.findall(rf"resume: {re.escape(str(run / 'checkpoints'))}/step-(\d+), step (\d+) of {STEPS}", log)
    assert len(resumed) == 1 and int(resumed[0][1]) <= before["checkpoint_step"], log[-6000:]

    # 2. the same job as one node of 2 ranks: probe, plan, every step's loss, the adapter
    rows = assert_same_job(run, one_node, device)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # the steps the lost group logged come out the same after the restart: bit for bit on CPU
    redone = [rows[old["step"] - 1]["loss"] for old in before["rows"]]
    rel = TOLERANCE[device].loss if gpu else 0
    assert redone == pytest.approx([old["loss"] for old in before["rows"]], rel=rel, abs=0)

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
