"""lora.variant / lora.use_rslora / lora.init on a plan's per-layer ranks, against plain PEFT: the attached adapters,
rewritten base weights, logits and LoRA gradients equal a hand-written LoraConfig's; verify_adapters catches a
wrong variant, scale or DoRA magnitude; contradictory settings are refused in one line; a PiSSA/OLoRA adapter is
exported as a plain LoRA on the original base; a DoRA adapter merges as PEFT's merge_and_unload does."""

import contextlib
import copy
import json

import pytest
import torch
from helpers.families import random_batches, tiny_model
from helpers.reports import fake_report

from aletheia_ds.adapters.attach import attach, verify_adapters
from aletheia_ds.adapters.export import export_adapter
from aletheia_ds.adapters.peft_config import build_lora_config, check_variant
from aletheia_ds.adapters.serving import serving_facts
from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, LoraSection, PlanSection, RunConfig
from aletheia_ds.merge import export_merged
from aletheia_ds.plan import make_plan

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
SECTIONS = {
    "dora_rslora": LoraSection(variant="dora", use_rslora=True),
    "rslora": LoraSection(use_rslora=True),
    "pissa": LoraSection(init="pissa"),
    "pissa_niter": LoraSection(init="pissa_niter_2"),
    "olora": LoraSection(init="olora"),
    "gaussian": LoraSection(init="gaussian"),
    "orthogonal_dora": LoraSection(init="orthogonal", variant="dora"),
}


def _plan(model, **settings):
    """Layers 1 and 3 of a tiny 4-layer model; attention r4 (alpha 8), MLP r8 (alpha 16) unless set."""
    return make_plan(
        fake_report(describe(model), [1.0, 4.0, 2.0, 3.0]),
        PlanSection(**{"top_pct": 50, "attention_r": 4, "mlp_r": 8, **settings}),
    )


def _hand_config(section: LoraSection):
    """The same adapters written as a PEFT user would, without this package's config builder."""
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ATTENTION + MLP,
        layers_to_transform=[1, 3],
        rank_pattern={name: 8 for name in MLP},
        alpha_pattern={name: 16 for name in MLP},
        use_dora=section.variant == "dora",
        use_rslora=section.use_rslora,
        init_lora_weights=True if section.init == "default" else section.init,
    )


@pytest.mark.parametrize("name", SECTIONS)
def test_variant_attaches_as_plain_peft_does(name):
    from peft import get_peft_model

    section = SECTIONS[name]
    model = tiny_model("llama")
    reference_base = copy.deepcopy(model)
    ours = attach(model, _plan(model), section)
    torch.manual_seed(section.init_seed)
    reference = get_peft_model(reference_base, _hand_config(section))

    theirs = dict(reference.named_parameters())
    for key, p in ours.named_parameters():  # adapter factors, DoRA magnitudes and the (PiSSA/OLoRA-rewritten) base
        assert torch.equal(p, theirs[key]), key
    # away from the starting point (a trained adapter), the forward and the LoRA gradients still agree
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if "lora_" in key:
                step = torch.randn(p.shape, generator=generator) * 0.05
                p.add_(step)
                theirs[key].add_(step)
    batch = random_batches(1, 2, 10, seed=2)[0]
    ours_loss = ours(**batch).loss
    their_loss = reference(**batch).loss
    ours_loss.backward()
    their_loss.backward()
    assert torch.equal(ours_loss, their_loss)
    for key, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, theirs[key].grad), key


def test_verify_catches_a_wrong_variant_scale_or_magnitude():
    from peft import get_peft_model

    model = tiny_model("llama")
    plan = _plan(model)
    plain = get_peft_model(copy.deepcopy(model), build_lora_config(plan))
    with pytest.raises(ConfigError, match="14 adapters are not lora.variant=dora"):
        verify_adapters(plain, plan, section=LoraSection(variant="dora"))
    with pytest.raises(ConfigError, match=r"wrong scale \(first: .*q_proj scale 2 \(want 4\)"):
        verify_adapters(plain, plan, section=LoraSection(use_rslora=True))
    dora = attach(model, plan, LoraSection(variant="dora"))
    with torch.no_grad():
        dora.base_model.model.model.layers[3].mlp.up_proj.lora_magnitude_vector["default"].weight[0] += 1e-3
    with pytest.raises(ConfigError, match=r"1 DoRA magnitudes are not .* \(first: .*layers\.3\.mlp\.up_proj\)"):
        verify_adapters(dora, plan, section=LoraSection(variant="dora"))


@pytest.mark.parametrize(
    "build,match",
    [
        (
            lambda: RunConfig(plan=PlanSection(rule="cut"), lora=LoraSection(use_rslora=True)),
            r"^lora.use_rslora=true: plan.rule=cut with plan.rank_scaling=rslora .* set plan.rank_scaling=standard",
        ),
        (lambda: LoraSection(init="eva"), r"^lora.init: not supported: it needs a pass over the data"),
        (lambda: LoraSection(init="pissa_niter_x"), r"^lora.init: one of default \| gaussian .* pissa_niter_K"),
        (
            lambda: LoraSection(init="pissa", variant="dora"),
            r"^lora.init=pissa with lora.variant=dora: .* keeps no DoRA magnitude",
        ),
        (
            lambda: build_lora_config(_plan(tiny_model("llama")), LoraSection(init="olora", use_rslora=True)),
            r"^lora.init=olora with lora.use_rslora=true: PEFT cannot convert",
        ),
        (
            lambda: build_lora_config(_plan(tiny_model("llama"), mlp_r=7), LoraSection(init="orthogonal")),
            r"^lora.init=orthogonal: needs even ranks, the plan has rank 7",
        ),
        (
            lambda: check_variant(
                _plan(tiny_model("llama")),
                LoraSection(variant="dora"),
                {"target_parameters": ["model.layers.1.mlp.experts.down_proj"], "rank_pattern": {}},
            ),
            r"^lora.variant=dora: PEFT supports it on linear layers only",
        ),
    ],
    ids=["rslora_twice", "eva", "bad_niter", "pissa_dora", "olora_rslora_patterns", "orthogonal_odd", "moe_dora"],
)
def test_contradictory_settings_are_one_line(build, match):
    with pytest.raises(ConfigError, match=match) as err:
        build()
    assert "\n" not in str(err.value)


def test_given_cut_plan_with_rslora_alphas_is_refused_with_use_rslora():
    """A reused plan.json brings its own rule: the check reads the plan, not plan.* of this run."""
    model = tiny_model("llama")
    plan = _plan(model)
    plan.rule, plan.settings = "cut", {**plan.settings, "rank_scaling": "rslora"}
    with pytest.raises(ConfigError, match="plan.rank_scaling=rslora already gives alpha"):
        attach(model, plan, LoraSection(use_rslora=True))
    RunConfig(plan=PlanSection(rule="cut", plan="plan.json"), lora=LoraSection(use_rslora=True))  # checked later
    RunConfig(plan=PlanSection(rule="cut", rank_scaling="standard"), lora=LoraSection(use_rslora=True))


def test_uniform_ranks_allow_olora_with_rslora():
    """Without rank or alpha patterns PEFT can convert an rsLoRA OLoRA adapter, so it is not refused."""
    model = tiny_model("llama")
    config = build_lora_config(_plan(model, mlp_r=4, mlp_alpha=8.0), LoraSection(init="olora", use_rslora=True))
    assert config.use_rslora and config.init_lora_weights == "olora" and not config.rank_pattern


def test_moe_plan_takes_rslora_on_expert_banks_and_refuses_dora():
    """Expert banks, routers and MoE-layer MLPs are PEFT parameter adapters: rsLoRA applies to them (each scale
    checked by verify_adapters), DoRA does not and is refused before PEFT sees it."""
    from aletheia_ds.adapters.attach import _param_wrappers
    from aletheia_ds.probe.run import run_probe

    model = tiny_model("qwen3_moe")
    model.requires_grad_(False)
    layout = describe(model)
    report = run_probe(model, layout, random_batches(2, 2, 12, seed=1), lambda b: model(**b, use_cache=False).loss)
    plan = make_plan(
        report, PlanSection(top_pct=50, attention_r=4, mlp_r=8, expert_r=4, expert_rule="top_k", expert_top_k=2)
    )
    assert plan.experts
    with pytest.raises(ConfigError, match=r"^lora.variant=dora: PEFT supports it on linear layers only"):
        attach(copy.deepcopy(model), plan, LoraSection(variant="dora"))
    peft_model = attach(model, plan, LoraSection(use_rslora=True))
    wrappers = _param_wrappers(peft_model)
    scales = {name: wrappers[name].scaling["default"] for _, _, _, name in plan.expert_banks("hf")}
    assert scales
    assert all(scale == pytest.approx(8.0 / 2.0) for scale in scales.values())  # alpha 8 / sqrt(r 4)


NULL_CONTEXT = type("OneProcess", (), {"is_main": True, "gathered": lambda self, params: contextlib.nullcontext()})


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_exports_a_plain_lora_on_the_original_base(tmp_path, init):
    from peft import PeftModel

    model = tiny_model("llama")
    original = copy.deepcopy(model)
    ours = attach(model, _plan(model), LoraSection(init=init))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if "lora_" in key:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    batch = random_batches(1, 2, 10, seed=5)[0]
    with torch.no_grad():
        trained = ours(**batch).logits
        base = original(**batch).logits
    rng = torch.get_rng_state()
    export_adapter(NULL_CONTEXT(), ours, tmp_path / "adapter")
    assert torch.equal(rng, torch.get_rng_state())  # a checkpoint's export leaves the training RNG alone
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16.0, True)
    assert serving_facts(tmp_path / "adapter")["max_lora_rank"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the starting adapter was scratch only
    reloaded = PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, trained, atol=1e-5)
        assert not torch.allclose(base, trained, atol=1e-3)  # the trained adapter moved the model


def test_dora_merge_equals_peft_merge_and_unload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    dora = attach(model, _plan(model), LoraSection(variant="dora", use_rslora=True))
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for key, p in dora.named_parameters():
            if "lora_" in key:  # factors and magnitudes, as training moves them
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    dora.save_pretrained(str(tmp_path / "adapter"))
    assert "DoRA adapters are served merged" in serving_facts(tmp_path / "adapter")["vllm"]

    export_merged(str(tmp_path / "model"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).state_dict()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")), str(tmp_path / "adapter")
    ).merge_and_unload(safe_merge=True)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).state_dict()
    changed = 0
    for key, want in reference.state_dict().items():
        assert torch.allclose(merged[key], want, atol=1e-6, rtol=1e-5), key
        changed += not torch.equal(want, base[key])
    assert changed == 14  # every adapted linear, and nothing else
