"""Pure cost model: predicted step time of a plan and its calibration (the budget rule that uses it: plan.py).

Where the time of a LoRA step goes (frozen base, adapters on some layers):
  base          embeddings + every layer's forward + LM head forward/backward + loss + optimizer fixed cost
  depth         backward through every layer from the top down to the lowest adapted layer (input gradients
                of frozen layers), plus their recompute under gradient checkpointing; nothing below it
  adapters      a fixed cost per adapted module (launches, elementwise work, optimizer) plus a part that
                grows with r * (d_in + d_out)

  step = base + sum_{i >= lowest} w_i * depth_per_layer + sum_adapters (fixed + width * r * (d_in + d_out))

with w_i = parameters of layer i / mean layer parameters. `analytic` fills the four numbers from FLOPs;
`fit` calibrates them on the hardware from a few timed steps (aletheia_ds/speed.py, `aletheia-ds bench`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Iterable, Sequence

from pydantic import Field

from .config import ArtefactSchema, ConfigError
from .io import read_json_object, write_json_atomic
from .probe.report import ProbeReport

# one adapted module as the cost model sees it: (layer, rank, d_in, d_out)
AdapterShape = tuple[int, int, int, int]

UNIFORM_RANK = 16  # the baseline: PEFT LoRA r16 on every target module of every layer


class CostJson(ArtefactSchema):
    """cost.json as `CostModel.to_json` writes it."""

    what: ClassVar[str] = "cost model"
    written_by: ClassVar[str] = "aletheia-ds bench"

    base_s: float
    depth_s: float
    adapter_fixed_s: float
    adapter_width_s: float
    layer_weights: list[float]
    module_shapes: dict[str, Annotated[list[int], Field(min_length=2, max_length=2)]]  # [d_in, d_out]
    checkpointing: bool = False
    calibrated: bool = False
    tokens_per_step: int = 0
    source: str = "analytic"
    fit_residuals: list[float] = []


@dataclass
class CostModel:
    base_s: float
    depth_s: float  # per (mean-sized) layer between the top and the lowest adapted layer
    adapter_fixed_s: float
    adapter_width_s: float  # per unit of r * (d_in + d_out)
    layer_weights: list[float]
    module_shapes: dict[str, list[int]]
    checkpointing: bool = False
    calibrated: bool = False
    tokens_per_step: int = 0
    source: str = "analytic"
    fit_residuals: list[float] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layer_weights)

    # ------------------------------------------------------------ prediction
    def depth_seconds(self, lowest: int) -> float:
        return self.depth_s * sum(self.layer_weights[lowest:])

    def adapter_seconds(self, rank: int, d_in: int, d_out: int) -> float:
        return self.adapter_fixed_s + self.adapter_width_s * rank * (d_in + d_out)

    def predict(self, adapters: Sequence[AdapterShape]) -> float:
        if not adapters:
            return self.base_s
        lowest = min(a[0] for a in adapters)
        return self.base_s + self.depth_seconds(lowest) + sum(self.adapter_seconds(r, i, o) for _, r, i, o in adapters)

    def plan_adapters(self, plan) -> list[AdapterShape]:
        return [(m.layer, m.r, *self.module_shapes[m.key]) for m in plan.modules] + expert_adapters(plan)

    def uniform_adapters(self, rank: int = UNIFORM_RANK) -> list[AdapterShape]:
        return [(layer, rank, *shape) for layer in range(self.num_layers) for shape in self.module_shapes.values()]

    def uniform_seconds(self) -> float:
        return self.predict(self.uniform_adapters())

    def describe(self, plan) -> dict:
        step = self.predict(self.plan_adapters(plan))
        uniform = self.uniform_seconds()
        return {
            "step_seconds": step,
            "uniform_step_seconds": uniform,
            "fraction_of_uniform": step / uniform,
            "speedup_vs_uniform": uniform / step,
            "checkpointing": self.checkpointing,
            "calibrated": self.calibrated,
            "source": self.source,
            "tokens_per_step": self.tokens_per_step,
        }

    # ------------------------------------------------------------ construction
    @classmethod
    def analytic(
        cls, report: ProbeReport, checkpointing: bool = False, flops_per_s: float = 4e14, adapter_fixed_s: float = 6e-5
    ) -> "CostModel":
        """From FLOPs only (a fallback; `fit` on timed steps is better).

        Per token: a frozen layer costs 2P FLOPs forward and 2P backward (input gradients only) plus
        attention (4*S*H forward, twice that backward); an adapter costs 6 r (d_in + d_out) (forward,
        and the A, B and input gradients in backward). Checkpointing adds one more forward per layer
        of the adapted span. `adapter_fixed_s` stands for launches and elementwise passes.
        """
        layout = report.layout
        shapes = layout.get("module_shapes") or {}
        if not shapes:
            raise ConfigError("probe.json has no layout.module_shapes; regenerate it with this version's probe")
        params = layout.get("layer_params") or [1] * report.num_layers
        mean_params = sum(params) / len(params)
        tokens = report.batch_size * report.seq_len or max(1, report.tokens // max(1, report.batches))
        seq = report.seq_len or 1
        hidden = layout.get("hidden_size") or 0
        vocab = layout.get("vocab_size") or 0
        attention = 4 * tokens * seq * hidden / 2  # causal: half the score matrix
        layer_forward = 2 * tokens * mean_params + attention
        layer_backward = 2 * tokens * mean_params + 2 * attention
        head = 2 * tokens * hidden * vocab
        base = report.num_layers * layer_forward + 2 * head
        depth = layer_backward + (layer_forward if checkpointing else 0.0)
        return cls(
            base_s=base / flops_per_s,
            depth_s=depth / flops_per_s,
            adapter_fixed_s=adapter_fixed_s,
            adapter_width_s=6 * tokens / flops_per_s,
            layer_weights=[p / mean_params for p in params],
            module_shapes=shapes,
            checkpointing=checkpointing,
            calibrated=False,
            tokens_per_step=tokens,
            source=f"analytic ({flops_per_s:.1e} FLOP/s)",
        )

    @classmethod
    def fit(
        cls,
        measurements: Sequence[tuple[Sequence[AdapterShape], float]],
        layer_weights: list[float],
        module_shapes: dict[str, list[int]],
        checkpointing: bool,
        tokens_per_step: int,
        source: str = "calibrated",
    ) -> "CostModel":
        """Least squares over timed steps (adapters, seconds) for the four coefficients, all kept >= 0."""
        import numpy as np

        def features(adapters: Sequence[AdapterShape]) -> list[float]:
            lowest = min(a[0] for a in adapters)
            return [
                1.0,
                sum(layer_weights[lowest:]),
                float(len(adapters)),
                float(sum(r * (i + o) for _, r, i, o in adapters)),
            ]

        rows = np.array([features(a) for a, _ in measurements])
        times = np.array([t for _, t in measurements])
        active = list(range(4))
        # non-negative least squares by elimination: drop a negative coefficient and refit
        while True:
            coef_active, *_ = np.linalg.lstsq(rows[:, active], times, rcond=None)
            if (coef_active >= 0).all() or len(active) == 1:
                break
            active.pop(int(np.argmin(coef_active)))
        coef = np.zeros(4)
        coef[active] = np.clip(coef_active, 0, None)
        residuals = (rows @ coef - times) / times
        return cls(
            base_s=float(coef[0]),
            depth_s=float(coef[1]),
            adapter_fixed_s=float(coef[2]),
            adapter_width_s=float(coef[3]),
            layer_weights=list(layer_weights),
            module_shapes=module_shapes,
            checkpointing=checkpointing,
            calibrated=True,
            tokens_per_step=tokens_per_step,
            source=source,
            fit_residuals=[float(x) for x in residuals],
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, blob: dict, where: str = "cost.json") -> "CostModel":
        return cls(**CostJson.parse(blob, where).model_dump())

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        blob = read_json_object(path, "cost model")
        return cls.from_json(blob, str(path))

    def check_matches(self, report: ProbeReport, where: str) -> "CostModel":
        if self.num_layers != report.num_layers or set(self.module_shapes) != set(report.layout["module_shapes"]):
            raise ConfigError(
                f"{where}: calibrated for {self.num_layers} layers / modules {sorted(self.module_shapes)}, "
                f"but the probe has {report.num_layers} layers / {sorted(report.layout['module_shapes'])}"
            )
        return self


def lora_step_flops_per_token(
    layer_params: Sequence[int], hidden: int, vocab: int, seq_len: int, adapters: Sequence[AdapterShape]
) -> float:
    """Model FLOPs of one token of a LoRA training step (the numerator of MFU), dense decoders.

    The usual MFU convention (PaLM, Megatron): matrix products only, recompute not counted, attention
    scores over the whole S x S matrix (4*S*H forward per layer, twice that backward). For LoRA on a
    frozen base: every layer's forward (2P + attention), the LM head's forward and input gradient
    (2*H*V each), input gradients (2P + 2*attention) for every layer from the lowest adapted one up, and
    6 r (d_in + d_out) per adapter (its forward, and the gradients of A, B and its input). Counted though
    autograd skips them: the input gradients of the lowest adapted layer's q/k/v projections, whose input
    needs none (under 0.1% of a 72B step; tests/unit/test_cost.py checks the rest against torch's counter).
    """
    attention = 4 * seq_len * hidden
    forward = sum(2 * p + attention for p in layer_params)
    head = 2 * 2 * hidden * vocab
    if not adapters:
        return float(forward + head / 2)
    lowest = min(a[0] for a in adapters)
    backward = sum(2 * p + 2 * attention for p in layer_params[lowest:])
    lora = sum(6 * r * (d_in + d_out) for _, r, d_in, d_out in adapters)
    return float(forward + head + backward + lora)


def expert_adapters(plan) -> list[AdapterShape]:
    """Expert adapters as the cost model sees them: one per fused bank of each MoE layer with planned experts.

    An expert's adapter only works on the tokens routed to it, so each bank's width term counts the rank
    times the planned experts' token shares (a fractional effective rank); the fixed term is paid once per
    bank (one adapter module wraps the whole bank). PEFT forms the bank's delta B@A for every expert each
    step, a term this model does not count; tools/bench_moe.py measures it.
    """
    return [
        (layer, sum(e.r * e.token_share for e in experts), bank.in_features, bank.out_features)
        for layer, experts, bank, _ in (plan.expert_banks() if hasattr(plan, "expert_banks") else ())
    ]


def measurement_plans(num_layers: int, module_shapes: dict[str, list[int]]) -> dict[str, list[AdapterShape]]:
    """The few configurations timed for calibration: they separate depth, adapter count and width."""
    shapes = list(module_shapes.values())
    top, half = num_layers - 1, num_layers // 2

    def layers(which: Iterable[int], rank: int) -> list[AdapterShape]:
        return [(layer, rank, *shape) for layer in which for shape in shapes]

    # uniform vs every_other: same depth, half the adapters; every_other vs upper_half: same adapters, half
    # the depth; upper_half r16 vs r64: same count and depth, 4x the width; one module on top: the base
    return {
        "uniform_r16": layers(range(num_layers), UNIFORM_RANK),
        "every_other_r16": layers(range(0, num_layers, 2), UNIFORM_RANK),
        "upper_half_r16": layers(range(half, num_layers), UNIFORM_RANK),
        "upper_half_r64": layers(range(half, num_layers), 64),
        "top_layer_one_module_r16": [(top, UNIFORM_RANK, *shapes[0])],
    }


def layer_activation_bytes(
    hidden: int, intermediate: int, kv_dim: int, tokens: int, dtype_bytes: int = 2, lora_ranks: int = 0
) -> int:
    """GPU memory a dense decoder layer with LoRA keeps for its backward when it is not checkpointed.

    Per token, what autograd saves: the two norms' inputs and outputs (4 hidden; the outputs are the inputs
    of q/k/v and gate/up and of their LoRA A), the attention's q, output and k/v (2 hidden + 2 kv; flash/SDPA
    keep no S x S matrix), the MLP's gate and up outputs, the activation and the down projection's input
    (4 intermediate), and each adapter's A output (`lora_ranks`: the layer's ranks summed). A checkpointed
    layer keeps only its input, so this is what stopping its recompute costs. tests/unit/test_recompute.py
    checks it against the bytes autograd saves.
    """
    return (6 * hidden + 2 * kv_dim + 4 * intermediate + lora_ranks) * tokens * dtype_bytes


def layers_without_recompute(
    free_bytes: float, per_layer_bytes: float, adapted_layers: int, margin: float = 1.25
) -> int:
    """How many adapted layers can keep their activations in `free_bytes` (the memory a fully checkpointed step
    left unused), each costing `per_layer_bytes` times `margin` (the estimate's error, allocator rounding)."""
    if per_layer_bytes <= 0 or free_bytes <= 0:
        return 0
    return max(0, min(adapted_layers, int(free_bytes // (per_layer_bytes * margin))))
