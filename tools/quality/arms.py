"""The arms: which layers get LoRA at which rank; one run = one (base, arm, seed, learning rate).

Every arm starts from the same frozen base, trains on the same rows in the same order for the same steps
(linear warm-up, then a constant learning rate, so every point of a learning curve is a fair place to
stop: the equal-wall-clock comparison reads curves), evaluated on the same held-out rows. Plans come from
the package (make_plan, pilot_plan); execution.PreparedModel attaches the adapters and runs the layers below
the lowest adapted one under no_grad (its FrozenPrefix, moved up after a pilot). A run writes one JSON record;
the report stage reads them all.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from aletheia_ds.arch import describe
from aletheia_ds.config import ConfigError, LoraSection, PlanSection
from aletheia_ds.cost import CostModel
from aletheia_ds.data import StepSchedule, collate, fixed_batches
from aletheia_ds.evaluate import held_out_loss
from aletheia_ds.execution import ExecutionOptions, FrozenPrefix, PreparedModel
from aletheia_ds.io import write_json_atomic
from aletheia_ds.plan import Plan, captured, make_plan
from aletheia_ds.probe.report import ProbeReport
from tools.quality.pretrain import autocast, corpus_loss
from tools.quality.settings import Settings
from tools.quality.tasks import TASKS_BY_NAME, TaskData


class Unavailable(Exception):
    """This package version cannot build the arm (e.g. a rule it does not have); the study notes and skips it."""


@dataclass(frozen=True)
class Arm:
    label: str
    build: Callable[[ProbeReport, CostModel, Settings, dict, list], Plan]
    lora: dict = field(default_factory=dict)  # LoraSection fields of this arm's adapters besides init_seed


def _section(s: Settings, **fields) -> PlanSection:
    try:
        return PlanSection(**fields)
    except Exception as err:  # pydantic rejects a rule or field this version lacks
        raise Unavailable(f"PlanSection{tuple(fields.items())}: {str(err).splitlines()[0]}") from err


def _paired_ranks(s: Settings, **rule) -> PlanSection:
    return _section(s, attention_r=s.attention_r, mlp_r=s.mlp_r, **rule)


def _within_budget(report, cost, s, notes, section) -> Plan:
    """make_plan at s.budget; a budget below the cheapest possible plan is raised in steps of 0.05 and noted."""
    budget = s.budget
    while True:
        try:
            return make_plan(report, section(budget), cost)
        except ConfigError as err:
            if budget >= 1.0:
                raise
            raised = round(min(1.0, budget + 0.05), 2)
            notes.append(f"{section(budget).rule} budget {budget} infeasible ({err}); raised to {raised}")
            budget = raised


def _budget(report, cost, s, built, notes) -> Plan:
    return _within_budget(report, cost, s, notes, lambda budget: _paired_ranks(s, rule="budget", budget=budget))


def _cut(score: str, rank_scaling: str = "rslora"):
    def build(report, cost, s, built, notes) -> Plan:
        def section(budget: float) -> PlanSection:
            return _section(
                s,
                rule="cut",
                budget=budget,
                score=score,
                min_r=s.min_r,
                max_r=s.max_r,
                guard=s.guard,
                rank_scaling=rank_scaling,
            )

        return _within_budget(report, cost, s, notes, section)

    return build


def _rslora(report, cost, s, built, notes) -> Plan:
    """The cut plan (alpha = 2r) with one alpha for every rank, as PEFT's rsLoRA (use_rslora: scale alpha/sqrt(r))
    is meant to be used: the cut plan's scale at min_r times sqrt(min_r), falling as 1/sqrt(r) like `cut`'s."""
    plan = _cut("signal", "standard")(report, cost, s, built, notes)
    return dataclasses.replace(plan, modules=[dataclasses.replace(m, alpha=2.0 * s.min_r) for m in plan.modules])


def _matched(report, cost, s, built, notes) -> Plan:
    """Uniform on every layer at the reference arm's mean rank per module kind (same capacity per adapter)."""
    reference = built.get(s.matched_to) or built.get("paper")
    if reference is None:
        raise Unavailable(f"matched: neither {s.matched_to} nor paper was built")
    ranks = {}
    for kind in ("attention", "mlp"):
        rs = [m.r for m in reference.modules if m.kind == kind]
        ranks[kind] = max(1, round(statistics.fmean(rs))) if rs else s.uniform_r
    plan = make_plan(report, _section(s, rule="all", attention_r=ranks["attention"], mlp_r=ranks["mlp"]), cost)
    plan.settings["matched_to"] = reference.rule if reference is not built.get(s.matched_to) else s.matched_to
    return plan


def _pilot(report, cost, s, built, notes) -> Plan:
    """The pilot starts as uniform r16; the worker calls plan.pilot_plan after `pilot_fraction` of the steps."""
    try:
        from aletheia_ds.plan import pilot_plan  # noqa: F401
    except ImportError as err:
        raise Unavailable("aletheia_ds.plan.pilot_plan is missing") from err
    return built["uniform"]


def _random(report, cost, s, built, notes) -> Plan:
    reference = built.get(s.random_like) or built.get("budget")
    if reference is None:
        raise Unavailable(f"random: neither {s.random_like} nor budget was built")
    return reference  # the worker moves it onto layers drawn per seed


ARMS: dict[str, Arm] = {
    "uniform": Arm(
        "uniform LoRA r16, every layer",
        lambda r, c, s, b, n: make_plan(r, _section(s, rule="all", attention_r=s.uniform_r, mlp_r=s.uniform_r), c),
    ),
    "paper": Arm(
        "paper: top 50% by probe score, r16/r64",
        lambda r, c, s, b, n: make_plan(r, _paired_ranks(s, rule="top_pct", top_pct=50.0), c),
    ),
    "upper25": Arm(
        "upper 25% of the layers, r16/r64",
        lambda r, c, s, b, n: make_plan(r, _paired_ranks(s, rule="upper", top_pct=25.0), c),
    ),
    "upper33": Arm(
        "upper 33% of the layers, r16/r64",
        lambda r, c, s, b, n: make_plan(r, _paired_ranks(s, rule="upper", top_pct=100 / 3), c),
    ),
    "upper50": Arm(
        "upper 50% of the layers, r16/r64",
        lambda r, c, s, b, n: make_plan(r, _paired_ranks(s, rule="upper", top_pct=50.0), c),
    ),
    "budget": Arm("budget rule (cost model), r16/r64", _budget),
    "cut": Arm("cut rule, score signal, ranks by score", _cut("signal")),
    "cut_raw": Arm("cut rule, score raw", _cut("raw")),
    "cut_lowrank": Arm("cut rule, score lowrank", _cut("lowrank")),
    "cut_relative": Arm("cut rule, score relative", _cut("relative")),
    # the cut plan's layers and ranks under other scalings; `cut` itself has alpha = 2 sqrt(min_r r), i.e. scale
    # 2 sqrt(min_r / r), rank-stable as rsLoRA asks (PEFT's use_rslora at one alpha 2 sqrt(min_r) is that same
    # scale: it would train the same adapters, so it is no arm of its own)
    "cut_standard": Arm("cut rule, alpha = 2r (scale 2 at every rank)", _cut("signal", "standard")),
    "cut_rslora": Arm(
        "cut rule, PEFT rsLoRA: use_rslora, alpha = 2 min_r at every rank (scale 2 min_r / sqrt(r))",
        _rslora,
        lora={"use_rslora": True},
    ),
    "matched": Arm("uniform, every layer, at the reference plan's mean ranks (rank-matched)", _matched),
    "pilot": Arm("pilot: uniform r16 for a fraction of the steps, then the layers above pilot_plan's cut", _pilot),
    "random": Arm("random layers: the reference plan's layer count, modules and ranks", _random),
}
BUILD_ORDER = [
    "uniform",
    "paper",
    "upper25",
    "upper33",
    "upper50",
    "budget",
    "cut",
    "cut_raw",
    "cut_lowrank",
    "cut_relative",
    "cut_standard",
    "cut_rslora",
    "matched",
    "pilot",
    "random",
]


def build_plans(report: ProbeReport, cost: CostModel, s: Settings, notes: list[str]) -> dict[str, Plan]:
    """Every wanted arm's plan (random: its reference; pilot: its start); unavailable arms are noted, not built."""
    wanted = set(s.names("arms")) | {"uniform"}
    if "matched" in wanted:
        wanted.add(s.matched_to if s.matched_to in ARMS else "paper")
    if "random" in wanted:
        wanted.add(s.random_like if s.random_like in ARMS else "budget")
    built: dict[str, Plan] = {}
    for name in BUILD_ORDER:
        if name not in wanted:
            continue
        try:
            built[name] = ARMS[name].build(report, cost, s, built, notes)
        except Unavailable as err:
            notes.append(f"arm {name} skipped: {err}")
    return built


def random_layers_like(report: ProbeReport, reference: Plan, seed: int, cost: CostModel) -> Plan:
    """The ablation: `reference`'s layer count, per-layer modules and ranks, on layers drawn at random."""
    drawn = sorted(random.Random(f"random-layers:{seed}").sample(range(report.num_layers), len(reference.layers)))
    moved = dict(zip(reference.layers, drawn))  # i-th lowest planned layer -> i-th lowest drawn layer
    modules = [dataclasses.replace(m, layer=moved[m.layer]) for m in reference.modules]
    plan = Plan(
        rule="random",
        num_layers=report.num_layers,
        layers_path=reference.layers_path,
        layers=drawn,
        modules=modules,
        score_captured=captured(report, modules),
        settings=dict(reference.settings),
        model=report.model,
    ).check()
    plan.predicted = cost.describe(plan)
    return plan


def plan_summary(plan: Plan) -> dict:
    return {
        "rule": plan.rule,
        "layers": plan.layers,
        "lowest_adapted_layer": plan.lowest_adapted_layer,
        "adapters": len(plan.modules),
        "modules": [[m.layer, m.key, m.r] for m in plan.modules],
        "score_captured": plan.score_captured,
        "predicted_fraction_of_uniform": plan.predicted.get("fraction_of_uniform"),
    }


# ====================================================================== evaluation
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def task_losses(model, examples: dict[str, list], pad_id: int, batch: int, device: torch.device) -> dict:
    """Held-out loss per task (evaluate.held_out_loss); the study's task loss is their plain mean, so each
    task counts the same whatever its completion length."""

    def forward(b):
        with autocast(device):
            return model(**to_device(b, device)).loss

    by_task = {
        name: held_out_loss(forward, fixed_batches(rows, batch, math.ceil(len(rows) / batch), pad_id))
        for name, rows in examples.items()
    }
    return {"loss": statistics.fmean(by_task.values()), "by_task": by_task}


@torch.no_grad()
def exact_match(
    model, tokenizer, decode: dict[str, list[dict]], batch: int, device: torch.device, samples: int = 2
) -> dict:
    """Greedy decoding of each held-out prompt; the task's final answer compared with the reference's."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [(TASKS_BY_NAME[name], row) for name, task_rows in decode.items() for row in task_rows]
    longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for _, r in rows)
    correct = {name: 0 for name in decode}
    shown = {name: [] for name in decode}
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        prompts = [tokenizer(r["prompt"])["input_ids"] for _, r in chunk]  # as data.Tokenize encodes prompts
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where decoding starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with autocast(device):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=longest + 4,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
                use_cache=True,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for (task, row), text in zip(chunk, texts):
            got, want = task.answer(text), task.answer(row["completion"])
            correct[task.name] += got is not None and got == want
            if len(shown[task.name]) < samples:
                shown[task.name].append({"prompt": row["prompt"], "expected": row["completion"], "generated": text})
    by_task = {name: hits / len(decode[name]) for name, hits in correct.items()}
    return {"exact_match": statistics.fmean(by_task.values()), "exact_match_by_task": by_task, "samples": shown}


def evaluate(model, tokenizer, data: TaskData, held_out_rows: torch.Tensor, s: Settings, device: torch.device) -> dict:
    model.eval()
    pad = tokenizer.pad_token_id
    test = task_losses(model, data.test, pad, s.eval_batch, device)
    validation = task_losses(model, data.validation, pad, s.eval_batch, device)
    result = {
        "task_loss": test["loss"],
        "task_loss_by_task": test["by_task"],
        "val_loss": validation["loss"],
        **exact_match(model, tokenizer, data.decode, s.em_batch, device),
        "corpus_loss": corpus_loss(model, held_out_rows, max(1, s.eval_batch // 4), device),
    }
    return result


# ====================================================================== one run
def layer_change(model, plan: Plan) -> list[float]:
    """Per layer: what the pilot learned there (adapters.attach.layer_update_norms, as the training job's pilot)."""
    from aletheia_ds.adapters.attach import layer_update_norms

    return layer_update_norms(model, plan.layers_path, plan.num_layers)


def _freeze_below(model, cut: int, layers_path: str) -> None:
    layers = (
        model.get_base_model().get_submodule(layers_path)
        if hasattr(model, "get_base_model")
        else model.get_submodule(layers_path)
    )
    for index in range(cut):
        layers[index].requires_grad_(False)  # adapters stay attached, frozen: FrozenPrefix accepts them


@dataclass
class RunContext:
    base: object
    tokenizer: object
    data: TaskData
    held_out_rows: torch.Tensor
    report: ProbeReport
    cost: CostModel  # the rules' cost model
    calibrated: CostModel  # timed on this device: the pilot's time after its cut
    plans: dict[str, Plan]
    base_corpus_loss: float
    device: torch.device


def plan_for(ctx: RunContext, arm: str, seed: int, s: Settings) -> Plan:
    if arm == "random":
        return random_layers_like(ctx.report, ctx.plans["random"], seed, ctx.cost)
    return ctx.plans[arm]


def train_run(ctx: RunContext, arm: str, seed: int, lr: float, s: Settings) -> dict:
    """Attach the arm's plan to a copy of the base, train `lora_steps` steps, evaluate; one record."""
    device, pad = ctx.device, ctx.tokenizer.pad_token_id
    plan = plan_for(ctx, arm, seed, s)
    base = copy.deepcopy(ctx.base)
    lora = LoraSection(init_seed=seed, **ARMS[arm].lora)
    run = PreparedModel.apply(base, plan, describe(base), ExecutionOptions(lora=lora))
    model = run.peft_model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
    steps = s.lora_steps
    schedule = StepSchedule(len(ctx.data.train), s.lora_batch, 1, 1, seed)
    points = sorted({max(1, round(steps * k / s.curve_points)) for k in range(1, s.curve_points + 1)})
    pilot_step = max(1, round(s.pilot_fraction * steps)) if arm == "pilot" else None
    curve, losses, extra = [], [], {}
    started = time.perf_counter()
    for step in range(steps):
        if step == pilot_step:
            from aletheia_ds.plan import pilot_plan

            change = layer_change(model, plan)
            chosen = pilot_plan(
                ctx.report,
                change,
                _section(s, rule="cut", budget=s.budget, attention_r=s.uniform_r, mlp_r=s.uniform_r),
                ctx.cost,
            )
            run.frozen_prefix.remove()
            _freeze_below(model, chosen.lowest_adapted_layer, plan.layers_path)
            run.frozen_prefix = FrozenPrefix(model, plan.layers_path, chosen.lowest_adapted_layer).apply()
            extra = {
                "pilot_step": step,
                "pilot_layer_change": change,
                "pilot_plan": plan_summary(chosen),
                "pilot_plan_json": chosen.to_json(),
                "pilot_fraction_after_cut": ctx.calibrated.describe(chosen)["fraction_of_uniform"],
            }
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, s.lora_warmup))
        indices = next(schedule.micro_batches(step, 0))
        batch = to_device(collate([ctx.data.train[i] for i in indices], pad), device)
        with autocast(device):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        optimizer.step()  # frozen pilot adapters have no grad: AdamW leaves them as they are
        optimizer.zero_grad(set_to_none=True)
        if step + 1 in points:
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{arm} seed {seed} lr {lr}: non-finite loss at step {step + 1}")
            if step + 1 < steps:
                model.eval()
                curve.append((step + 1, task_losses(model, ctx.data.test, pad, s.eval_batch, device)["loss"]))
    train_seconds = time.perf_counter() - started
    result = evaluate(model, ctx.tokenizer, ctx.data, ctx.held_out_rows, s, device)
    curve.append((steps, result["task_loss"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.undo()
    del run, model, base, optimizer
    return {
        "arm": arm,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "plan": plan_summary(plan),
        "lora": ARMS[arm].lora,
        **extra,
        "trainable_params": trainable,
        "train_seconds_shared_device": train_seconds,
        "curve": curve,
        "train_loss_at_points": losses,
        **result,
        "forgetting": result["corpus_loss"] - ctx.base_corpus_loss,
    }


def record_path(cache: Path, study_key: str, base: str, arm: str, seed: int, lr: float) -> Path:
    return cache / "runs" / study_key / base / arm / f"seed{seed}_lr{lr:g}.json"


def write_record(path: Path, record: dict) -> None:
    write_json_atomic(path, record)


def read_records(cache: Path, study_key: str) -> list[dict]:
    root = cache / "runs" / study_key
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/*.json"))] if root.is_dir() else []
