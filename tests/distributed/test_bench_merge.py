"""tools/bench_merge.py: the merge measured in its own process, and its logits check, which passes on a real
merge and fails when the "merged" folder is the unmerged base."""

import json
import subprocess
import sys

import pytest
import torch
from helpers.families import tiny_model


@pytest.fixture
def base_and_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny_model("qwen2", dtype=torch.bfloat16).save_pretrained(str(tmp_path / "model"), max_shard_size="20KB")
    peft_model = get_peft_model(
        tiny_model("qwen2", dtype=torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    peft_model.save_pretrained(str(tmp_path / "adapter"))  # lora_B = 0, as a run starts
    return tmp_path / "model", tmp_path / "adapter"


@pytest.mark.distributed
def test_bench_merge_measures_and_checks_logits(root, tmp_path, base_and_adapter):
    model, adapter = base_and_adapter
    out = tmp_path / "bench"
    cmd = [sys.executable, str(root / "tools/bench_merge.py"), "--model", str(model), "--adapter", str(adapter)]
    cmd += ["--out", str(out), "--random-b", "0.1", "--check-logits", "--cold"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "merge.json").read_text())
    assert result["shards"] > 3 and result["merge"]["seconds"] > 0
    assert result["merge"]["anon_gib"]["peak"] >= result["merge"]["anon_gib"]["before"] > 0
    assert result["merge"]["ru_maxrss_gib"] > 0
    check = result["logits"]
    assert check["passed"] and check["merged_dtype"] == "bfloat16" and check["top1_agreement"] > 0.9
    assert check["adapter_moves_logits_max"] > 4 * check["merged_max_abs_error"]
    assert not (out / "merged").exists()  # deleted unless --keep-merged
    assert "| passed (error < effect / 4) |" in (out / "merge.md").read_text()


def test_logits_check_fails_when_the_adapter_is_missing_from_the_merge(tmp_path, base_and_adapter):
    """The check can fail: the base itself, offered as the merged model, is off by the adapter's whole effect."""
    from bench_merge import check_logits, randomised_adapter

    model, adapter = base_and_adapter
    adapter = randomised_adapter(adapter, tmp_path / "random_b", 0.1)
    check = check_logits(model, adapter, model, seq_len=12, batch=2)
    assert not check["passed"]
    assert check["merged_max_abs_error"] == pytest.approx(check["adapter_moves_logits_max"], rel=0.05)
