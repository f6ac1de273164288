"""Pure planning: ProbeReport + rule -> Plan (which layers and modules get LoRA, at which rank).

Rules:
  top_pct  the paper's: keep the top `top_pct`% of layers by score (at least one; ties to the lower index)
  all      uniform LoRA on every layer (the baseline)
  budget   cost-aware: the most probe score within a predicted step-time budget (select_within_budget,
           on the step-time model of cost.py)
  cut      cut-first coverage: the lowest cut whose plan meets the budget, every layer above it adapted, ranks
           min_r..max_r by score, rank-stabilised scaling; a guard cuts deeper when much score lies below
  upper    the upper `top_pct`% of layers, ignoring the probe (a fixed baseline for comparisons)
Ranks are asymmetric by module kind (attention vs MLP); alpha defaults to 2 x r. `plan.score` picks which
probe score the rules rank by (raw, signal, lowrank, relative: probe/report.py). `pilot_plan` places the cut
from what a uniform pilot learned instead of from the probe.

Mixture-of-experts layers: a layer's score includes its experts' gradient energy, so the rule above picks
layers as for dense models. Inside each chosen MoE layer, `expert_rule` picks experts (top-k by score, the
fewest covering a share of the layer's expert energy, or by routing load); the chosen experts get LoRA of
rank `expert_r` on every fused bank, the others none. Attention of chosen MoE layers is adapted unless
`moe_attention` is off; shared experts follow `shared_experts`; routers stay frozen unless `routers=lora`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Optional

from pydantic import BaseModel

from .arch import ExpertBank, Layout, MoeBlock, moe_from_json
from .config import ArtefactSchema, ConfigError, PlanSection
from .cost import UNIFORM_RANK, CostModel
from .io import read_json_object, write_json_atomic
from .probe.report import ProbeReport


@dataclass(frozen=True)
class PlannedModule:
    layer: int
    key: str
    path: str
    kind: str
    r: int
    alpha: float


@dataclass(frozen=True)
class PlannedExpert:
    layer: int
    expert: int
    r: int
    alpha: float
    token_share: float = 0.0  # tokens routed to it / probe tokens: the share of a step's tokens it sees (cost model)


class _MoeBlockJson(BaseModel):
    style: str
    path: str
    experts_path: str
    router_path: str
    num_experts: int
    top_k: int = 0
    banks: list[tuple[str, str, int, int]]  # name, path, in_features, out_features
    block_class: str = ""


class PlanJson(ArtefactSchema):
    """plan.json as `Plan.to_json` writes it (lowest_adapted_layer and lora_config are derived, so not read back)."""

    what: ClassVar[str] = "plan"
    written_by: ClassVar[str] = "aletheia-ds plan"

    rule: str
    num_layers: int
    layers_path: str
    layers: list[int]
    modules: list[PlannedModule] = []  # pydantic checks the dataclasses' fields
    score_captured: float = math.nan
    settings: dict = {}
    predicted: dict = {}
    model: str = ""
    experts: list[PlannedExpert] = []
    routers: list[PlannedModule] = []
    moe: dict[int, _MoeBlockJson] = {}


@dataclass
class Plan:
    rule: str
    num_layers: int
    layers_path: str
    layers: list[int]
    modules: list[PlannedModule]
    score_captured: float  # share of the probe's total gradient energy (sum of squared module scores) planned
    settings: dict = field(default_factory=dict)
    predicted: dict = field(default_factory=dict)  # cost-model prediction, when one was used
    model: str = ""
    experts: list[PlannedExpert] = field(default_factory=list)
    routers: list[PlannedModule] = field(default_factory=list)  # LoRA on router weights (routers=lora)
    moe: dict[int, MoeBlock] = field(default_factory=dict)  # every MoE block of the model (empty: dense model)

    @property
    def lowest_adapted_layer(self) -> int:
        return min(self.layers)

    def module_name(self, layer: int, path: str) -> str:
        """The model's full name of `path` inside decoder layer `layer`: "model.layers.3.self_attn.q_proj"."""
        return f"{self.layers_path}.{layer}.{path}"

    def experts_by_layer(self) -> dict[int, list[PlannedExpert]]:
        by_layer: dict[int, list[PlannedExpert]] = {}
        for e in sorted(self.experts, key=lambda e: (e.layer, e.expert)):
            by_layer.setdefault(e.layer, []).append(e)
        return by_layer

    def expert_banks(self, style: Optional[str] = None) -> Iterator[tuple[int, list[PlannedExpert], ExpertBank, str]]:
        """(layer, its planned experts, one fused bank, the bank's full parameter name) for every bank of a MoE
        layer with planned experts; `style` ("hf" | "megablocks") keeps that kind of MoE block only."""
        for layer, experts in self.experts_by_layer().items():
            block = self.moe[layer]
            if style is not None and block.style != style:
                continue
            for bank in block.banks:
                yield layer, experts, bank, self.module_name(layer, bank.path)

    def planned_layers(self) -> list[int]:
        return sorted(
            {m.layer for m in self.modules} | {e.layer for e in self.experts} | {m.layer for m in self.routers}
        )

    def to_json(self) -> dict:
        """The plan alone; plan.json adds the exact LoraConfig fields (adapters.peft_config.plan_json)."""
        return {
            "model": self.model,
            "rule": self.rule,
            "settings": self.settings,
            "num_layers": self.num_layers,
            "layers_path": self.layers_path,
            "layers": self.layers,
            "lowest_adapted_layer": self.lowest_adapted_layer,
            "score_captured": self.score_captured,
            "predicted": self.predicted,
            "modules": [asdict(m) for m in self.modules],
            "experts": [asdict(e) for e in self.experts],
            "routers": [asdict(m) for m in self.routers],
            "moe": {str(k): v.to_json() for k, v in sorted(self.moe.items())},
        }

    @classmethod
    def from_json(cls, blob: dict, where: str = "plan.json") -> "Plan":
        parsed = PlanJson.parse(blob, where)
        plan = cls(
            rule=parsed.rule,
            num_layers=parsed.num_layers,
            layers_path=parsed.layers_path,
            layers=sorted(parsed.layers),
            modules=list(parsed.modules),
            score_captured=parsed.score_captured,
            settings=parsed.settings,
            predicted=parsed.predicted,
            model=parsed.model,
            experts=list(parsed.experts),
            routers=list(parsed.routers),
            moe=moe_from_json({"moe": {k: block.model_dump() for k, block in parsed.moe.items()}}),
        )
        return plan.check(where)

    def check(self, where: str = "plan") -> "Plan":
        if not self.modules and not self.experts and not self.routers:
            raise ConfigError(f"{where}: the plan adapts no module")
        bad_layers = sorted(
            {m.layer for m in self.modules + self.routers if not 0 <= m.layer < self.num_layers}
            | {e.layer for e in self.experts if not 0 <= e.layer < self.num_layers}
        )
        if bad_layers:
            raise ConfigError(
                f"{where}: layers {bad_layers} do not exist (the model has {self.num_layers}: 0..{self.num_layers - 1})"
            )
        bad_ranks = [f"{m.layer}:{m.key}" for m in self.modules + self.routers if m.r <= 0 or m.alpha <= 0] + [
            f"{e.layer}:expert {e.expert}" for e in self.experts if e.r <= 0 or e.alpha <= 0
        ]
        if bad_ranks:
            raise ConfigError(f"{where}: rank and alpha must be > 0 (modules {bad_ranks[:5]})")
        self._check_experts(where)
        if self.planned_layers() != self.layers:
            raise ConfigError(
                f"{where}: 'layers' {self.layers} disagrees with the planned modules' and experts' "
                f"layers {self.planned_layers()}"
            )
        return self

    def check_fits(self, layout: Layout, where: str) -> "Plan":
        """Refuse a plan that does not fit the model at hand before any compute: its layer count, layer container
        and every planned module's path must be the model's (a hand-edited layers_path would otherwise fail
        inside PEFT)."""
        if self.num_layers != layout.num_layers:
            raise ConfigError(f"{where}: made for {self.num_layers} layers, the model has {layout.num_layers}")
        if self.layers_path != layout.layers_path:
            raise ConfigError(
                f"{where}: layers_path {self.layers_path!r} is not where the model's decoder layers "
                f"are ({layout.layers_path!r}); plan again for this model"
            )
        for module in self.modules:
            paths = {t.path for t in layout.layer_targets[module.layer]}
            if module.path not in paths:
                raise ConfigError(
                    f"{where}: layer {module.layer} has no module {module.path!r} (its targets: "
                    f"{', '.join(sorted(paths))}); plan again for this model"
                )
        moe_layers = sorted({e.layer for e in self.experts} - set(layout.moe))
        if moe_layers:
            raise ConfigError(f"{where}: experts planned in layers {moe_layers}, which are not MoE layers of the model")
        return self

    def _check_experts(self, where: str) -> None:
        moe_layers = sorted(self.moe)
        for layer in sorted({e.layer for e in self.experts} | {m.layer for m in self.routers}):
            if layer not in self.moe:
                raise ConfigError(
                    f"{where}: experts or a router planned in layer {layer}, which is not a MoE layer "
                    f"(MoE layers in the plan's 'moe': {moe_layers or 'none'})"
                )
        seen = set()
        for e in self.experts:
            count = self.moe[e.layer].num_experts
            if not 0 <= e.expert < count:
                raise ConfigError(
                    f"{where}: expert {e.expert} of layer {e.layer} does not exist (layer {e.layer} has "
                    f"{count} experts: 0..{count - 1})"
                )
            if (e.layer, e.expert) in seen:
                raise ConfigError(f"{where}: expert {e.expert} of layer {e.layer} is planned twice")
            seen.add((e.layer, e.expert))
        for layer, group in self.experts_by_layer().items():
            if len({(e.r, e.alpha) for e in group}) > 1:
                raise ConfigError(
                    f"{where}: the experts of layer {layer} have different ranks/alphas; one fused bank "
                    "carries one rank, so give every expert of a layer the same r and alpha"
                )

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        blob = read_json_object(path, "plan")
        return cls.from_json(blob, str(path))


def rank_for(kind: str, settings: PlanSection) -> tuple[int, float]:
    r = settings.attention_r if kind == "attention" else settings.mlp_r
    alpha = settings.attention_alpha if kind == "attention" else settings.mlp_alpha
    return r, float(alpha if alpha is not None else 2 * r)


def select_top_pct(report: ProbeReport, top_pct: float, score: str = "raw") -> list[int]:
    """The paper's rule: the ceil(top_pct% of layers) highest-scoring layers, ties to the lower index."""
    if not 0 < top_pct <= 100:
        raise ConfigError(f"plan.top_pct must be in (0, 100], got {top_pct}")
    count = max(1, math.ceil(report.num_layers * top_pct / 100 - 1e-9))
    energy = report.layer_energy(score)
    ranked = sorted(range(report.num_layers), key=lambda i: (-energy[i], i))
    return sorted(ranked[:count])


def total_energy(report: ProbeReport) -> float:
    """Sum of squared scores of every adapter target: module linears and experts."""
    return sum(s * s for layer in report.layers for s in layer.modules.values()) + sum(
        e.score * e.score for e in report.experts
    )


def _moe_layers(report: ProbeReport) -> set[int]:
    return {int(k) for k in (report.layout.get("moe") or {})}


def modules_for_layers(report: ProbeReport, layers: list[int], settings: PlanSection) -> list[PlannedModule]:
    """The chosen layers' target linears, less MoE-layer attention (moe_attention=false) and shared experts
    (shared_experts=none)."""
    kinds, paths = report.layout["module_kinds"], report.layout["module_paths"]
    moe_layers = _moe_layers(report)
    shared = set(report.layout.get("shared_expert_keys") or [])
    planned = []
    for index in layers:
        for key in report.layers[index].modules:
            if index in moe_layers and kinds[key] == "attention" and not settings.moe_attention:
                continue
            if key in shared and settings.shared_experts == "none":
                continue
            r, alpha = rank_for(kinds[key], settings)
            planned.append(PlannedModule(index, key, paths[key], kinds[key], r, alpha))
    return planned


def captured(report: ProbeReport, modules: list[PlannedModule], experts: list[PlannedExpert] = ()) -> float:
    energy = sum(report.layers[m.layer].modules[m.key] ** 2 for m in modules)
    scores = {(e.layer, e.expert): e.score for e in report.experts}
    energy += sum(scores[(e.layer, e.expert)] ** 2 for e in experts)
    return energy / total_energy(report)


def choose_experts(report: ProbeReport, layer: int, settings: PlanSection) -> list[int]:
    """Experts of one MoE layer per `settings.expert_rule` (ties go to the lower index)."""
    experts = report.layer_experts(layer)
    rule = settings.expert_rule
    if rule == "none" or not experts:
        return []
    if rule == "all":
        return [e.expert for e in experts]
    if rule == "top_k":
        return sorted(e.expert for e in sorted(experts, key=lambda e: (-e.score, e.expert))[: settings.expert_top_k])
    if rule == "load":
        ranked = sorted(experts, key=lambda e: (-e.tokens, -e.score, e.expert))
        return sorted(e.expert for e in ranked[: settings.expert_top_k])
    if rule == "energy":
        energy = sum(e.score * e.score for e in experts)
        if energy <= 0:
            return []  # no token of the probe reached this layer's experts
        chosen, covered = [], 0.0
        for e in sorted(experts, key=lambda e: (-e.score, e.expert)):
            if covered >= settings.expert_energy * energy * (1 - 1e-12):
                break
            chosen.append(e.expert)
            covered += e.score * e.score
        return sorted(chosen)
    raise ConfigError(f"plan.expert_rule: unknown rule {rule!r}; use energy, top_k, load, all or none")


def add_moe(plan: Plan, report: ProbeReport, settings: PlanSection) -> Plan:
    """Experts, routers and shared experts for a plan whose layers were chosen by a layer rule."""
    blocks = moe_from_json(report.layout)
    if not blocks:
        return plan
    kinds, paths = report.layout["module_kinds"], report.layout["module_paths"]
    chosen_layers = sorted({m.layer for m in plan.modules} | set(plan.layers))
    alpha = float(settings.expert_alpha if settings.expert_alpha is not None else 2 * settings.expert_r)
    router_alpha = float(2 * settings.router_r)
    tokens = max(1, report.tokens)
    scores = {(e.layer, e.expert): e for e in report.experts}
    for layer in chosen_layers:
        if layer not in blocks:
            continue
        for expert in choose_experts(report, layer, settings):
            plan.experts.append(
                PlannedExpert(layer, expert, settings.expert_r, alpha, scores[(layer, expert)].tokens / tokens)
            )
        if settings.routers == "lora":
            plan.routers.append(
                PlannedModule(
                    layer, "router", f"{blocks[layer].router_path}.weight", "router", settings.router_r, router_alpha
                )
            )
    if settings.shared_experts == "all_moe_layers":
        present = {(m.layer, m.key) for m in plan.modules}
        for layer in sorted(blocks):
            for key in report.layers[layer].modules:
                if key in (report.layout.get("shared_expert_keys") or []) and (layer, key) not in present:
                    r, a = rank_for(kinds[key], settings)
                    plan.modules.append(PlannedModule(layer, key, paths[key], kinds[key], r, a))
        plan.modules.sort(key=lambda m: m.layer)
    plan.moe = dict(sorted(blocks.items()))
    plan.layers = plan.planned_layers()
    plan.score_captured = captured(report, plan.modules, plan.experts)
    return plan


def new_plan(
    report: ProbeReport, rule: str, modules: list[PlannedModule], settings: PlanSection, layers: list[int] | None = None
) -> Plan:
    """A plan of `modules` on `report`'s model; `layers` default to the modules' layers."""
    return Plan(
        rule=rule,
        num_layers=report.num_layers,
        layers_path=report.layout["layers_path"],
        layers=layers if layers is not None else sorted({m.layer for m in modules}),
        modules=modules,
        score_captured=captured(report, modules),
        settings=settings.model_dump(exclude={"plan"}),
        model=report.model,
    )


def make_plan(report: ProbeReport, settings: PlanSection, cost_model: Optional[CostModel] = None) -> Plan:
    """Apply the configured rule. `cost_model` is used by the budget and cut rules (default: analytic)."""
    report.validate()
    if settings.rule == "all":
        layers = list(range(report.num_layers))
    elif settings.rule == "top_pct":
        layers = select_top_pct(report, settings.top_pct, settings.score)
    elif settings.rule in ("budget", "cut"):
        cost = cost_model or CostModel.analytic(report)
        plan = (select_within_budget if settings.rule == "budget" else select_cut)(report, settings, cost)
        if report.experts:
            # the rule covers the layers' linears; experts are then chosen inside the layers it kept
            plan = add_moe(plan, report, settings)
            plan.predicted = {**plan.predicted, **cost.describe(plan)}
        return plan.check()
    elif settings.rule == "pilot":
        # the pilot phase: r16 on every module of every layer, as pilot_plan's span keeps them after the cut
        if report.experts:
            raise ConfigError("plan.rule=pilot: dense models only (this model has MoE layers); use plan.rule=cut")
        uniform = settings.model_copy(
            update={"attention_r": UNIFORM_RANK, "mlp_r": UNIFORM_RANK, "attention_alpha": None, "mlp_alpha": None}
        )
        layers = list(range(report.num_layers))
        plan = new_plan(report, "pilot", modules_for_layers(report, layers, uniform), settings, layers)
        if cost_model is not None:
            plan.predicted = cost_model.describe(plan)
        return plan.check()
    elif settings.rule == "upper":
        layers = list(
            range(
                report.num_layers - max(1, math.ceil(report.num_layers * settings.top_pct / 100 - 1e-9)),
                report.num_layers,
            )
        )
    else:
        raise ConfigError(f"plan.rule: unknown rule {settings.rule!r}; use top_pct, budget, cut, upper, all or pilot")
    plan = new_plan(report, settings.rule, modules_for_layers(report, layers, settings), settings, layers)
    plan = add_moe(plan, report, settings)
    if cost_model is not None:
        plan.predicted = cost_model.describe(plan)
    return plan.check()


# ---------------------------------------------------------------- budgeted selection
@dataclass(frozen=True)
class _Item:
    layer: int
    key: str
    energy: float
    seconds: float


def _items(report: ProbeReport, settings: PlanSection, cost: CostModel) -> list[_Item]:
    kinds = report.layout["module_kinds"]
    items = []
    for index, modules in enumerate(report.module_scores(settings.score)):
        for key, score in modules.items():
            r, _ = rank_for(kinds[key], settings)
            items.append(_Item(index, key, score * score, cost.adapter_seconds(r, *cost.module_shapes[key])))
    return items


def select_within_budget(report: ProbeReport, settings: PlanSection, cost: CostModel | None) -> Plan:
    """Most probe energy within `settings.budget` x the predicted step time of uniform r16 LoRA.

    For every candidate lowest adapted layer c, the depth cost (backward, and recompute under
    checkpointing, from the top down to c) is paid once; the rest of the budget is filled with layers
    (plan.granularity=layer, the default) or single modules (=module) at or above c, by energy per second
    (layer c, or its best module, is taken first, so c really is the lowest). The c with the most captured
    energy wins; ties go to the cheaper plan.
    """
    cost = cost or CostModel.analytic(report)
    target = settings.budget * cost.uniform_seconds()
    items = _items(report, settings, cost)
    if settings.granularity == "layer":
        # whole layers (every target module of a chosen layer): a controlled study on a pretrained model found
        # module-by-module picking drifts to many cheap attention-only adapters and loses task quality
        per_layer: dict[int, list[_Item]] = {}
        for item in items:
            per_layer.setdefault(item.layer, []).append(item)
        items = [
            _Item(layer, "*", sum(i.energy for i in group), sum(i.seconds for i in group))
            for layer, group in per_layer.items()
        ]
    best: tuple[float, float, list[_Item]] | None = None
    cheapest = math.inf
    for cut in range(report.num_layers):
        fixed = cost.base_s + cost.depth_seconds(cut)
        in_cut = sorted((i for i in items if i.layer == cut), key=lambda i: -i.energy / i.seconds)
        if not in_cut:
            continue
        cheapest = min(cheapest, fixed + min(i.seconds for i in in_cut))
        room = target - fixed - in_cut[0].seconds
        if room < 0:
            continue
        chosen = [in_cut[0]]
        for item in sorted(
            (i for i in items if i.layer >= cut and i is not in_cut[0]), key=lambda i: -i.energy / i.seconds
        ):
            if item.seconds <= room:
                chosen.append(item)
                room -= item.seconds
        energy = sum(i.energy for i in chosen)
        spent = target - room
        if best is None or energy > best[0] or (energy == best[0] and spent < best[1]):
            best = (energy, spent, chosen)
    if best is None:
        raise ConfigError(
            f"plan.budget={settings.budget} is below the cheapest possible plan "
            f"({cheapest / cost.uniform_seconds():.2f} of uniform LoRA's predicted step time); "
            "raise plan.budget"
        )
    chosen_keys = {(i.layer, i.key) for i in best[2]}
    layers = sorted({layer for layer, _ in chosen_keys})
    modules = [
        m
        for m in modules_for_layers(report, layers, settings)
        if (m.layer, m.key) in chosen_keys or (m.layer, "*") in chosen_keys
    ]
    plan = new_plan(report, "budget", modules, settings, layers)
    plan.predicted = cost.describe(plan)
    return plan.check()


# ---------------------------------------------------------------- cut-first coverage
# Backward runs from the top down to the lowest adapted layer whatever lies in between, so a gap in the
# adapted span saves only its adapters' small cost; what buys speed is the cut. The cut rules place the cut
# first (the cost model: the lowest cut whose plan meets the step-time budget, i.e. the most layers that fit)
# and adapt every layer at or above it; the probe only sets ranks inside the span and, through the guard,
# refuses a cut that leaves too much of the score below it (Aletheia's observation that adaptation need is
# uneven, applied to ranks instead of to which layers are skipped; LISA / layer-freezing work such as
# Egeria and FreezeOut for freezing a contiguous bottom block).


def rank_levels(min_r: int, max_r: int) -> list[int]:
    """min_r, 2 min_r, 4 min_r, ... up to max_r (max_r always included)."""
    if min_r > max_r:
        raise ConfigError(f"plan.min_r={min_r} is above plan.max_r={max_r}; give min_r <= max_r")
    levels = [min_r]
    while levels[-1] * 2 <= max_r:
        levels.append(levels[-1] * 2)
    if levels[-1] != max_r:
        levels.append(max_r)
    return levels


def span_ranks(energy: list[float], span: range, levels: list[int]) -> dict[int, int]:
    """Layers of `span` split into len(levels) groups of (nearly) equal size by score; the lowest-scoring
    group gets levels[0], the highest levels[-1]. Ties go to the lower layer index first."""
    ordered = sorted(span, key=lambda i: (energy[i], -i))
    groups = min(len(levels), len(ordered))
    ranks = {}
    for position, layer in enumerate(ordered):
        group = position * groups // len(ordered)
        ranks[layer] = levels[group + len(levels) - groups]
    return ranks


def scaled_alpha(r: int, settings: PlanSection) -> float:
    """rslora: alpha = 2 sqrt(min_r r), so the LoRA scale alpha/r = 2 sqrt(min_r / r) (Kalajdzievski 2023): the
    update's size does not grow with r, and min_r keeps the usual alpha = 2r. Plain PEFT loads it as is."""
    if settings.rank_scaling == "rslora":
        return 2.0 * math.sqrt(settings.min_r * r)
    return 2.0 * r


def _span_modules(report: ProbeReport, cut: int, ranks: dict[int, int], settings: PlanSection) -> list[PlannedModule]:
    modules = modules_for_layers(report, list(range(cut, report.num_layers)), settings)
    return [
        PlannedModule(m.layer, m.key, m.path, m.kind, ranks[m.layer], scaled_alpha(ranks[m.layer], settings))
        for m in modules
    ]


def lowest_cut_within(cost: CostModel, target_s: float, modules_for_cut) -> int | None:
    """The lowest cut c whose plan `modules_for_cut(c)` is predicted at or under `target_s`; None if none is.
    Every cut is priced (ranks change with the span, so the predicted time need not be monotone in c)."""
    for cut in range(cost.num_layers):
        modules = modules_for_cut(cut)
        adapters = [(m.layer, m.r, *cost.module_shapes[m.key]) for m in modules]
        if adapters and cost.predict(adapters) <= target_s:
            return cut
    return None


def guarded_cut(cut: int, energy: list[float], guard: float) -> int:
    """Move the cut down until at most `guard` of the score energy lies below it."""
    total = sum(energy) or 1.0
    while cut > 0 and sum(energy[:cut]) / total > guard + 1e-12:
        cut -= 1
    return cut


def _cut_plan(
    report: ProbeReport,
    rule: str,
    cut: int,
    modules: list[PlannedModule],
    settings: PlanSection,
    cost: CostModel,
    notes: dict,
) -> Plan:
    plan = new_plan(report, rule, modules, settings)
    plan.predicted = {**cost.describe(plan), **notes}
    return plan


def cut_plan(report: ProbeReport, cut: int, settings: PlanSection, cost: CostModel, notes: dict | None = None) -> Plan:
    """The cut rule's plan for a given cut: every layer from `cut` up, ranks in [min_r, max_r] by plan.score."""
    if not 0 <= cut < report.num_layers:
        raise ConfigError(f"cut {cut} is outside the model's layers 0..{report.num_layers - 1}")
    energy = report.layer_energy(settings.score)
    ranks = span_ranks(energy, range(cut, report.num_layers), rank_levels(settings.min_r, settings.max_r))
    total = sum(energy) or 1.0
    notes = {"cut": cut, "score": settings.score, "energy_below_cut": sum(energy[:cut]) / total, **(notes or {})}
    return _cut_plan(report, "cut", cut, _span_modules(report, cut, ranks, settings), settings, cost, notes)


def select_cut(report: ProbeReport, settings: PlanSection, cost: CostModel) -> Plan:
    """Cut-first coverage: the lowest cut whose plan meets plan.budget x uniform r16's predicted step time,
    every layer at or above it adapted, ranks in [min_r, max_r] by plan.score; then the guard."""
    energy = report.layer_energy(settings.score)
    levels = rank_levels(settings.min_r, settings.max_r)
    target = settings.budget * cost.uniform_seconds()

    def modules_for_cut(cut: int) -> list[PlannedModule]:
        return _span_modules(report, cut, span_ranks(energy, range(cut, report.num_layers), levels), settings)

    cut = lowest_cut_within(cost, target, modules_for_cut)
    if cut is None:
        cheapest = cost.predict(
            [(m.layer, m.r, *cost.module_shapes[m.key]) for m in modules_for_cut(report.num_layers - 1)]
        )
        raise ConfigError(
            f"plan.budget={settings.budget} is below the cheapest cut plan (the top layer alone: "
            f"{cheapest / cost.uniform_seconds():.2f} of uniform LoRA's predicted step time); raise "
            "plan.budget or lower plan.min_r"
        )
    return cut_plan(report, guarded_cut(cut, energy, settings.guard), settings, cost, {"budget_cut": cut})


def pilot_plan(report: ProbeReport, layer_change: list[float], settings: PlanSection, cost: CostModel) -> Plan:
    """After a uniform pilot (r16 on every module): the part of it at or above the cut, which is the lowest
    cut meeting plan.budget, moved down by the guard when more than plan.guard of what the pilot learned
    (`layer_change[i]`: size of layer i's adapter updates, e.g. sqrt(sum over its modules of ||s B A||_F^2))
    lies below it. Adapters below the cut keep what they learned, frozen: the caller freezes them, and the
    frozen prefix then applies. Overall speedup after a pilot share p: 1 / (p + (1 - p) / S)."""
    if len(layer_change) != report.num_layers:
        raise ConfigError(f"pilot: {len(layer_change)} layer changes for a model of {report.num_layers} layers")
    energy = [float(c) ** 2 for c in layer_change]
    target = settings.budget * cost.uniform_seconds()
    ranks = {layer: UNIFORM_RANK for layer in range(report.num_layers)}

    def modules_for_cut(cut: int) -> list[PlannedModule]:
        modules = modules_for_layers(report, list(range(cut, report.num_layers)), settings)
        return [PlannedModule(m.layer, m.key, m.path, m.kind, ranks[m.layer], 2.0 * UNIFORM_RANK) for m in modules]

    cut = lowest_cut_within(cost, target, modules_for_cut)
    if cut is None:
        cut = report.num_layers - 1
    budget_cut = cut
    cut = guarded_cut(cut, energy, settings.guard)
    total = sum(energy) or 1.0
    notes = {"cut": cut, "budget_cut": budget_cut, "score": "pilot", "energy_below_cut": sum(energy[:cut]) / total}
    return _cut_plan(report, "pilot", cut, modules_for_cut(cut), settings, cost, notes)


def transfer_plan(plan: Plan, report: ProbeReport, settings: PlanSection | None = None) -> Plan:
    """The same plan shape on another model (`report`: its probe, or any report with its layout): target layer i
    is adapted when the source layer at the same relative depth, floor(i x L_source / L_target), is, with that
    layer's rank and alpha per module kind. So the share of layers below the cut, the gaps and the ranks carry
    over from, say, a study base of 12 layers to an 80-layer model whose speed is then measured."""
    settings = settings or PlanSection()
    source: dict[tuple[int, str], tuple[int, float]] = {}
    for m in plan.modules:
        best = source.get((m.layer, m.kind))
        if best is None or m.r > best[0]:
            source[(m.layer, m.kind)] = (m.r, m.alpha)
    modules = []
    for target in range(report.num_layers):
        origin = target * plan.num_layers // report.num_layers
        for m in modules_for_layers(report, [target], settings):
            if (origin, m.kind) in source:
                r, alpha = source[(origin, m.kind)]
                modules.append(PlannedModule(m.layer, m.key, m.path, m.kind, r, alpha))
    if not modules:
        raise ConfigError(f"transfer: the plan adapts no module kind the target model has ({sorted(source)[:3]})")
    return Plan(
        rule=f"{plan.rule} (transferred from {plan.num_layers} layers)",
        num_layers=report.num_layers,
        layers_path=report.layout["layers_path"],
        layers=sorted({m.layer for m in modules}),
        modules=modules,
        score_captured=captured(report, modules),
        settings=dict(plan.settings),
        model=report.model,
    ).check()
