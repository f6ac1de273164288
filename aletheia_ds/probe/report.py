"""ProbeReport: the probe's result and its probe.json form (pure data, no torch).

Score definition (fixed so results compare across tools):
  module score = sqrt(mean over probe batches of ||dL_b/dW||_F^2), L_b = the model's mean token loss on batch b
  expert score = the same for expert e's slices of its layer's fused banks: sqrt(sum over banks of bank score^2)
  router score = the same for the router weight of a MoE layer (reported, not part of the layer score)
  layer score  = sqrt(sum over the layer's modules of module score^2 + sum over its experts of expert score^2)

With probe.sketch_dim > 0 every module also has (probe/hooks.py, probe/run.py sketch_stats):
  signal   sqrt of the unbiased estimate of ||mean_b dL_b/dW||_F^2: what the batches agree on, noise removed
  lowrank  signal x sqrt(share of the mean gradient's sketched energy in its top 16 singular values)
  weight   ||W||_F, so that relative = signal / weight compares layers of different scale
`module_scores(kind)` gives any of raw | signal | lowrank | relative per layer; plan.score picks one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel

from ..config import ArtefactSchema, ConfigError
from ..io import read_json_object

SCORE_KINDS = ("raw", "signal", "lowrank", "relative")


@dataclass
class LayerScore:
    index: int
    score: float
    modules: dict[str, float]
    signal: dict[str, float] = field(default_factory=dict)
    lowrank: dict[str, float] = field(default_factory=dict)
    weight_norm: dict[str, float] = field(default_factory=dict)


@dataclass
class ExpertScore:
    layer: int
    expert: int
    score: float
    tokens: int  # real (non-pad) tokens routed to this expert over all probe batches
    banks: dict[str, float] = field(default_factory=dict)  # per fused bank: "gate_up_proj", "down_proj"


class _LayerScoreJson(BaseModel):
    index: int
    score: float
    modules: dict[str, float]
    signal: dict[str, float] = {}
    lowrank: dict[str, float] = {}
    weight_norm: dict[str, float] = {}


class _ExpertScoreJson(BaseModel):
    layer: int
    expert: int
    score: float
    tokens: int
    banks: dict[str, float] = {}


class ProbeJson(ArtefactSchema):
    """probe.json as `ProbeReport.to_json` writes it; keys added since the first version have defaults."""

    what: ClassVar[str] = "probe report"
    written_by: ClassVar[str] = "aletheia-ds probe"

    model: str = ""
    num_layers: int
    tokens: int = 0
    seconds: float = 0.0
    batches: int = 0
    layers: list[_LayerScoreJson]
    layout: dict = {}
    experts: list[_ExpertScoreJson] = []
    routers: dict[int, float] = {}
    world_size: int = 1
    batch_size: int = 0
    seq_len: int = 0
    model_fingerprint: str = ""


@dataclass
class ProbeReport:
    model: str
    num_layers: int
    tokens: int
    seconds: float
    batches: int
    layers: list[LayerScore]
    layout: dict = field(default_factory=dict)  # family, layers_path, module_kinds, module_paths
    experts: list[ExpertScore] = field(default_factory=list)
    routers: dict[int, float] = field(default_factory=dict)
    world_size: int = 1
    batch_size: int = 0  # examples per probe batch
    seq_len: int = 0  # widest probe batch, in tokens
    model_fingerprint: str = ""  # model.fingerprint_digest of the probed model ("" in reports older than it)

    @classmethod
    def from_sq_norms(cls, sums: dict[tuple[int, str], float], batches: int, num_layers: int, **meta) -> "ProbeReport":
        """sums[(layer, key)] = sum over batches of ||dL_b/dW||_F^2 -> scores per the definition above."""
        layers = []
        for index in range(num_layers):
            modules = {key: math.sqrt(max(total, 0.0) / batches) for (li, key), total in sums.items() if li == index}
            layers.append(LayerScore(index, math.sqrt(sum(s * s for s in modules.values())), modules))
        return cls(num_layers=num_layers, batches=batches, layers=layers, **meta)

    def add_experts(self, experts: list[ExpertScore], routers: dict[int, float]) -> "ProbeReport":
        """Attach expert and router scores; expert energy joins its layer's score (experts are adapter targets)."""
        self.experts, self.routers = experts, routers
        for layer in self.layers:
            energy = sum(s * s for s in layer.modules.values()) + sum(
                e.score * e.score for e in experts if e.layer == layer.index
            )
            layer.score = math.sqrt(energy)
        return self

    def add_sketch_stats(self, stats: dict[tuple[int, str], dict]) -> "ProbeReport":
        for (index, key), values in stats.items():
            layer = self.layers[index]
            layer.signal[key], layer.lowrank[key] = values["signal"], values["lowrank"]
            layer.weight_norm[key] = values["weight"]
        return self

    @property
    def has_sketch(self) -> bool:
        return all(layer.signal for layer in self.layers)

    def module_scores(self, kind: str = "raw") -> list[dict[str, float]]:
        """Per layer, {module key: score} of one kind (SCORE_KINDS). Experts keep their raw score in every kind
        (they are not sketched); a rule adds them to their layer as today."""
        if kind not in SCORE_KINDS:
            raise ConfigError(f"plan.score: unknown score {kind!r}; use one of {', '.join(SCORE_KINDS)}")
        if kind == "raw":
            return [dict(layer.modules) for layer in self.layers]
        if not self.has_sketch:
            raise ConfigError(
                f"plan.score={kind} needs a probe report with signal scores (probe.sketch_dim > 0); "
                "this one has raw scores only: probe again, or use plan.score=raw"
            )
        if kind == "relative":
            return [
                {k: v / layer.weight_norm[k] if layer.weight_norm.get(k) else 0.0 for k, v in layer.signal.items()}
                for layer in self.layers
            ]
        return [dict(getattr(layer, kind)) for layer in self.layers]

    def layer_energy(self, kind: str = "raw") -> list[float]:
        """Per layer: sum of squared module scores of `kind` plus its experts' squared (raw) scores."""
        experts: dict[int, float] = {}
        for e in self.experts:
            experts[e.layer] = experts.get(e.layer, 0.0) + e.score * e.score
        return [
            sum(s * s for s in modules.values()) + experts.get(index, 0.0)
            for index, modules in enumerate(self.module_scores(kind))
        ]

    def layer_experts(self, layer: int) -> list[ExpertScore]:
        return sorted((e for e in self.experts if e.layer == layer), key=lambda e: e.expert)

    def layer_scores(self) -> list[float]:
        return [layer.score for layer in self.layers]

    def validate(self, where: str = "probe") -> "ProbeReport":
        scores = [s for layer in self.layers for s in layer.modules.values()]
        if not scores:
            raise ConfigError(f"{where}: no module scores; the probe measured nothing")
        if any(not math.isfinite(s) for s in scores):
            bad = [layer.index for layer in self.layers if any(not math.isfinite(s) for s in layer.modules.values())]
            raise ConfigError(
                f"{where}: non-finite probe scores in layers {bad}; check the data and model dtype "
                "(try model.dtype=float32)"
            )
        if all(s == 0.0 for s in scores):
            raise ConfigError(
                f"{where}: every probe score is zero; the probe batches carry no loss "
                "(are all labels masked? check data.train and probe.seq_len)"
            )
        return self

    def to_json(self) -> dict:
        blob = {
            "model": self.model,
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "batches": self.batches,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "model_fingerprint": self.model_fingerprint,
            "layers": [asdict(layer) for layer in self.layers],
            "layout": self.layout,
        }
        if self.experts:
            blob["experts"] = [asdict(e) for e in self.experts]
            blob["routers"] = {str(k): v for k, v in self.routers.items()}
        return blob

    @classmethod
    def from_json(cls, blob: dict, where: str = "probe.json") -> "ProbeReport":
        parsed = ProbeJson.parse(blob, where)
        report = cls(
            **parsed.model_dump(exclude={"layers", "experts"}),
            layers=[LayerScore(**x.model_dump()) for x in parsed.layers],
            experts=[ExpertScore(**e.model_dump()) for e in parsed.experts],
        )
        if report.num_layers != len(report.layers):
            raise ConfigError(f"{where}: num_layers={report.num_layers} but {len(report.layers)} layer entries")
        if not report.layout.get("module_kinds"):
            raise ConfigError(f"{where}: missing layout.module_kinds; regenerate it with `aletheia-ds probe`")
        # a hand-edited or foreign report would otherwise fail planning with a KeyError on a module name
        described = set(report.layout["module_kinds"]) & set(report.layout.get("module_paths") or {})
        scored = sorted({key for layer in report.layers for key in layer.modules} - described)
        if scored:
            raise ConfigError(
                f"{where}: layers score modules {scored[:5]} that layout.module_kinds/module_paths "
                "do not describe; regenerate it with `aletheia-ds probe`"
            )
        return report.validate(where)

    def check_fits(self, model_layout: dict, num_layers: int, model_fingerprint: str, where: str) -> "ProbeReport":
        """Refuse a report made on another model: layer count, layer container, module names and shapes, hidden
        size (what `Layout.to_json` records of the model at hand), then the fingerprint when both have one."""
        mine = self.layout

        def differs(what: str, then, now) -> ConfigError:
            return ConfigError(
                f"{where} was made on another model ({what}: {then} in the report, {now} in this "
                "model); probe this model (leave probe.report unset) or give its own probe.json"
            )

        if self.num_layers != num_layers:
            raise differs("decoder layers", self.num_layers, num_layers)
        if mine.get("layers_path") != model_layout.get("layers_path"):
            raise differs("layers at", mine.get("layers_path"), model_layout.get("layers_path"))
        then_paths, now_paths = mine.get("module_paths") or {}, model_layout.get("module_paths") or {}
        if then_paths != now_paths:
            names = sorted(set(then_paths) ^ set(now_paths)) or sorted(
                k for k in then_paths if then_paths[k] != now_paths[k]
            )
            raise differs(f"modules {names[:5]}", sorted(then_paths)[:8], sorted(now_paths)[:8])
        then_shapes, now_shapes = mine.get("module_shapes") or {}, model_layout.get("module_shapes") or {}
        changed = sorted(k for k in then_shapes if k in now_shapes and list(then_shapes[k]) != list(now_shapes[k]))
        if changed:
            key = changed[0]
            raise differs(f"{key} in x out features", then_shapes[key], now_shapes[key])
        if (
            mine.get("hidden_size")
            and model_layout.get("hidden_size")
            and mine["hidden_size"] != model_layout["hidden_size"]
        ):
            raise differs("hidden size", mine["hidden_size"], model_layout["hidden_size"])
        return self.check_fingerprint(model_fingerprint, where)

    def check_fingerprint(self, model_fingerprint: str, where: str) -> "ProbeReport":
        """Refuse a report whose recorded model fingerprint (model.fingerprint_digest) is not `model_fingerprint`;
        a report older than the fingerprint passes."""
        if self.model_fingerprint and model_fingerprint and self.model_fingerprint != model_fingerprint:
            raise ConfigError(
                f"{where} was made on another model (fingerprint of config.json and weight file "
                f"sizes: {self.model_fingerprint} in the report, {model_fingerprint} in this model); "
                "probe this model (leave probe.report unset) or give its own probe.json"
            )
        return self

    @classmethod
    def load(cls, path: str | Path) -> "ProbeReport":
        blob = read_json_object(path, "probe report")
        return cls.from_json(blob, str(path))
