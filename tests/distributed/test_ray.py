"""Ray Train on a real local Ray cluster (loopback, token auth), jobs sent with `ray job submit`.

One job: the probe sharded over 2 workers equals one process, every worker trains the plan of plan.json,
each built only its half of the base model; a worker killed mid-training, the run resumes from its last
checkpoint with the loss curve intact, and the adapter in the run's storage reloads with plain PEFT.
Bad input: a cluster too small for the config, an address nobody answers. On 2 GPUs (marker `gpu`): each worker
on its own GPU, and a worker killed after a checkpoint ends as an uninterrupted GPU run within bf16's tolerance.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.ranks import ROOT, TOLERANCE, assert_same_job, read_jsonl, save_tiny_llama, single_process_probe
from helpers.ray_cluster import (
    GPU_WORKERS,
    kill_past_checkpoint,
    local_ray,
    ray_config,
    read_notes,
    wait_for_restart,
    write_config,
)

from aletheia_ds.adapters.attach import adapter_modules
from aletheia_ds.evaluate import evaluate_adapter
from aletheia_ds.launchers.deepspeed import free_port, rank_env
from aletheia_ds.launchers.ray import digest
from aletheia_ds.plan import Plan

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    with local_ray(num_cpus=2) as ray_cluster:  # stopped on the way out, whatever the tests did
        yield ray_cluster


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "model")


def test_job_shards_probe_plans_once_trains_survives_a_killed_worker(cluster, model_dir, tmp_path):
    config = ray_config(model_dir, tmp_path, max_failures=1)
    config["train"].update(max_steps=16, save_every=4, keep_last=2)
    run = tmp_path / "storage" / "run"
    job_log = tmp_path / "job.log"
    job = cluster.start(["--config", str(write_config(config, tmp_path))], job_log)
    try:
        before_kill, killed_pid = kill_a_worker_mid_training(job, run, job_log)
        job.wait(timeout=540)
    finally:
        if job.poll() is None:  # the job itself goes with the cluster
            job.kill()
            job.wait()
    log = job_log.read_text()
    assert job.returncode == 0, log[-6000:]
    assert "ray: done in" in log and str(run) in log

    # 1. the probe, its batches dealt over 2 workers and reduced, equals one process on all of them (a worker
    #    that probed every batch would double the squared norms)
    probe = json.loads((run / "probe.json").read_text())
    reference_cfg = dict(
        config,
        model=dict(config["model"], tokenizer=str(ROOT / "examples/tiny/tokenizer")),
        data=dict(config["data"], train=str(ROOT / "examples/tiny/train.jsonl")),
    )
    reference = single_process_probe(model_dir, reference_cfg)
    assert probe["world_size"] == 2 and probe["tokens"] == reference.tokens
    for got, want in zip(probe["layers"], reference.layers, strict=True):
        assert got["score"] == pytest.approx(want.score, rel=1e-5)
    ranked = sorted(range(4), key=lambda i: (-reference.layers[i].score, i))
    plan_json = json.loads((run / "plan.json").read_text())
    assert plan_json["layers"] == sorted(ranked[:2])

    # 2. one plan, computed once: every worker of both worker groups trained exactly the plan in plan.json;
    #    the first group made it from probe.json, the second took it from the checkpoint
    first, second = before_kill["notes"], read_notes(run)
    assert [n["rank"] for n in first] == [0, 1] and len({n["pid"] for n in first}) == 2
    assert {n["plan_sha256"] for n in first + second} == {digest(plan_json)}
    assert {n["probe_sha256"] for n in first} == {digest(probe)} and not any(n["resumed"] for n in first)
    assert all(n["resumed"] for n in second) and killed_pid not in {n["pid"] for n in second}

    # 3. memory: right after the build each worker held its ZeRO-3 half of the base weights, never all of them
    #    (a partition is padded to a multiple of the world size: at most one element per tensor)
    base = _base_model(model_dir)
    sizes = [p.numel() for p in base.parameters()]
    for note in first + second:
        held, total = note["base_parameter_elements"]["held"], note["base_parameter_elements"]["total"]
        assert note["zero_stage"] == 3 and total == sum(sizes)
        assert total / 2 <= held <= total / 2 + len(sizes)

    # 4. fault tolerance: Ray restarted the worker group, which resumed from the newest checkpoint it had
    #    been told of; the loss curve goes on without a reset: every step once, and the steps the killed
    #    group had already logged past that checkpoint come out the same again
    assert "[FailurePolicy] RETRY" in log
    resumed = re.findall(rf"resume: {re.escape(str(run / 'checkpoints'))}/step-(\d+), step (\d+) of 16", log)
    assert len(resumed) == 1 and resumed[0][0].lstrip("0") == resumed[0][1], log[-6000:]
    resumed_step = int(resumed[0][1])
    assert resumed_step in (4, 8, 12) and resumed_step <= before_kill["checkpoint_step"]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    redone = [r for r in before_kill["rows"] if r["step"] > resumed_step]
    assert redone, "the worker was killed before any step past the checkpoint"
    for old in before_kill["rows"]:
        assert rows[old["step"] - 1]["loss"] == pytest.approx(old["loss"], rel=1e-6, abs=0)

    # 5. checkpoints: Ray Train lists them in the run's storage and kept train.keep_last of them
    from ray.train import Result

    result = Result.from_path(str(run))
    assert result.checkpoint.path == str(run / "checkpoints" / "step-00000016")
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000012", "step-00000016"]
    assert "'stage': 'planned'" in log and "'stage': 'done'" in log  # progress went through ray.train.report

    # 6. the adapter in storage, reloaded by plain PEFT: the planned modules, the run's own logits
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(base, str(run / "adapter"))
    plan = Plan.load(run / "plan.json")
    assert adapter_modules(tuned) == {f"model.layers.{m.layer}.{m.path}": (m.r, m.alpha) for m in plan.modules}
    result = evaluate_adapter(
        model=str(model_dir),
        adapter=str(run / "adapter"),
        data=str(ROOT / "examples/tiny/eval.jsonl"),
        tokenizer=str(ROOT / "examples/tiny/tokenizer"),
        seq_len=48,
        batches=3,
        batch_size=4,
        verify_logits=str(run / "sample_logits.safetensors"),
    )
    assert result["logits_match"], result
    eval_json = json.loads((run / "eval.json").read_text())
    assert result["adapter_loss"] == pytest.approx(eval_json["eval_loss_after"], rel=1e-5)


def kill_a_worker_mid_training(job, run, job_log):
    """SIGKILL rank 1's process once Ray Train has registered a checkpoint and a later step is logged."""
    seen = kill_past_checkpoint(job, run, job_log, lambda notes: os.kill(notes[1]["pid"], signal.SIGKILL))
    return seen, seen["notes"][1]["pid"]


def _base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


@pytest.mark.timeout(1800)  # four Ray jobs, each starting its worker group (about 7 min on a quiet 2-core machine)
def test_ray_job_stop_or_sigterm_to_a_worker_checkpoints_exits_75_and_resumes_exactly(cluster, model_dir, tmp_path):
    from safetensors.torch import load_file

    config = ray_config(model_dir, tmp_path)
    config["train"].update(max_steps=8, save_every=4, keep_last=2)
    reference = tmp_path / "storage" / "whole"
    proc = cluster.submit(["--config", str(write_config(config, tmp_path)), "ray.name=whole"], timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    args = ["--config", str(write_config(config, tmp_path)), "ray.name=stopped"]
    run = tmp_path / "storage" / "stopped"

    # 1. `ray job stop` while the workers are in step 3: SIGTERM to the driver, relayed to the workers; Ray gives
    #    the driver RAY_JOB_STOP_WAIT_TIME_S (from the job's runtime_env) before its SIGKILL
    log = tmp_path / "stopped-1.log"
    wait = {"RAY_JOB_STOP_WAIT_TIME_S": "300"}
    job, pause = start_paused(cluster, args, run, log, after_step=3, submission_id="stop-by-driver", env_vars=wait)
    cluster.stop("stop-by-driver")
    release_once_stop_seen(job, pause, log)
    job.wait(timeout=300)
    text = log.read_text()
    assert "ray: SIGTERM: every worker stops after its current step and writes a checkpoint" in text, text[-6000:]
    assert stopped_lines(text) == [
        f"stopped: SIGTERM: stopped after step 3 of 8; checkpoint {run / 'checkpoints' / 'step-00000003'}; "
        "resume with --resume auto"
    ], text[-6000:]
    assert not our_tracebacks(text) and not (run / "eval.json").exists(), text[-6000:]

    # 2. the same job again resumes there; SIGTERM to one worker process in step 5 stops both, the driver exits 75
    log = tmp_path / "stopped-2.log"
    job, pause = start_paused(cluster, args, run, log, after_step=5)
    os.kill(read_notes(run)[1]["pid"], signal.SIGTERM)
    release_once_stop_seen(job, pause, log)
    job.wait(timeout=300)
    text = log.read_text()
    assert f"resume: {run / 'checkpoints' / 'step-00000003'}, step 3 of 8" in text, text[-6000:]
    assert stopped_lines(text) == [
        f"stopped: SIGTERM: stopped after step 5 of 8; checkpoint {run / 'checkpoints' / 'step-00000005'}; "
        "resume with --resume auto"
    ], text[-6000:]
    assert "failed with exit code 75" in text and not our_tracebacks(text), text[-6000:]

    # 3. and again: it finishes, equal to the uninterrupted job bit for bit
    proc = cluster.submit(args, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert f"resume: {run / 'checkpoints' / 'step-00000005'}, step 5 of 8" in proc.stdout
    rows, want = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in want]
    got, expected = (json.loads((d / "eval.json").read_text()) for d in (run, reference))
    assert got["eval_loss_after"] == expected["eval_loss_after"]
    tensors, ref_tensors = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run, reference))
    assert tensors.keys() == ref_tensors.keys() and all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)


def start_paused(cluster, args, run, log, after_step, **job):
    """The job submitted with every worker waiting after step `after_step` (until the pause file is removed)."""
    pause = log.with_suffix(".pause")
    pause.touch()
    job_proc = cluster.start(
        [str(pause), str(after_step), *args], log, script="tests/workers/ray_pause_between_steps.py", **job
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and job_proc.poll() is None:
        rows = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] == after_step:
            return job_proc, pause
        time.sleep(0.2)
    raise AssertionError(f"the job did not reach step {after_step}:\n{log.read_text()[-4000:]}")


def release_once_stop_seen(job, pause, log, timeout: float = 120.0):
    """Let the paused workers go on once the stop request has reached one of them."""
    seen = pause.with_name(pause.name + ".stop-seen")
    deadline = time.monotonic() + timeout
    while not seen.exists():
        assert time.monotonic() < deadline and job.poll() is None, log.read_text()[-4000:]
        time.sleep(0.1)
    pause.unlink()


def stopped_lines(text: str) -> list[str]:
    """The driver's stop lines (`ray job submit` prints a failed job's last lines a second time)."""
    return sorted({line for line in text.splitlines() if line.startswith("stopped:")})


def our_tracebacks(text: str) -> list[str]:
    """Tracebacks of the driver or of a training worker (Ray's own actors log theirs, e.g. about other Ray
    instances on this machine)."""
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line and (line.startswith("Traceback") or "RayTrainWorker pid=" in line)
    ]


def test_cluster_too_small_is_one_line_not_a_hang(cluster, model_dir, tmp_path):
    # through `ray job submit`: the driver's line reaches the submitter, the job fails
    config = ray_config(model_dir, tmp_path, num_workers=3)
    proc = cluster.submit(["--config", str(write_config(config, tmp_path))], timeout=240)
    assert proc.returncode != 0
    assert "error: ray: the cluster at " in proc.stdout
    assert (
        "cannot run ray.num_workers=3 workers of {'CPU': 1.0}: CPU: 3 workers x 1 = 3 needed, the cluster has 2"
        in proc.stdout
    )
    # straight to the cluster's address: GPUs this cluster does not have
    config = ray_config(model_dir, tmp_path, use_gpu=True, address=cluster.gcs_address)
    proc = subprocess.run(
        [sys.executable, "launch/ray_train.py", "--config", str(write_config(config, tmp_path))],
        cwd=ROOT,
        env=rank_env(cpu=True, **{k: v for k, v in cluster.env.items() if k.startswith("RAY_")}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "GPU: 2 workers x 1 = 2 needed, the cluster has 0" in error[0], proc.stderr[-3000:]
    assert not (tmp_path / "storage" / "run" / "probe.json").exists()


def test_unreachable_address_is_one_line(model_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = ray_config(model_dir, tmp_path, address=address)
    proc = subprocess.run(
        [sys.executable, "launch/ray_train.py", "--config", str(write_config(config, tmp_path))],
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: ray.address: cannot reach a Ray cluster at {address} (Connection refused); start one with "
        "`ray start --head`, or fix ray.address / RAY_ADDRESS"
    ]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_workers_take_one_gpu_each_and_a_killed_one_resumes_to_the_uninterrupted_run(model_dir, tmp_path):
    """2 GPU workers (NCCL, bf16): an uninterrupted job, then the same job with rank 1's worker SIGKILLed after a
    checkpoint; Ray restarts the group, it resumes, and the run ends as the uninterrupted one within bf16's
    tolerance (helpers.ranks.TOLERANCE; on CPU the first test above checks it bit for bit)."""
    steps, kill_after = 12, 6
    config = ray_config(model_dir, tmp_path, max_failures=1, **GPU_WORKERS)
    config["train"].update(max_steps=steps, save_every=4, keep_last=2)
    storage = tmp_path / "storage"
    path = str(write_config(config, tmp_path))
    job_log = tmp_path / "killed.log"
    # the workers wait after step `kill_after` while this file exists (tests/workers/ray_pause_between_steps.py):
    # the kill falls between two checkpoints however fast the steps are (milliseconds each on a GPU)
    pause = tmp_path / "pause"
    pause.touch()
    with local_ray(num_cpus=4, num_gpus=2) as gpu_cluster:
        proc = gpu_cluster.submit(["--config", path, "ray.name=whole"], timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        job = gpu_cluster.start(
            [str(pause), str(kill_after), "--config", path, "ray.name=killed"],
            job_log,
            script="tests/workers/ray_pause_between_steps.py",
        )
        try:
            before, killed_pid = kill_a_worker_mid_training(job, storage / "killed", job_log)
            # rank 0 waits until Ray ends it, never in a collective with the killed rank (NCCL on one host may wait
            # there for its timeout rather than fail); the restarted group then runs through
            wait_for_restart(job, storage / "killed", job_log)
            pause.unlink()
            job.wait(timeout=400)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    log = job_log.read_text()
    assert job.returncode == 0, log[-6000:]

    # 1. one GPU each: Ray's device index for each worker of the node (LOCAL_RANK), its own GPU of the host's
    whole, run = storage / "whole", storage / "killed"
    notes = read_notes(whole)
    assert sorted(n["device"] for n in notes) == ["cuda:0", "cuda:1"]
    assert sorted(gpu for n in notes for gpu in n["gpu_ids"]) == ["0", "1"]
    assert {n["plan_sha256"] for n in notes} == {digest(json.loads((whole / "plan.json").read_text()))}
    eval_json = json.loads((whole / "eval.json").read_text())
    assert eval_json["eval_loss_after"] < eval_json["eval_loss_before"]

    # 2. the kill: Ray restarted the group, which resumed from a checkpoint no newer than the last it had been told
    #    of, without rank 1's old process
    assert "[FailurePolicy] RETRY" in log
    resumed = re.findall(rf"resume: {re.escape(str(run / 'checkpoints'))}/step-(\d+), step (\d+) of {steps}", log)
    assert len(resumed) == 1 and int(resumed[0][1]) <= before["checkpoint_step"], log[-6000:]
    assert all(n["resumed"] for n in read_notes(run)) and killed_pid not in {n["pid"] for n in read_notes(run)}

    # 3. the run ends as the uninterrupted one: probe, plan, every step's loss once, the adapter; the steps the
    #    killed group had logged come out the same again
    rows = assert_same_job(run, whole, "gpu")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    redone = [rows[old["step"] - 1]["loss"] for old in before["rows"]]
    assert redone == pytest.approx([old["loss"] for old in before["rows"]], rel=TOLERANCE["gpu"].loss, abs=0)
