"""tools/bench_speed.py end to end on CPU (tiny shape): every row, predictions, probe timing, MoE rows."""

import json
import subprocess
import sys

import pytest
from helpers.ranks import ROOT

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = pytest.mark.distributed


def run_smoke(out, *args: str, timeout: int) -> None:
    """tools/bench_speed.py --smoke (tiny shape, CPU) at budget 0.9 with `args`, its files in `out`."""
    cmd = [sys.executable, str(ROOT / "tools/bench_speed.py"), "--smoke", "--budget", "0.9", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(cpu=True), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_speed_smoke(tmp_path):
    # --budget 0.9: a tiny CPU model's timed calibration is noisy (a busy machine rated the cheapest plan at 0.78
    # of uniform); a budget it always meets keeps the smoke about the rows, not about the machine
    run_smoke(tmp_path, "--dpo", "--moe-shape", "smoke", timeout=600)
    blob = json.loads((tmp_path / "bench_speed.json").read_text())
    (result,) = blob["results"]
    assert result["probe"]["seconds"] > 0 and result["probe"]["chunked_reference_seconds"] > 0
    for mode in ("no_checkpointing", "checkpointing"):
        rows = result["modes"][mode]["rows"]
        assert {"uniform", "paper", "budget", "budget_no_prefix"} <= set(rows)
        assert {"dpo_uniform", "dpo_budget", "dpo_budget_unshared"} <= set(rows)
        assert rows["dpo_budget"]["objective"] == "dpo" and rows["dpo_budget"]["shared_prefix"]
        assert rows["dpo_uniform"]["speedup_vs_dpo_uniform"] == 1.0
        assert rows["uniform"]["speedup_vs_uniform"] == 1.0
        budget = rows["budget"]
        assert budget["predicted_step_s"] > 0 and budget["median_step_s"] > 0
        assert result["modes"][mode]["cost_model"]["calibrated"]
        # the budgeted plan was planned within its budget by the calibrated model
        assert budget["layers"] and len(budget["layers"]) <= len(rows["uniform"]["layers"])
    # uniform expert LoRA through PEFT's bank delta and through the routed path, and the expert-aware plan
    assert {"peft_uniform", "uniform", "expert_aware"} <= {r["variant"] for r in blob["moe"]}
    assert (tmp_path / "bench_speed.png").stat().st_size > 0 and "| MoE shape |" in (
        tmp_path / "bench_speed.md"
    ).read_text()


def test_bench_speed_rows_modes_and_layers_pick_what_runs(tmp_path):
    """--rows / --modes run only the rows and modes named (the DPO rows alone still get their speedups against
    dpo_uniform); --layers builds fewer layers of the shape's widths."""
    run_smoke(tmp_path, *"--dpo --layers 4 --rows dpo_uniform dpo_budget --modes checkpointing".split(), timeout=300)
    (result,) = json.loads((tmp_path / "bench_speed.json").read_text())["results"]
    assert result["layers"] == 4 and result["config"]["num_hidden_layers"] != 4
    assert list(result["modes"]) == ["checkpointing"]
    rows = result["modes"]["checkpointing"]["rows"]
    assert list(rows) == ["dpo_uniform", "dpo_budget"]
    assert rows["dpo_uniform"]["speedup_vs_dpo_uniform"] == 1.0 and "speedup_vs_uniform" not in rows["dpo_budget"]
    assert max(rows["dpo_budget"]["layers"]) < 4
    assert "| tiny (4 layers) | on | dpo_budget |" in (tmp_path / "bench_speed.md").read_text()
