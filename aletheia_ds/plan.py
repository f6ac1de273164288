"""Pure planning: ProbeReport + rule -> Plan (which layers and modules get LoRA, at which rank).

Rules:
  top_pct  the paper's: keep the top `top_pct`% of layers by score (at least one; ties to the lower index)
  all      uniform LoRA on every layer (the baseline)
  budget   cost-aware: the most probe score within a predicted step-time budget (see cost.py)
  upper    the upper `top_pct`% of layers, ignoring the probe (a fixed baseline for comparisons)
Ranks are asymmetric by module kind (attention vs MLP); alpha defaults to 2 x r.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ConfigError, PlanSection
from .probe.report import ProbeReport


@dataclass(frozen=True)
class PlannedModule:
    layer: int
    key: str
    path: str
    kind: str
    r: int
    alpha: float


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

    @property
    def lowest_adapted_layer(self) -> int:
        return min(self.layers)

    def expected(self) -> dict[tuple[int, str], PlannedModule]:
        return {(m.layer, m.path): m for m in self.modules}

    def to_json(self) -> dict:
        from .lora import lora_config_fields  # the exact PEFT fields this plan attaches with

        return {"model": self.model, "rule": self.rule, "settings": self.settings, "num_layers": self.num_layers,
                "layers_path": self.layers_path, "layers": self.layers,
                "lowest_adapted_layer": self.lowest_adapted_layer, "score_captured": self.score_captured,
                "predicted": self.predicted, "modules": [asdict(m) for m in self.modules],
                "lora_config": lora_config_fields(self)}

    @classmethod
    def from_json(cls, blob: dict, where: str = "plan.json") -> "Plan":
        try:
            modules = [PlannedModule(int(m["layer"]), str(m["key"]), str(m["path"]), str(m["kind"]), int(m["r"]),
                                     float(m["alpha"])) for m in blob["modules"]]
            plan = cls(rule=str(blob["rule"]), num_layers=int(blob["num_layers"]), layers_path=str(blob["layers_path"]),
                       layers=sorted(int(x) for x in blob["layers"]), modules=modules,
                       score_captured=float(blob.get("score_captured", float("nan"))),
                       settings=dict(blob.get("settings", {})), predicted=dict(blob.get("predicted", {})),
                       model=str(blob.get("model", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{where}: not a plan ({type(err).__name__}: {err}); regenerate it with "
                              "`aletheia-ds plan`") from None
        return plan.check(where)

    def check(self, where: str = "plan") -> "Plan":
        if not self.modules:
            raise ConfigError(f"{where}: the plan adapts no module")
        bad_layers = sorted({m.layer for m in self.modules if not 0 <= m.layer < self.num_layers})
        if bad_layers:
            raise ConfigError(f"{where}: layers {bad_layers} do not exist (the model has {self.num_layers}: "
                              f"0..{self.num_layers - 1})")
        bad_ranks = [f"{m.layer}:{m.key}" for m in self.modules if m.r <= 0 or m.alpha <= 0]
        if bad_ranks:
            raise ConfigError(f"{where}: rank and alpha must be > 0 (modules {bad_ranks[:5]})")
        if sorted({m.layer for m in self.modules}) != self.layers:
            raise ConfigError(f"{where}: 'layers' {self.layers} disagrees with the modules' layers")
        return self

    def save(self, path: str | Path) -> None:
        from .checkpoint import write_json_atomic

        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            blob = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: cannot read plan ({err})") from None
        if not isinstance(blob, dict):
            raise ConfigError(f"{path}: not a plan (top level is {type(blob).__name__})")
        return cls.from_json(blob, str(path))


def rank_for(kind: str, settings: PlanSection) -> tuple[int, float]:
    r = settings.attention_r if kind == "attention" else settings.mlp_r
    alpha = settings.attention_alpha if kind == "attention" else settings.mlp_alpha
    return r, float(alpha if alpha is not None else 2 * r)


def select_top_pct(report: ProbeReport, top_pct: float) -> list[int]:
    """The paper's rule: the ceil(top_pct% of layers) highest-scoring layers, ties to the lower index."""
    if not 0 < top_pct <= 100:
        raise ConfigError(f"plan.top_pct must be in (0, 100], got {top_pct}")
    count = max(1, math.ceil(report.num_layers * top_pct / 100 - 1e-9))
    ranked = sorted(range(report.num_layers), key=lambda i: (-report.layers[i].score, i))
    return sorted(ranked[:count])


def total_energy(report: ProbeReport) -> float:
    return sum(s * s for layer in report.layers for s in layer.modules.values())


def modules_for_layers(report: ProbeReport, layers: list[int], settings: PlanSection) -> list[PlannedModule]:
    kinds, paths = report.layout["module_kinds"], report.layout["module_paths"]
    planned = []
    for index in layers:
        for key in report.layers[index].modules:
            r, alpha = rank_for(kinds[key], settings)
            planned.append(PlannedModule(index, key, paths[key], kinds[key], r, alpha))
    return planned


def captured(report: ProbeReport, modules: list[PlannedModule]) -> float:
    energy = sum(report.layers[m.layer].modules[m.key] ** 2 for m in modules)
    return energy / total_energy(report)


def make_plan(report: ProbeReport, settings: PlanSection, cost_model=None) -> Plan:
    """Apply the configured rule. `cost_model` (cost.CostModel) is needed by the budget rule only."""
    report.validate()
    if settings.rule == "all":
        layers = list(range(report.num_layers))
    elif settings.rule == "top_pct":
        layers = select_top_pct(report, settings.top_pct)
    elif settings.rule == "budget":
        from .cost import select_within_budget  # the cost-aware rule lives beside the cost model

        return select_within_budget(report, settings, cost_model)
    elif settings.rule == "upper":
        layers = list(range(report.num_layers - max(1, math.ceil(report.num_layers * settings.top_pct / 100 - 1e-9)),
                            report.num_layers))
    else:
        raise ConfigError(f"plan.rule: unknown rule {settings.rule!r}; use top_pct, budget, upper or all")
    modules = modules_for_layers(report, layers, settings)
    plan = Plan(rule=settings.rule, num_layers=report.num_layers, layers_path=report.layout["layers_path"],
                layers=layers, modules=modules, score_captured=captured(report, modules),
                settings=settings.model_dump(exclude={"plan"}), model=report.model)
    if cost_model is not None:
        plan.predicted = cost_model.describe(plan)
    return plan.check()
