"""PEFT variants (lora.variant / lora.use_rslora / lora.init) trained under ZeRO-3 on 2 CPU ranks, each checked
against plain PEFT on the unpartitioned base: the adapters as attached leave the model's function unchanged (the
held-out loss before training equals the base model's: DoRA's magnitudes and PiSSA/OLoRA's rewritten base weights
were formed from gathered weights), the exported adapter reloads with PeftModel.from_pretrained on the original
base and gives the trained run's logits, and the merged export gives the same logits again."""

import json
import subprocess
import sys

import pytest
import torch
from helpers.ranks import ROOT, evaluate_tiny_run, read_jsonl, run_train, save_tiny_llama, tiny_run_config

from aletheia_ds.launchers.deepspeed import rank_env
from aletheia_ds.plan import Plan

pytestmark = pytest.mark.distributed


VARIANTS = [{"variant": "dora", "use_rslora": True}, {"init": "pissa_niter_4"}, {"init": "olora"}]
VARIANT_IDS = ["dora_rslora", "pissa", "olora"]


@pytest.mark.parametrize("lora", VARIANTS, ids=VARIANT_IDS)
def test_variant_trains_under_zero3_reloads_and_merges(tmp_path, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "run"
    cfg = tiny_run_config(model_dir, out, lora=lora, train={"max_steps": 4})
    run_train(cfg, tmp_path, nprocs=2, timeout=900)

    plan = Plan.load(out / "plan.json")
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_config["use_dora"] == (lora.get("variant") == "dora")
    assert adapter_config["use_rslora"] == lora.get("use_rslora", False)
    ranks = {m.r for m in plan.modules}
    if "init" in lora:  # converted to a plain LoRA of rank 2r on the original base: [A; A0], [B, -B0]
        assert adapter_config["init_lora_weights"] is True
        assert {adapter_config["r"], *adapter_config["rank_pattern"].values()} == {2 * r for r in ranks}
        # the starting factors PiSSA/OLoRA took from the gathered weights under ZeRO-3 are plain PEFT's own, with
        # the same LoraConfig on the unpartitioned base (same seed: pissa_niter_K draws random projections)
        from peft import LoraConfig, get_peft_model
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        torch.manual_seed(0)  # lora.init_seed
        reference = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(model_dir)),
            LoraConfig(task_type="CAUSAL_LM", init_lora_weights=lora["init"], **plan_lora_config(out)),
        )
        start = get_peft_model_state_dict(reference)
        saved = load_file(str(out / "adapter/adapter_model.safetensors"))
        assert saved.keys() == start.keys()
        for name, first in start.items():
            half = saved[name][first.shape[0] :] if ".lora_A." in name else -saved[name][:, first.shape[1] :]
            assert torch.allclose(half, first, atol=1e-5), name
    else:
        assert {adapter_config["r"], *adapter_config["rank_pattern"].values()} == ranks
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)

    result = evaluate_tiny_run(model_dir, out, cfg)
    eval_json = json.loads((out / "eval.json").read_text())
    # attached under ZeRO-3, the adapters leave the model as it was: the base model's loss, from plain transformers
    assert eval_json["eval_loss_before"] == pytest.approx(result["base_loss"], rel=1e-5)
    # the trained ZeRO-3 model's logits, from the exported adapter on the original (unpartitioned) base
    assert result["logits_match"], result
    assert result["adapter_loss"] == pytest.approx(eval_json["eval_loss_after"], rel=1e-5)
    assert eval_json["eval_loss_after"] < eval_json["eval_loss_before"]

    merged_dir = tmp_path / "merged"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "aletheia_ds.cli",
            "export",
            "--model",
            str(model_dir),
            "--adapter",
            str(out / "adapter"),
        ]
        + ["--out", str(merged_dir), "--merge"],
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out / "adapter"))
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(base, want, atol=1e-4)  # training moved the model: the comparison has teeth


@pytest.mark.gpu
@pytest.mark.parametrize("lora", VARIANTS, ids=VARIANT_IDS)
def test_variant_on_two_gpus_zero3_bf16(tmp_path, lora):
    """The same job on 2 GPUs (NCCL, bf16): DoRA's magnitudes and PiSSA/OLoRA's residual base weights are formed
    in PEFT's gather and kept in bf16, so the checks hold up to bf16 rounding."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    model_dir = save_tiny_llama(tmp_path / "model", layers=6)
    out = tmp_path / "run"
    cfg = tiny_run_config(model_dir, out, lora=lora, train={"max_steps": 8})
    run_train(cfg, tmp_path, nprocs=2, timeout=900, env=rank_env(cpu=False))
    result = evaluate_tiny_run(model_dir, out, cfg)
    eval_json = json.loads((out / "eval.json").read_text())
    print(
        f"{lora}: before {eval_json['eval_loss_before']:.5f} (base {result['base_loss']:.5f}), after "
        f"{eval_json['eval_loss_after']:.5f} (reloaded {result['adapter_loss']:.5f}), logits max abs diff "
        f"{result['logits_max_abs_diff']:.4f}"
    )
    assert eval_json["eval_loss_before"] == pytest.approx(result["base_loss"], rel=1e-2)
    assert result["adapter_loss"] == pytest.approx(eval_json["eval_loss_after"], rel=1e-2)
    assert result["logits_max_abs_diff"] < 0.1, result  # the run in bf16, the reload in float32
    assert result["adapter_loss"] < result["base_loss"]


def plan_lora_config(out) -> dict:
    """The LoraConfig fields the run recorded in plan.json."""
    return json.loads((out / "plan.json").read_text())["lora_config"]


@pytest.mark.parametrize("init", ["pissa_niter_4", pytest.param("olora", marks=pytest.mark.slow)])
def test_base_rewriting_init_resumed_midway_equals_the_uninterrupted_run(tmp_path, init):
    """PiSSA/OLoRA rewrite the base weights (W - s B0 A0) when the adapters are attached. A checkpoint holds the
    trained factors only: a resumed run rebuilds the rewritten base by attaching again, from the base on disk
    (which the checkpoint's model fingerprint pins) with the same seed, so it must go on exactly as the run that
    never stopped (in which the rewritten base lived on in memory)."""
    from safetensors.torch import load_file

    model_dir = save_tiny_llama(tmp_path / "model")
    whole = tmp_path / "whole"
    # lora.dropout > 0: a resumed run that did not restore the RNG state would draw other masks
    cfg = tiny_run_config(
        model_dir,
        whole,
        lora={"init": init, "dropout": 0.1},
        train={"max_steps": 4, "save_every": 2, "keep_last": 2},
    )
    run_train(cfg, tmp_path, nprocs=2, timeout=900)
    # the uninterrupted run's checkpoint of step 2, continued by a new job into another output_dir: the new
    # processes know only what the checkpoint and the base on disk hold
    resumed = tmp_path / "resumed"
    checkpoint = whole / "checkpoints" / "step-00000002"
    proc = run_train(
        {**cfg, "train": {**cfg["train"], "output_dir": str(resumed)}},
        tmp_path,
        nprocs=2,
        timeout=900,
        extra=["--resume", str(checkpoint)],
    )
    assert f"resume: {checkpoint}, step 2 of 4" in proc.stdout and "probe:" not in proc.stdout

    rows, want = read_jsonl(resumed / "metrics.jsonl"), read_jsonl(whole / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in want]  # bitwise
    got, expected = (json.loads((d / "eval.json").read_text()) for d in (resumed, whole))
    assert got["eval_loss_before"] == expected["eval_loss_before"]
    assert got["eval_loss_after"] == expected["eval_loss_after"]
    tensors, ref_tensors = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (resumed, whole))
    assert tensors.keys() == ref_tensors.keys() and all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    # the converted export ([A; A0], [B, -B0]) on the original base gives the resumed run's own logits
    result = evaluate_tiny_run(model_dir, resumed, cfg)
    assert result["logits_match"], result
    assert result["adapter_loss"] == pytest.approx(got["eval_loss_after"], rel=1e-5)

    if init == "olora":  # the refusal below is the same code path for both inits
        return
    # starting factors that come out otherwise on resume (another device's SVD, another PEFT) would rebuild another
    # base under the checkpoint's trained factors: refused in one line, before training
    other = tmp_path / "other"
    proc = run_train(
        {**cfg, "train": {**cfg["train"], "output_dir": str(other)}},
        tmp_path,
        nprocs=2,
        timeout=900,
        extra=["--resume", str(checkpoint)],
        script="tests/workers/other_initial_factors.py",
        check=False,
    )
    errors = sorted({line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.startswith("error:")})
    assert proc.returncode == 2 and len(errors) == 1, (proc.stdout + proc.stderr)[-3000:]
    assert errors[0].startswith(f"error: train.resume: {checkpoint}: lora.init={init} rewrote the base weights")
    assert "cannot be rebuilt exactly" in errors[0] and not (other / "metrics.jsonl").exists()
