"""Preference objectives under ZeRO-3 on 2 CPU ranks (tests/workers/preference_zero3.py) equal TRL's
implementation on the same batches, in fp32: each rank's loss and reward means, and the LoRA gradients DeepSpeed
reduced (the mean of the ranks' gradients), to 1e-5."""

import json
import subprocess

import pytest
import torch
from helpers.ranks import ROOT
from helpers.trl_reference import (
    cut_plan,
    preference_batch,
    set_adapter_weights,
    tiny_lm,
    tokenizer,
    trl_dpo,
    trl_simpo,
)

from aletheia_ds.adapters.attach import attach
from aletheia_ds.launchers.deepspeed import local_command, rank_env

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_preference_step_under_zero3_equals_trl(tmp_path, objective):
    tok = tokenizer()
    tiny_lm(len(tok)).save_pretrained(str(tmp_path / "model"))
    out = tmp_path / "result.json"
    cmd = local_command(
        str(ROOT / "tests/workers/preference_zero3.py"), [str(out), str(tmp_path / "model"), objective], 2
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(cpu=True), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["zero_stage"] == 3

    from transformers import AutoModelForCausalLM

    references = []
    for rank in range(2):
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
        _, plan = cut_plan(base, 2)
        peft_model = attach(base, plan)
        set_adapter_weights(peft_model)
        batch = preference_batch(tok, 3 * rank, 3)
        if objective == "dpo":
            references.append(trl_dpo(peft_model, tok, batch, 0.3, tmp_path / f"trl{rank}"))
        else:
            references.append(trl_simpo(peft_model, tok, batch, 2.0, 0.4, 0.5, tmp_path / f"trl{rank}"))
    for mine, theirs in zip(result["ranks"], references):
        for key in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    assert abs(references[0]["reward_margin"]) > 1e-4
    assert result["grads"].keys() == references[0]["grads"].keys()
    for name, grad in result["grads"].items():
        expected = (references[0]["grads"][name] + references[1]["grads"][name]) / 2
        assert torch.allclose(torch.tensor(grad), expected, rtol=1e-5, atol=1e-7), name
