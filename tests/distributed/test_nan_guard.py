"""Non-finite losses from real training (one process, ZeRO-3): no mock, no injected NaN.

Two real causes: a base-model embedding row set to +inf (RMSNorm of an inf row is inf * 0 = NaN, so any
data row holding that token gives a NaN loss and NaN gradients: a corrupted weight met by real data),
and an absurd learning rate (1e30: the first applied update overflows the next forward).

- nan_policy=stop: exit 3, one line naming the step and the last good checkpoint, which is kept;
- nan_policy=skip: exactly that update is dropped (the checkpoints before and after it hold the same
  adapter), training carries on; past train.max_nan_skips the run stops.
"""

import json

import pytest
import torch
from helpers.ranks import ROOT, read_jsonl, run_train, save_tiny_llama, tiny_run_config

from aletheia_ds.data import StepSchedule, load_examples, load_tokenizer

pytestmark = pytest.mark.distributed

POISON = "@"
ROWS, MICRO_BATCH, STEPS = 24, 4, 6  # one epoch of 6 steps on one process


def poisoned_step(seed: int, count: int) -> int:
    """The 1-based step whose batch holds the last row (the poisoned one) under this data order."""
    schedule = StepSchedule(count, MICRO_BATCH, 1, 1, seed)
    return next(step + 1 for step in range(STEPS) if count - 1 in next(iter(schedule.micro_batches(step, 0))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    tmp = tmp_path_factory.mktemp("nan")
    model_dir = save_tiny_llama(tmp / "model")
    tok = load_tokenizer(str(ROOT / "examples/tiny/tokenizer"))
    (token_id,) = tok(POISON, add_special_tokens=False)["input_ids"]
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.embed_tokens.weight"][token_id] = float("inf")
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    lines = (ROOT / "examples/tiny/train.jsonl").read_text().splitlines()[: ROWS - 1]
    lines.append(json.dumps({"prompt": f"Question: what is {POISON}?\nAnswer:", "completion": " 1."}))
    data = tmp / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    examples = load_examples(data, tok, 48, log=lambda _m: None)
    assert [token_id in ex.input_ids for ex in examples] == [False] * (ROWS - 1) + [True]
    eval_ids = {t for ex in load_examples(ROOT / "examples/tiny/eval.jsonl", tok, 48) for t in ex.input_ids}
    assert token_id not in eval_ids
    # a data order that puts the poisoned row neither first nor last, so both neighbours are checkpoints
    seed = next(s for s in range(100) if 2 <= poisoned_step(s, ROWS) < STEPS)
    return tmp, model_dir, data, seed, poisoned_step(seed, ROWS)


def job(setup, name, **train):
    tmp, model_dir, data, seed, _ = setup
    cfg = tiny_run_config(
        model_dir,
        tmp / name,
        train={
            "max_steps": STEPS,
            "micro_batch_size": MICRO_BATCH,
            "seed": seed,
            "save_every": 1,
            "keep_last": STEPS,
            **train,
        },
    )
    cfg["data"].update(train=str(data), max_examples=None)
    return cfg


def error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def adapter(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "adapter" / "adapter_model.safetensors"))


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(setup):
    tmp, *_, bad = setup
    proc = run_train(job(setup, "stop"), tmp, nprocs=0, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = error_line(proc)
    good = tmp / "stop" / "checkpoints" / f"step-{bad - 1:08d}"
    assert f"non-finite loss at step {bad} " in line and "the update was not applied" in line
    assert f"last good checkpoint: {good}" in line
    assert (tmp / "stop" / "checkpoints" / "latest").read_text() == good.name
    assert [r["step"] for r in read_jsonl(tmp / "stop" / "metrics.jsonl")] == list(range(1, bad))
    assert all(torch.isfinite(t).all() for t in adapter(tmp / "stop", bad - 1).values())


def test_skip_drops_exactly_that_update_and_carries_on(setup):
    tmp, *_, bad = setup
    out = tmp / "skip"
    proc = run_train(job(setup, "skip", nan_policy="skip", max_nan_skips=1), tmp, nprocs=0)
    assert f"non-finite loss at step {bad} " in proc.stdout and "update skipped (1/1 allowed" in proc.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r.get("skipped", False) for r in rows] == [r["step"] == bad for r in rows]
    assert rows[bad - 1]["loss"] is None and all(r["loss"] is not None for r in rows if r["step"] != bad)
    before, at, after = adapter(out, bad - 1), adapter(out, bad), adapter(out, bad + 1)
    assert all(torch.equal(before[k], at[k]) for k in before)  # the poisoned step changed nothing
    assert any(not torch.equal(at[k], after[k]) for k in at)  # the next step trained again
    assert all(torch.isfinite(t).all() for t in after.values())
    assert json.loads((out / "eval.json").read_text())["skipped_steps"] == 1


def test_absurd_learning_rate_is_skipped_up_to_the_limit_then_stops(setup):
    tmp, model_dir, *_ = setup
    cfg = tiny_run_config(
        model_dir,
        tmp / "lr",
        train={"lr": 1e30, "nan_policy": "skip", "max_nan_skips": 2, "save_every": 1, "keep_last": 1},
    )
    proc = run_train(cfg, tmp, nprocs=0, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    rows = read_jsonl(tmp / "lr" / "metrics.jsonl")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert len(skipped) == 2 and skipped[1] == skipped[0] + 1 and rows[-1]["step"] == skipped[1]
    line = error_line(proc)
    assert f"at step {skipped[1] + 1} " in line and "2 steps skipped already, train.max_nan_skips=2" in line
    # skipped steps are checkpointed too (their state is the unchanged one before them)
    assert (tmp / "lr" / "checkpoints" / "latest").read_text() == f"step-{skipped[1]:08d}"
    assert f"last good checkpoint: {tmp / 'lr' / 'checkpoints' / f'step-{skipped[1]:08d}'}" in line
