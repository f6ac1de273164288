"""tools/bench_moe.py --smoke: both variants time real steps; the expert-aware plan adapts fewer experts."""

import json
import subprocess
import sys

import pytest
from helpers.ranks import ROOT

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = pytest.mark.distributed


def test_bench_moe_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/bench_moe.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    uniform, aware = json.loads(out.read_text())
    assert (uniform["variant"], aware["variant"]) == ("uniform", "expert_aware")
    for row in (uniform, aware):
        assert row["steps_timed"] == 3 and row["median_step_s"] > 0 and row["tokens_per_s"] > 0
    assert uniform["expert_adapters"] == uniform["experts_total"] == 16 and uniform["score_captured"] == 1.0
    assert 0 < aware["expert_adapters"] < uniform["expert_adapters"]
    assert aware["adapted_layers"] < uniform["adapted_layers"]
    assert "expert-aware vs uniform" in proc.stdout
