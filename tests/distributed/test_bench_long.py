"""tools/bench_long.py end to end on 2 CPU ranks: the tiny shape under sequence parallelism 2 with checkpointing and
the tiled MLP, then a call whose runs cannot finish (one-second limit): the failure is recorded, longer lengths of that
arm are not tried, and the earlier row stays."""

import json
import statistics
import subprocess
import sys

import pytest
from helpers.ranks import ROOT, read_jsonl

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = pytest.mark.distributed


def _bench(out, *args):
    cmd = [sys.executable, "tools/bench_long.py", "--shape", "tiny", "--cpu", "--gpus", "2", "--sp", "2"]
    cmd += ["--arms", "budget", "--steps", "2", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=rank_env(cpu=True), capture_output=True, text=True, timeout=400)


@pytest.mark.timeout(600)
def test_long_context_bench_on_two_cpu_ranks(tmp_path):
    out = tmp_path / "long"
    proc = _bench(out, "--seq-lens", "128")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "long.json").read_text())
    assert result["meta"]["checkpointing"] and result["meta"]["tiled_mlp"] and not result["failed"]
    (row,) = result["rows"]
    run = out / "budget_128"
    config = (out / "run_128.yaml").read_text()
    assert "gradient_checkpointing: true" in config and "sequence_parallel_size: 2" in config
    assert "tiled MLP: 6 blocks" in (run / "log.txt").read_text()
    steps = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    # each rank draws one 128-token example per step and its group of 2 runs both, each split over the 2 ranks
    assert row["tokens_per_step"] == pytest.approx(2 * 128, rel=0.01)
    assert row["tokens_per_s_per_gpu"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in steps[1:]) / 2)

    proc = _bench(out, "--seq-lens", "256", "512", "--timeout", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "budget 512: not tried (budget failed at 256 tokens)" in proc.stdout
    result = json.loads((out / "long.json").read_text())
    assert [r["seq_len"] for r in result["rows"]] == [128]
    assert [(f["seq_len"], f["error"]) for f in result["failed"]] == [(256, "timed out after 1 s")]
    assert "| budget | 256 | failed: timed out after 1 s |" in (out / "long.md").read_text()
