"""Preference objectives through Ray Train: launch/configs/tiny_dpo_cpu.yaml sent with `ray job submit` to a real
local Ray cluster (2 CPU workers, ZeRO-3), DPO and SimPO. The reference is the same config run by
`deepspeed launch/train.py` on 2 ranks: the same probe, plan, per-step losses and rewards, held-out loss and
adapter; the reward metrics reach Ray Train through ray.train.report; the adapter in the run's storage reloads
with plain PEFT to the run's logits."""

import ast
import json
import math
import re
import subprocess

import pytest
import torch
from helpers.ranks import ROOT, evaluate_tiny_run, read_jsonl, save_tiny_llama
from helpers.ray_cluster import local_ray

from aletheia_ds.launchers.deepspeed import local_command, rank_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = "launch/configs/tiny_dpo_cpu.yaml"
REWARDS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
OBJECTIVES = {
    "dpo": [],
    "simpo": ["train.objective=simpo", "train.beta=2.0", "train.simpo_gamma=0.5"],  # the command in PREFERENCE.md
}


@pytest.fixture(scope="module")
def cluster():
    with local_ray(num_cpus=2) as ray_cluster:
        yield ray_cluster


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("model") / "model")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_preference_job_on_ray_equals_the_deepspeed_launcher(cluster, model_dir, tmp_path, objective):
    # the shipped config, shortened; the base saved by the test (the shipped one is generated, not uploaded)
    overrides = [
        f"model.path={model_dir}",
        "train.max_steps=4",
        "probe.batches=4",
        "data.eval_batches=2",
        *OBJECTIVES[objective],
    ]
    storage = tmp_path / "storage"
    ray_args = ["--config", CONFIG, *overrides, "ray.num_workers=2", f"ray.storage_path={storage}", "ray.name=run"]
    proc = cluster.submit(ray_args, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    run = storage / "run"
    assert "ray: done in" in log and str(run) in log, log[-6000:]
    assert f"gradient of the {objective} loss" in log, log[-6000:]

    reference = tmp_path / "deepspeed"
    ds = subprocess.run(
        local_command(
            str(ROOT / "launch/train.py"), ["--config", CONFIG, *overrides, f"train.output_dir={reference}"], 2
        ),
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ds.returncode == 0, (ds.stdout + ds.stderr)[-6000:]

    # the same job: probe, plan, every step's loss and rewards, the held-out preference loss, the adapter
    for name in ("probe.json", "plan.json"):
        got, want = (json.loads((d / name).read_text()) for d in (run, reference))
        if name == "probe.json":
            assert [layer["score"] for layer in got["layers"]] == pytest.approx(
                [layer["score"] for layer in want["layers"]], rel=1e-6
            )
        else:
            assert got["layers"] == want["layers"] and got["modules"] == want["modules"]
    rows, want_rows = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows] == [1, 2, 3, 4]
    for row, want in zip(rows, want_rows):
        for key in ("loss", "lr", *REWARDS):
            assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (row["step"], key)
    assert rows[-1]["reward_margin"] != rows[0]["reward_margin"]  # training moved the rewards
    if objective == "dpo":  # policy = reference at step 1: loss log 2, no reward yet
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["reward_margin"] == 0.0
    got, want = (json.loads((d / "eval.json").read_text()) for d in (run, reference))
    assert got["eval_loss_after"] == pytest.approx(want["eval_loss_after"], rel=1e-6)
    assert got["eval_loss_after"] != got["eval_loss_before"]
    from safetensors.torch import load_file

    tensors, ref_tensors = (load_file(str(d / "adapter/adapter_model.safetensors")) for d in (run, reference))
    assert tensors.keys() == ref_tensors.keys() and tensors
    for key in tensors:
        torch.testing.assert_close(tensors[key], ref_tensors[key], rtol=1e-5, atol=1e-7)

    # the rewards went through ray.train.report: every step's report, and the last checkpoint's metrics in Ray
    # Train's own record of the run
    reported = {}  # (rank, step): the metrics of each worker's ray.train.report, as Ray Train logs them
    for line in log.splitlines():
        found = re.search(r"TrainingReport\(checkpoint=.*?, metrics=(\{.*\}), validation=\w+\) from rank (\d+)", line)
        if found and "'stage': 'train'" in found.group(1):
            metrics = ast.literal_eval(found.group(1))  # a dict's repr
            reported[int(found.group(2)), metrics["step"]] = metrics
    assert sorted(reported) == [(rank, step) for rank in (0, 1) for step in (1, 2, 3, 4)], log[-6000:]
    for (rank, step), metrics in reported.items():
        assert {k: metrics[k] for k in REWARDS} == {k: rows[step - 1][k] for k in REWARDS}, (rank, step)
    from ray.train import Result

    result = Result.from_path(str(run))
    assert result.checkpoint.path == str(run / "checkpoints" / "step-00000004")
    assert {k: result.metrics[k] for k in REWARDS} == {k: rows[-1][k] for k in REWARDS}

    # the exported adapter, reloaded on the original base by plain PEFT, gives the Ray job's logits
    cfg = {
        "data": {"eval": str(ROOT / "examples/tiny/prefs_eval.jsonl"), "seq_len": 64, "eval_batches": 1},
        "model": {"tokenizer": str(ROOT / "examples/tiny/tokenizer")},
        "train": {"micro_batch_size": 8},
    }
    assert evaluate_tiny_run(model_dir, run, cfg)["logits_match"]
    assert re.search(r"held-out loss \d\.\d{4} -> \d\.\d{4}", log)
