"""ProbeReport: the probe's result and its probe.json form (pure data, no torch).

Score definition (fixed so results compare across tools):
  module score = sqrt(mean over probe batches of ||dL_b/dW||_F^2), L_b = the model's mean token loss on batch b
  expert score = the same for expert e's slices of its layer's fused banks: sqrt(sum over banks of bank score^2)
  router score = the same for the router weight of a MoE layer (reported, not part of the layer score)
  layer score  = sqrt(sum over the layer's modules of module score^2 + sum over its experts of expert score^2)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..io import read_json_object


@dataclass
class LayerScore:
    index: int
    score: float
    modules: dict[str, float]


@dataclass
class ExpertScore:
    layer: int
    expert: int
    score: float
    tokens: int  # real (non-pad) tokens routed to this expert over all probe batches
    banks: dict[str, float] = field(default_factory=dict)  # per fused bank: "gate_up_proj", "down_proj"


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
            energy = sum(s * s for s in layer.modules.values()) + \
                sum(e.score * e.score for e in experts if e.layer == layer.index)
            layer.score = math.sqrt(energy)
        return self

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
            raise ConfigError(f"{where}: non-finite probe scores in layers {bad}; check the data and model dtype "
                              "(try model.dtype=float32)")
        if all(s == 0.0 for s in scores):
            raise ConfigError(f"{where}: every probe score is zero; the probe batches carry no loss "
                              "(are all labels masked? check data.train and probe.seq_len)")
        return self

    def to_json(self) -> dict:
        blob = {"model": self.model, "num_layers": self.num_layers, "tokens": self.tokens,
                "seconds": round(self.seconds, 4), "batches": self.batches, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "layers": [asdict(layer) for layer in self.layers], "layout": self.layout}
        if self.experts:
            blob["experts"] = [asdict(e) for e in self.experts]
            blob["routers"] = {str(k): v for k, v in self.routers.items()}
        return blob

    @classmethod
    def from_json(cls, blob: dict, where: str = "probe.json") -> "ProbeReport":
        try:
            layers = [LayerScore(int(x["index"]), float(x["score"]), {str(k): float(v) for k, v in x["modules"].items()})
                      for x in blob["layers"]]
            report = cls(model=str(blob.get("model", "")), num_layers=int(blob["num_layers"]),
                         tokens=int(blob.get("tokens", 0)), seconds=float(blob.get("seconds", 0.0)),
                         batches=int(blob.get("batches", 0)), layers=layers, layout=dict(blob.get("layout", {})),
                         experts=[ExpertScore(int(e["layer"]), int(e["expert"]), float(e["score"]), int(e["tokens"]),
                                              {str(k): float(v) for k, v in e.get("banks", {}).items()})
                                  for e in blob.get("experts", [])],
                         routers={int(k): float(v) for k, v in blob.get("routers", {}).items()},
                         world_size=int(blob.get("world_size", 1)), batch_size=int(blob.get("batch_size", 0)),
                         seq_len=int(blob.get("seq_len", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{where}: not a probe report ({type(err).__name__}: {err}); "
                              "regenerate it with `aletheia-ds probe`") from None
        if report.num_layers != len(report.layers):
            raise ConfigError(f"{where}: num_layers={report.num_layers} but {len(report.layers)} layer entries")
        if not report.layout.get("module_kinds"):
            raise ConfigError(f"{where}: missing layout.module_kinds; regenerate it with `aletheia-ds probe`")
        return report.validate(where)

    @classmethod
    def load(cls, path: str | Path) -> "ProbeReport":
        blob = read_json_object(path, "probe report")
        return cls.from_json(blob, str(path))
