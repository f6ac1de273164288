"""The whole job under real DeepSpeed on CPU ranks: probe equals one process, adapter reloads with PEFT."""

import json

import pytest
import torch
from helpers.ranks import (
    ROOT,
    evaluate_tiny_run,
    read_jsonl,
    run_train,
    save_tiny_llama,
    single_process_probe,
    tiny_run_config,
)

from aletheia_ds.adapters.attach import adapter_modules
from aletheia_ds.plan import Plan

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("variant", ["zero3_two_ranks", "zero2_one_process_checkpointing_packing"])
def test_probe_plan_train_export(tmp_path, variant):
    model_dir = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "run"
    if variant == "zero3_two_ranks":
        cfg = tiny_run_config(model_dir, out)
        proc = run_train(cfg, tmp_path, nprocs=2)
        # 3 probe batches dealt over 2 ranks: rank 0's progress lines count its 2, and the summary says so
        assert "probe: 3 batches over 2 ranks (2 on rank 0), " in proc.stdout, proc.stdout[-3000:]
        assert "\nprobe, rank 0 of 2 2/2 " in proc.stdout, proc.stdout[-3000:]
    else:
        cfg = tiny_run_config(
            model_dir,
            out,
            train={"gradient_checkpointing": True, "grad_accum": 2},
            data={"packing": True},
            deepspeed={"config": str(ROOT / "ds_configs/zero2.json")},
        )
        proc = run_train(cfg, tmp_path, nprocs=0)
    # nothing the user cannot act on: torch's and transformers' deprecation notices about calls DeepSpeed and PEFT
    # make (one per step before), DeepSpeed's note that it built its CPU communication op
    assert "FutureWarning" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert "built successfully" not in proc.stdout, proc.stdout[-3000:]

    # 1. probe: the sharded run equals one process on the same batches
    probe = json.loads((out / "probe.json").read_text())
    reference = single_process_probe(model_dir, cfg)
    assert probe["tokens"] == reference.tokens and probe["num_layers"] == 4
    for got, want in zip(probe["layers"], reference.layers):
        assert got["score"] == pytest.approx(want.score, rel=1e-5)
        for key, value in want.modules.items():
            assert got["modules"][key] == pytest.approx(value, rel=1e-5)
        for kind in ("signal", "lowrank", "weight_norm"):  # sketches and weight norms sum over ranks like norms
            for key, value in getattr(want, kind).items():
                assert got[kind][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (kind, key)

    # 2. plan: the top half of the layers by probe score, asymmetric ranks
    plan = Plan.load(out / "plan.json")
    ranked = sorted(range(4), key=lambda i: (-reference.layers[i].score, i))
    assert plan.layers == sorted(ranked[:2])

    # 3. metrics: every step logged, finite, loss goes down
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["tokens_per_s"] > 0 for r in rows)

    # 4. the exported adapter, reloaded by plain PEFT: planned modules only, no empty tensor, same logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    found = adapter_modules(tuned)
    assert found == {f"model.layers.{m.layer}.{m.path}": (m.r, m.alpha) for m in plan.modules}
    lora = {n: p for n, p in tuned.named_parameters() if "lora_" in n}
    assert lora and all(p.numel() > 0 for p in lora.values())
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # trained away from zero init
    result = evaluate_tiny_run(model_dir, out, cfg)
    assert result["logits_match"], result
    eval_json = json.loads((out / "eval.json").read_text())
    assert result["adapter_loss"] == pytest.approx(eval_json["eval_loss_after"], rel=1e-5)
    assert result["base_loss"] == pytest.approx(eval_json["eval_loss_before"], rel=1e-5)
    assert eval_json["eval_loss_after"] < eval_json["eval_loss_before"]


def test_prefix_cache_run_equals_plain_run(tmp_path):
    """Two epochs with the prefix cache give the adapter of two epochs without it."""
    from safetensors.torch import load_file

    model_dir = save_tiny_llama(tmp_path / "model")
    adapters = []
    for cache in (False, True):
        out = tmp_path / f"run-{cache}"
        cfg = tiny_run_config(
            model_dir,
            out,
            data={"max_examples": 20, "eval_batches": 1},
            plan={"rule": "upper", "top_pct": 50},
            train={"max_steps": 10, "prefix_cache": cache},
            deepspeed={"config": str(ROOT / "ds_configs/zero2.json")},
        )
        run_train(cfg, tmp_path, nprocs=0)
        adapters.append(load_file(str(out / "adapter/adapter_model.safetensors")))
        if cache:
            stats = json.loads((out / "eval.json").read_text())["prefix_cache"]
            # 20 training rows in micro-batches of 4, 10 steps = 2 epochs: epoch 1 fills, epoch 2 replays
            assert stats["examples"] == 20 and stats["replayed_micro_batches"] == 5
            assert stats["computed_micro_batches"] == 5
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        assert torch.allclose(tensor, adapters[1][name], rtol=1e-4, atol=1e-6), name
