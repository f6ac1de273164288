"""Preference objectives (train.objective=dpo/simpo) against TRL's implementation on the same batch, in fp32:
loss, reward means and every LoRA gradient to 1e-5; the reference is the base with the adapters disabled; with a
frozen prefix the reference's prefix pass is shared with the policy (same numbers, the prefix run once); the probe
measures the DPO loss's gradient (brute-force autograd with a real reference pass as the reference)."""

import copy
import json

import pytest
import torch
from helpers.families import tiny_model
from helpers.trl_reference import (
    PREFERENCES as PREFS,
)
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
from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, load_config
from aletheia_ds.data import IGNORE, PreferencePair, Tokenize, collate, load_examples
from aletheia_ds.execution import ExecutionOptions, prepared
from aletheia_ds.objectives import Objective, reward_metrics, router_aux_loss_coef, sequence_logps
from aletheia_ds.probe.run import run_probe

TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # torch.allclose
APPROX = dict(rel=1e-5, abs=1e-6)  # pytest.approx, the same bounds


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def ours(model, layout, plan, batch, objective, shared_prefix=True, router_aux=0.0):
    """aletheia_ds's loss, reward means and LoRA gradients, through the training path's objective_loss."""
    options = ExecutionOptions(shared_prefix=shared_prefix)
    with prepared(model, plan, layout, options) as run:
        set_adapter_weights(run.peft_model)
        run.peft_model.train()
        forward = lambda inputs: run.peft_model(**inputs, use_cache=False)  # noqa: E731
        loss, out = run.objective_loss(forward, batch, objective, router_aux)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in run.peft_model.named_parameters() if p.grad is not None}
        return {"loss": float(loss.detach()), **reward_metrics(out.sums()), "grads": grads}


def trl_model(base, plan):
    peft_model = attach(copy.deepcopy(base), plan)
    set_adapter_weights(peft_model)
    return peft_model


def assert_same(mine: dict, theirs: dict):
    assert mine["loss"] == pytest.approx(theirs["loss"], **APPROX)
    for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        assert mine[key] == pytest.approx(theirs[key], **APPROX), key
    assert mine["grads"].keys() == theirs["grads"].keys() and mine["grads"]
    for name, grad in theirs["grads"].items():
        assert torch.allclose(mine["grads"][name], grad, **TOLERANCE), name
    # not a trivially equal pair: the adapters moved the policy away from the reference
    assert abs(theirs["reward_margin"]) > 1e-4 and any(g.abs().max() > 0 for g in theirs["grads"].values())


@pytest.mark.parametrize("lowest", [0, 2])
def test_dpo_equals_trl(tok, tmp_path, lowest):
    base = tiny_lm(len(tok))
    layout, plan = cut_plan(base, lowest)
    batch = preference_batch(tok, 0, 3)
    mine = ours(copy.deepcopy(base), layout, plan, batch, Objective("dpo", beta=0.3))
    theirs = trl_dpo(trl_model(base, plan), tok, batch, beta=0.3, out_dir=tmp_path)
    assert_same(mine, theirs)


@pytest.mark.parametrize("cpo_alpha", [0.0, 0.5])
def test_simpo_equals_trl(tok, tmp_path, cpo_alpha):
    base = tiny_lm(len(tok))
    layout, plan = cut_plan(base, 1)
    batch = preference_batch(tok, 3, 3)
    objective = Objective("simpo", beta=2.0, simpo_gamma=0.4, cpo_alpha=cpo_alpha)
    mine = ours(copy.deepcopy(base), layout, plan, batch, objective)
    theirs = trl_simpo(trl_model(base, plan), tok, batch, 2.0, 0.4, cpo_alpha, tmp_path)
    assert_same(mine, theirs)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("lowest", [0, 2])
def test_moe_dpo_with_the_router_load_balancing_loss_equals_trl(tok, tmp_path, family, lowest):
    """Mixture-of-experts models: TRL adds the architecture's router_aux_loss_coef x the policy's load-balancing
    loss (over every layer's routers); so does the training step, with the prefix's routers run again."""
    base = tiny_model(family, vocab_size=len(tok))
    coef = router_aux_loss_coef(base.config, None)
    assert coef > 0
    layout, plan = cut_plan(base, lowest)
    batch = preference_batch(tok, 0, 3)
    mine = ours(copy.deepcopy(base), layout, plan, batch, Objective("dpo", beta=0.3), False, router_aux=coef)
    theirs = trl_dpo(trl_model(base, plan), tok, batch, beta=0.3, out_dir=tmp_path)
    assert_same(mine, theirs)
    # the term is there: without it the loss is TRL's less coef x the load-balancing loss
    plain = ours(copy.deepcopy(base), layout, plan, batch, Objective("dpo", beta=0.3), False)
    assert plain["loss"] < mine["loss"] - 1e-4


@pytest.mark.parametrize("lowest", [0, 2])
def test_moe_sft_step_adds_the_models_own_load_balancing_loss(tok, lowest):
    """SFT: the step's loss is transformers' own loss with router logits asked for (token loss + the model's
    router_aux_loss_coef x its load-balancing loss over every layer, as TRL's SFTTrainer trains), also with the
    frozen prefix's routers run under no_grad."""
    base = tiny_model("qwen3_moe", vocab_size=len(tok))
    base.router_aux_loss_coef = 0.05  # what Run.setup sets from train.router_aux_loss_coef
    layout, plan = cut_plan(base, lowest)
    ids = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    reference = base(**batch, output_router_logits=True)  # adapters start at B = 0: the same function
    assert reference.aux_loss > 0
    with prepared(copy.deepcopy(base), plan, layout, ExecutionOptions()) as run:
        run.peft_model.train()
        loss, _ = run.objective_loss(lambda inputs: run.peft_model(**inputs), batch, Objective("sft"), 0.05)
        plain, _ = run.objective_loss(lambda inputs: run.peft_model(**inputs), batch, Objective("sft"))
    assert float(loss) == pytest.approx(float(reference.loss), rel=1e-6)
    assert float(loss) == pytest.approx(float(plain) + 0.05 * float(reference.aux_loss), rel=1e-6)


def test_router_aux_loss_coef_is_the_architectures_unless_set():
    moe, dense = tiny_model("mixtral").config, tiny_model("llama").config
    assert router_aux_loss_coef(moe, None) == moe.router_aux_loss_coef == 0.001
    assert router_aux_loss_coef(moe, 0.0) == 0.0 and router_aux_loss_coef(moe, 0.02) == 0.02
    assert router_aux_loss_coef(dense, None) == 0.0 == router_aux_loss_coef(dense, 0.0)
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        router_aux_loss_coef(dense, 0.01)


def test_shared_prefix_runs_the_prefix_once(tok):
    """Same loss and gradients with and without sharing; the prefix layers compute once per step instead of
    twice (the saving: one prefix forward, lowest / num_layers of a forward pass)."""
    base = tiny_lm(len(tok))
    layout, plan = cut_plan(base, 2)
    batch = preference_batch(tok, 0, 2)
    results, calls = {}, {}
    for shared in (False, True):
        model = copy.deepcopy(base)
        layers = model.get_submodule(layout.layers_path)
        counted = {i: 0 for i in range(layout.num_layers)}
        for index, layer in enumerate(layers):
            attention = layer.self_attn  # a pass-through layer skips its attention
            attention.register_forward_hook(lambda *_a, i=index: counted.__setitem__(i, counted[i] + 1))
        results[shared] = ours(model, layout, plan, batch, Objective("dpo"), shared_prefix=shared)
        calls[shared] = counted
    assert calls[False] == {i: 2 for i in range(layout.num_layers)}
    assert calls[True] == {0: 1, 1: 1, 2: 2, 3: 2}
    assert results[True]["loss"] == results[False]["loss"]
    for name, grad in results[False]["grads"].items():
        assert torch.equal(results[True]["grads"][name], grad), name


def test_probe_measures_the_dpo_gradient(tok):
    """Probe norms with objective dpo = ||dL_dpo/dW|| from autograd, with the reference as a real second
    (no_grad) pass; and they are not the SFT probe's."""
    model = tiny_lm(len(tok))
    layout = describe(model)
    batches = [preference_batch(tok, 0, 2), preference_batch(tok, 2, 2)]
    objective = Objective("dpo", beta=0.2)
    report = run_probe(model, layout, batches, lambda b: objective.start_loss(model, b))
    sft = run_probe(model, layout, batches, lambda b: model(**b, use_cache=False).loss)

    expected = {}
    modules = list(layout.iter_modules(model))
    for _, _, module in modules:
        module.weight.requires_grad_(True)
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            reference = sequence_logps(model(**inputs).logits, batch["labels"])
        loss = objective.loss(model(**inputs).logits, batch["labels"], reference).loss
        grads = torch.autograd.grad(loss, [m.weight for _, _, m in modules])
        for (layer, target, _), grad in zip(modules, grads):
            expected.setdefault((layer, target.key), []).append(float(grad.double().square().sum()))
    for _, _, module in modules:
        module.weight.requires_grad_(False)
    differs = False
    for layer in report.layers:
        for key, score in layer.modules.items():
            rms = (sum(expected[(layer.index, key)]) / len(batches)) ** 0.5
            assert score == pytest.approx(rms, rel=1e-4), (layer.index, key)
            differs |= abs(score - sft.layers[layer.index].modules[key]) > 1e-3 * max(score, 1e-12)
    assert differs


def test_preference_rows_tokenized_with_the_prompt_masked(tok, tmp_path):
    tokenize = Tokenize(tok, 64)
    pair = tokenize({"prompt": "Question: 2 + 2?\nAnswer:", "chosen": " 4.", "rejected": " 5."}, "f:1", "preference")
    prompt = list(tok("Question: 2 + 2?\nAnswer:", add_special_tokens=True)["input_ids"])
    for side, text in ((pair.chosen, " 4."), (pair.rejected, " 5.")):
        completion = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        assert side.input_ids == prompt + completion
        assert side.labels == [IGNORE] * len(prompt) + completion
    chat = tokenize(
        {
            "prompt": [{"role": "user", "content": "2 + 2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        "f:2",
        "preference",
    )
    rendered = tok.apply_chat_template([{"role": "user", "content": "2 + 2?"}], add_generation_prompt=True)
    prompt_ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert chat.chosen.input_ids[: len(prompt_ids)] == prompt_ids
    assert chat.chosen.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert tok.decode([t for t in chat.chosen.labels if t != IGNORE]).startswith("4")
    batch = collate([pair, chat], tok.pad_token_id)  # TRL's layout: chosen rows, then rejected rows
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, : len(pair.chosen.input_ids)].tolist() == pair.chosen.input_ids
    assert batch["input_ids"][2, : len(pair.rejected.input_ids)].tolist() == pair.rejected.input_ids

    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"prefs.jsonl:1: .*'rejected' is missing"):
        load_examples(path, tok, 64)
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(ConfigError, match=r"prefs.jsonl:1: field 'chosen' must be chat messages"):
        load_examples(path, tok, 64)
    assert isinstance(load_examples(PREFS, tok, 48, max_examples=2)[0], PreferencePair)


def test_preference_objective_refuses_single_row_paths():
    for knob in ("data.packing=true", "data.cache_dir=/tmp/x", "train.prefix_cache=true"):
        with pytest.raises(ConfigError, match=rf"^command line: {knob.split('=')[0]}: not supported with "):
            load_config(["train.objective=dpo", knob])
    assert load_config(["train.objective=simpo", "train.beta=2.5"]).train.beta == 2.5
