"""train.objective=dpo through launch/train.py on 2 CPU ranks under ZeRO-3: the probe of the DPO loss, a plan
with a frozen prefix (shared by the reference and policy passes), reward metrics, the report's reward curve, and
the exported adapter reloading with plain PEFT to the run's logits."""

import json
import math

import pytest
from helpers.ranks import ROOT, read_jsonl, run_train, save_tiny_llama, tiny_run_config

from aletheia_ds.evaluate import evaluate_adapter
from aletheia_ds.run_report import write_run_report

pytestmark = pytest.mark.distributed


def test_dpo_run_end_to_end(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "run"
    cfg = tiny_run_config(
        model_dir,
        out,
        data={
            "train": str(ROOT / "examples/tiny/prefs_train.jsonl"),
            "eval": str(ROOT / "examples/tiny/prefs_eval.jsonl"),
        },
        plan={"rule": "upper", "top_pct": 50},  # layers 2-3: a frozen prefix for the reference to share
        train={"objective": "dpo", "beta": 0.1, "max_steps": 4, "lr": 5e-3},
    )
    proc = run_train(cfg, tmp_path, nprocs=2, timeout=600)
    assert "gradient of the dpo loss" in proc.stdout
    assert json.loads((out / "plan.json").read_text())["lowest_adapted_layer"] == 2
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4
    for row in rows:
        assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= row.keys()
        assert row["reward_margin"] == pytest.approx(row["reward_chosen"] - row["reward_rejected"], abs=1e-9)
        assert 0.0 <= row["reward_accuracy"] <= 1.0
    # step 1 starts from policy = reference (B = 0): loss log 2, no reward
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["reward_margin"] == 0.0
    assert rows[-1]["reward_margin"] != 0.0
    results = json.loads((out / "eval.json").read_text())
    assert results["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(results["eval_loss_after"]) and results["eval_loss_after"] != results["eval_loss_before"]
    written = write_run_report(out)
    assert out / "rewards.png" in written and "Preference rewards: margin" in (out / "report.md").read_text()
    reloaded = evaluate_adapter(
        model=str(model_dir),
        adapter=str(out / "adapter"),
        data=cfg["data"]["eval"],
        tokenizer=cfg["model"]["tokenizer"],
        seq_len=48,
        batches=1,
        batch_size=4,
        verify_logits=str(out / "sample_logits.safetensors"),
    )
    assert reloaded["logits_match"], reloaded
