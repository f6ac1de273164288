"""tools/bench_data.py on 2 CPU ranks: the tokenize-once cache memory-mapped by both."""

import json
import subprocess
import sys

import pytest


@pytest.mark.distributed
def test_bench_data_runs_on_two_ranks(root, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "tools/bench_data.py"),
            "--rows",
            "300",
            "--ranks",
            "2",
            "--num-proc",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "data.json").read_text())
    assert [r["examples"] for r in result["runs"]["cached"]] == [300, 300]
    assert all(r["peak_rss_gib"] < 1 for r in result["runs"]["cached"])
