"""MoE under real DeepSpeed ZeRO-3 on 2 CPU ranks (every parameter partitioned).

One launch of tests/workers/moe_zero3_worker.py (about half a minute) serves the first four tests: per-expert
probes of five MoE families equal brute-force autograd on one process; on a model whose two ranks route their tokens
to disjoint experts, the probe still equals one process, training touches exactly the planned experts and
the exported adapter reloads with plain PEFT; the routed expert forward trains as PEFT's bank deltas do, with a
frozen prefix below the cut; transformers-4-style blocks (only experts that receive tokens
run) complete because the MoE blocks are ZeRO-3 leaves. A hang fails the run at its timeout.
"""

import json
import os
import signal
import subprocess

import pytest
import torch
from helpers.families import MOE, ListExpertsMoe, random_batches, routed_experts, split_routing_model, tiny_model
from helpers.moe_reference import assert_experts_match, brute_force_moe
from helpers.ranks import ROOT

from aletheia_ds.adapters.attach import adapter_modules, expert_deltas
from aletheia_ds.arch import describe
from aletheia_ds.launchers.deepspeed import local_command, rank_env
from aletheia_ds.plan import Plan
from aletheia_ds.probe.report import ProbeReport

pytestmark = pytest.mark.distributed

WORKER = str(ROOT / "tests/workers/moe_zero3_worker.py")
TIMEOUT_S = 420


def launch_worker(models, out, *flags, timeout=TIMEOUT_S) -> tuple[int | None, str]:
    """Run the worker on 2 ranks in its own process group; (None, output) when it outlives `timeout`."""
    cmd = local_command(WORKER, ["--models", str(models), "--out", str(out), *flags], 2)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=rank_env(cpu=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: nothing outlives the test
        output, _ = proc.communicate()
        return None, output


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_models")
    for family in MOE:
        tiny_model(family).save_pretrained(str(root / "probe" / family))
    split_routing_model("qwen3_moe").save_pretrained(str(root / "split"))
    return root


@pytest.fixture(scope="module")
def zero3_run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_zero3")
    code, output = launch_worker(models, out)
    assert code is not None, f"ZeRO-3 MoE run hung for {TIMEOUT_S} s:\n{output[-4000:]}"
    assert code == 0, f"ZeRO-3 MoE run failed ({code}):\n{output[-6000:]}"
    return out, output


def load_reference_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("family", list(MOE))
def test_two_zero3_ranks_probe_experts_like_brute_force_on_one_process(zero3_run, models, family):
    from workers.moe_zero3_worker import PROBE_BATCHES

    out, _ = zero3_run
    report = ProbeReport.load(out / f"probe_{family}.json")
    assert report.world_size == 2
    model = load_reference_model(models / "probe" / family)
    assert_experts_match(report, brute_force_moe(model, describe(model), random_batches(**PROBE_BATCHES)))


def test_ranks_routing_to_disjoint_experts_probe_train_and_export_exactly(zero3_run, models):
    from peft import PeftModel
    from workers.moe_zero3_worker import SPLIT_HIGH, SPLIT_LOW, split_probe_batches, split_train_batches

    out, output = zero3_run
    model = load_reference_model(models / "split")
    # the data really splits: rank 0's tokens reach experts {0, 1} only, rank 1's {2, 3} only, in every layer
    for rank, want in ((0, {0, 1}), (1, {2, 3})):
        for batch in split_train_batches(rank):
            assert set(map(frozenset, routed_experts(model, batch).values())) == {frozenset(want)}
    assert SPLIT_LOW[1] == SPLIT_HIGH[0]

    # probe on 2 ranks (each its own half of the batches) == brute force over all batches on one process
    layout = describe(model)
    report = ProbeReport.load(out / "probe_split.json")
    assert_experts_match(report, brute_force_moe(model, layout, split_probe_batches()))

    # training touched exactly the planned experts: reload the saved adapter with plain PEFT and read it
    plan = Plan.load(out / "plan.json")
    planned = {(e.layer, e.expert) for e in plan.experts}
    assert {e // 2 for _, e in planned} == {0, 1}, "experts of both ranks' pairs should be planned"
    assert all(len(group) == 3 for group in plan.experts_by_layer().values())  # one expert per layer left out
    tuned = PeftModel.from_pretrained(load_reference_model(models / "split"), str(out / "adapter"))
    live = {
        (int(name.split(".")[2]), e)
        for name, norms in expert_deltas(tuned).items()
        for e, norm in enumerate(norms)
        if norm > 0
    }
    assert live == planned
    assert set(adapter_modules(tuned)) >= {f"model.layers.{m.layer}.{m.path}" for m in plan.modules}
    from aletheia_ds.io import load_safetensors

    saved = load_safetensors(out / "logits.safetensors")
    with torch.no_grad():
        logits = tuned(
            input_ids=saved["input_ids"],
            attention_mask=saved["attention_mask"],
            labels=saved["labels"],
            use_cache=False,
        ).logits
    assert torch.allclose(logits, saved["logits"], atol=1e-5)


def test_routed_expert_forward_trains_like_peft_bank_deltas_under_zero3_with_a_frozen_prefix(zero3_run):
    """Same start, batches and plan (upper half of the layers: a frozen prefix below the cut), 2 ZeRO-3 ranks
    routing to disjoint experts: the routed expert forward gives PEFT's losses and adapter."""
    from safetensors.torch import load_file

    out, _ = zero3_run
    runs = {f: json.loads((out / "routed_vs_peft" / f / "run.json").read_text()) for f in ("routed", "peft")}
    assert runs["routed"]["plan_layers"] == runs["peft"]["plan_layers"] and min(runs["routed"]["plan_layers"]) > 0
    assert len(runs["routed"]["routed"]) == len(runs["routed"]["plan_layers"]) and runs["peft"]["routed"] == []
    assert runs["routed"]["rank0_losses"] == pytest.approx(runs["peft"]["rank0_losses"], rel=1e-5)
    routed, peft = (load_file(str(out / "routed_vs_peft" / f / "adapter_model.safetensors")) for f in runs)
    assert routed.keys() == peft.keys()
    trained_experts = [k for k in routed if "experts" in k and "lora_B" in k]
    assert trained_experts and all(routed[k].abs().max() > 0 for k in trained_experts)
    # AdamW divides by the gradients' running RMS, so float rounding in the near-zero gradients of some
    # attention factors reaches the weights as ~1e-6 (one step moves them by up to lr = 0.02)
    for key in routed:
        assert torch.allclose(routed[key], peft[key], rtol=1e-4, atol=2e-5), key


def test_list_expert_blocks_routing_apart_complete_as_zero3_leaves(zero3_run):
    _, output = zero3_run
    assert "rank 0 list-experts forward done; experts run: [0, 1]" in output
    assert "rank 1 list-experts forward done; experts run: [2, 3]" in output
    assert ListExpertsMoe.__name__ in (ROOT / "tests/workers/moe_zero3_worker.py").read_text()


@pytest.mark.slow
def test_without_leaf_modules_list_expert_blocks_do_not_complete(models, tmp_path):
    """The same forward passes without the z3 leaf setting: ZeRO-3 gathers different experts on the two
    ranks. DeepSpeed 0.19 notices the mismatched module order and raises; older versions hang (caught by
    the timeout). Either way the run must not complete."""
    code, output = launch_worker(models, tmp_path, "--only-list", "--no-leaf", timeout=180)
    assert code != 0, output[-3000:]
    assert "list-experts forward done; experts run: [2, 3]" not in output
    if code is not None:
        assert "disagreement" in output or "Connection" in output, output[-3000:]


def test_whole_job_on_a_deepseek_style_model(tmp_path):
    """launch/train.py end to end (one process, ZeRO-3): dense first layer, shared experts, expert plan, export,
    plain-PEFT reload with the same logits, expert heat map."""
    from helpers.ranks import evaluate_tiny_run, run_train, tiny_run_config

    model_dir = tmp_path / "model"
    tiny_model("deepseek_v3", vocab_size=512).save_pretrained(str(model_dir))
    out = tmp_path / "run"
    cfg = tiny_run_config(
        model_dir,
        out,
        plan={
            "top_pct": 50,
            "attention_r": 4,
            "mlp_r": 8,
            "expert_r": 4,
            "expert_rule": "energy",
            "expert_energy": 0.6,
        },
        train={"max_steps": 4},
    )
    run_train(cfg, tmp_path, nprocs=0, timeout=TIMEOUT_S)
    probe = json.loads((out / "probe.json").read_text())
    assert {e["layer"] for e in probe["experts"]} == {1, 2, 3} and set(probe["routers"]) == {"1", "2", "3"}
    assert (out / "experts.png").stat().st_size > 0
    plan = Plan.load(out / "plan.json")
    assert plan.experts and all(len(g) < 4 for g in plan.experts_by_layer().values())
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(load_reference_model(model_dir), str(out / "adapter"))
    live = {
        (int(name.split(".")[2]), e)
        for name, norms in expert_deltas(tuned).items()
        for e, norm in enumerate(norms)
        if norm > 0
    }
    assert live == {(e.layer, e.expert) for e in plan.experts}
    result = evaluate_tiny_run(model_dir, out, cfg)
    assert result["logits_match"], result
