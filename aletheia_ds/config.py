"""Typed run configuration: YAML file + command-line overrides, validated with pydantic.

Every section is a pydantic model with documented defaults (`aletheia-ds defaults` prints them).
Errors are one line that names the knob: `ConfigError("plan.top_pct must be in (0, 100], got 0")`.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; the message names the file/field."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient norm); the message names the step and the last
    good checkpoint."""


# exit status of a job stopped by SIGTERM after writing its checkpoint: EX_TEMPFAIL ("try again later"), which a
# scheduler's requeue rule can tell from 143 (killed before it could save) and from 1-3 (failed)
PREEMPTED_EXIT = 75
INTERRUPTED_EXIT = 130  # Ctrl-C, as a shell reports SIGINT


class Stopped(TrainingError):
    """The job was told to stop (SIGTERM, Ctrl-C) and stopped cleanly; the message says how to resume."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Wording:
    """Words a knob's range error adds to its bounds: `rank must be > 0`, `must be >= 1 (or unset for all rows)`."""

    subject: str = ""
    note: str = ""


# kinds of knob: pydantic checks the bounds, and `_range_error` says them back in the knob's error
OneOrMore = Annotated[int, Field(ge=1)]
ZeroOrMore = Annotated[int, Field(ge=0)]  # 0: off
Rank = Annotated[int, Field(gt=0), Wording(subject="rank")]
Alpha = Annotated[Optional[float], Field(gt=0), Wording(subject="alpha")]  # unset: 2 x the rank
Fraction = Annotated[float, Field(gt=0, le=1)]
Share = Annotated[float, Field(ge=0, lt=1)]  # a part set aside, never the whole
FiniteNonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# torch generators take 64-bit seeds and the data order mixes the seed with the epoch number
Seed = Annotated[int, Field(ge=0, lt=2**32)]


def exit_code(err: ConfigError | TrainingError, announce: bool = True) -> int:
    """What every command line does with these errors: one `error: ...` line on stderr (when `announce`) and
    exit status 2 for input the user can fix, 3 when training could not go on; a stopped job says so and
    exits with its own status (PREEMPTED_EXIT, INTERRUPTED_EXIT)."""
    if announce:
        print(f"{'stopped' if isinstance(err, Stopped) else 'error'}: {err}", file=sys.stderr, flush=True)
    if isinstance(err, Stopped):
        return err.status
    return 2 if isinstance(err, ConfigError) else 3


Artefact = TypeVar("Artefact", bound="ArtefactSchema")


class ArtefactSchema(BaseModel):
    """The JSON form of an artefact (probe.json, plan.json, cost.json), checked before it becomes its dataclass:
    a file that does not fit is one line naming the file, the field, and the command that writes it anew."""

    what: ClassVar[str]  # "plan"
    written_by: ClassVar[str]  # "aletheia-ds plan"

    @classmethod
    def parse(cls: type[Artefact], blob: Any, where: str) -> Artefact:
        try:
            return cls.model_validate(blob)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "top level"
            got = first.get("input")
            got_text = "" if isinstance(got, (dict, list)) else f", got {got!r:.60}"
            raise ConfigError(
                f"{where}: not a {cls.what} ({field}: {first['msg']}{got_text}); regenerate it with `{cls.written_by}`"
            ) from None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            # the same one line whether the section comes from a file or from code (tools, tests); pydantic calls
            # this for nested sections too, and `_flatten_error` passes their line on
            raise _flatten_error(err, "", type(self), _section_name(type(self))) from None


class ModelSection(Section):
    path: str = Field("", description="local Hugging Face model directory (config.json + weights)")
    tokenizer: Optional[str] = Field(None, description="local tokenizer directory; defaults to model.path")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU"
    )
    random_init: bool = Field(False, description="allow a directory with config.json only: random weights (seeded)")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model; off unless asked")
    attn_implementation: Optional[str] = Field(None, description="e.g. sdpa, eager, flash_attention_2")


class DataSource(Section):
    """One entry of data.train written as a list: a file or datasets folder and its share of the mixture."""

    path: str = Field(..., min_length=1, description="JSONL/JSON/parquet/CSV/Arrow file or a datasets dir")
    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="relative share of the training rows drawn from this source"
    )


class DataSection(Section):
    train: Union[str, list[DataSource]] = Field(
        "",
        description="JSONL ({text} | {prompt,completion} | {messages}), JSON, parquet, CSV, Arrow or a datasets "
        "dir; or a list of {path, weight} sources interleaved by weight (order fixed by train.seed)",
    )
    mix_until: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="a mixture of several data.train sources ends when the first source runs out "
        "(no row twice) or when every source has (sources that run out early repeat)",
    )
    chat_template: Optional[str] = Field(
        None, description="Jinja file replacing the tokenizer's chat template (for tokenizers without one)"
    )
    eval: Optional[str] = Field(None, description="held-out file; default: the last eval_fraction of train")
    eval_fraction: Share = Field(0.05, description="share of train held out when data.eval is unset")
    eval_batches: ZeroOrMore = Field(8, description="held-out batches scored before and after training (0: skip)")
    seq_len: int = Field(1024, ge=2, description="tokens per example (truncated on the right)")
    packing: bool = Field(
        False,
        description="whole examples one after another in rows of up to seq_len tokens; "
        "position ids restart and attention stays within each example",
    )
    max_examples: Annotated[Optional[int], Wording(note="or unset for all rows")] = Field(
        None, ge=1, description="use only the first N usable examples of train (of the mixture, with several sources)"
    )
    cache_dir: Optional[str] = Field(None, description="tokenize once into this Arrow cache; ranks memory-map it")
    cache_shared: bool = Field(False, description="cache_dir is one file system for all nodes: rank 0 alone tokenizes")
    num_proc: OneOrMore = Field(1, description="tokenizer worker processes when filling data.cache_dir")

    @field_validator("train", mode="before")
    @classmethod
    def _check_sources(cls, value: Any) -> Any:
        # one entry at a time: pydantic's error for a str-or-list union names neither the entry nor its field
        if not isinstance(value, (list, tuple)):
            return value
        sources = []
        for index, entry in enumerate(value):
            if not isinstance(entry, dict):
                raise ConfigError(f"data.train[{index}]: must be {{path: ..., weight: ...}}, got {entry!r:.80}")
            unknown = sorted(set(entry) - set(DataSource.model_fields))
            if unknown:
                raise ConfigError(f"data.train[{index}]: unknown key {unknown[0]!r}; a source has path and weight")
            try:
                sources.append(DataSource(**entry))
            except ConfigError as err:
                raise ConfigError(f"data.train[{index}].{err}") from None
        return sources

    def train_sources(self) -> list[DataSource]:
        """data.train as sources: a plain path is one source of weight 1."""
        return [DataSource(path=self.train)] if isinstance(self.train, str) else list(self.train)


class ProbeSection(Section):
    batches: OneOrMore = Field(8, description="probe batches (examples in file order)")
    batch_size: OneOrMore = Field(4, description="examples per probe batch")
    seq_len: Optional[int] = Field(None, description="defaults to data.seq_len")
    gradient_checkpointing: Optional[bool] = Field(None, description="defaults to train.gradient_checkpointing")
    report: Optional[str] = Field(None, description="reuse this probe.json instead of probing")
    sketch_dim: int = Field(
        32,
        ge=0,
        le=1024,
        description="columns of the random sketch that separates each "
        "module's gradient signal from batch noise (plan.score signal/lowrank/relative); 0: raw "
        "norms only",
    )


class PlanSection(Section):
    rule: Literal["top_pct", "budget", "cut", "upper", "all", "pilot"] = Field(
        "top_pct",
        description="top_pct: the paper's rule; budget: cost-aware, the most probe score within the "
        "budget; cut: cut-first coverage, every layer from the lowest cut that meets the budget up, ranks by score; "
        "upper: the upper top_pct% of layers; all: LoRA on every layer; pilot: uniform r16 for the first "
        "pilot_fraction of the steps, then the cut that meets the budget placed from what the adapters learned "
        "(guard applies), the adapters below it frozen and backward stopped there",
    )
    pilot_fraction: float = Field(
        0.1, gt=0, lt=1, description="rule pilot: share of the training steps run uniform before the cut is placed"
    )
    score: Literal["raw", "signal", "lowrank", "relative"] = Field(
        "raw",
        description="probe score the rules rank by: raw ||dL/dW||; signal: its batch-noise-free part; lowrank: "
        "the signal a rank-16 adapter can capture; relative: signal / ||W|| (all but raw need probe.sketch_dim > 0)",
    )
    min_r: Rank = Field(16, description="rule cut: rank of the lowest-scoring layers of the adapted span")
    max_r: Rank = Field(
        64,
        description="rule cut: rank of the highest-scoring layers (powers of two between "
        "min_r and max_r go to the layers in between, by score)",
    )
    rank_scaling: Literal["standard", "rslora"] = Field(
        "rslora",
        description="rule cut: alpha = 2r (standard) or 2 sqrt(min_r r) (rank-stabilised: the update's "
        "scale does not grow with r, so ranks of one plan are comparable)",
    )
    guard: Fraction = Field(
        1.0,
        description="rule cut: the cut moves down (past the budget) while more than "
        "this share of the score energy lies below it; 1: no guard",
    )
    top_pct: float = Field(50.0, gt=0, le=100, description="percent of layers kept by score (rule top_pct)")
    budget: Fraction = Field(0.6, description="target step time as a fraction of uniform LoRA's (rules budget, cut)")
    granularity: Literal["layer", "module"] = Field(
        "layer", description="rule budget picks whole layers (every target module) or single modules"
    )
    attention_r: Rank = Field(16, description="LoRA rank on attention linears")
    mlp_r: Rank = Field(64, description="LoRA rank on MLP linears")
    attention_alpha: Alpha = Field(None, description="default 2 x attention_r")
    mlp_alpha: Alpha = Field(None, description="default 2 x mlp_r")
    plan: Optional[str] = Field(None, description="reuse this plan.json instead of planning")
    cost: Optional[str] = Field(None, description="cost.json from `aletheia-ds bench` (default: analytic FLOP model)")
    # mixture-of-experts layers: layers are chosen by the rule above (expert energy counts in a layer's score),
    # then experts within each chosen MoE layer by expert_rule
    expert_rule: Literal["energy", "top_k", "load", "all", "none"] = Field(
        "energy",
        description="experts adapted in each chosen MoE layer: energy: the fewest covering expert_energy "
        "of the layer's expert gradient energy; top_k: the expert_top_k highest scores; load: the expert_top_k "
        "with the most routed tokens; all: every expert; none: no expert adapters",
    )
    expert_energy: Fraction = Field(
        0.8, description="share of a layer's expert gradient energy to cover (expert_rule energy)"
    )
    expert_top_k: OneOrMore = Field(2, description="experts per chosen MoE layer (expert_rule top_k and load)")
    expert_r: Rank = Field(16, description="LoRA rank on each chosen expert's fused banks (gate_up_proj, down_proj)")
    expert_alpha: Alpha = Field(None, description="default 2 x expert_r")
    moe_attention: bool = Field(
        True,
        description="adapt the attention linears of chosen MoE layers (as in dense layers); false: experts only there",
    )
    shared_experts: Literal["with_layer", "all_moe_layers", "none"] = Field(
        "with_layer",
        description="shared-expert linears (rank mlp_r): in every chosen layer, in every MoE layer, or never",
    )
    routers: Literal["frozen", "lora"] = Field(
        "frozen",
        description="frozen: routing stays as probed; lora: LoRA (router_r) on the router weight of chosen MoE layers",
    )
    router_r: Rank = Field(4, description="LoRA rank on router weights (routers=lora)")


LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")
BASE_REWRITING_INITS = ("pissa", "olora")  # and pissa_niter_K: they subtract the adapter's start from W


class LoraSection(Section):
    target_modules: Optional[list[str]] = Field(
        None, description="restrict to these module keys (e.g. [q_proj, v_proj]); default: every attention/MLP linear"
    )
    dropout: Share = Field(0.0, description="lora_dropout")
    init_seed: Seed = Field(0, description="seed for the adapter's initial weights (same on every rank)")
    expert_forward: Literal["routed", "peft"] = Field(
        "routed",
        description="expert LoRA on fused banks: routed (on each planned expert's routed tokens, grouped GEMM) "
        "or peft (PEFT's whole-bank W + BA each step); same saved adapter",
    )
    variant: Literal["lora", "dora"] = Field(
        "lora",
        description="lora: plain LoRA; dora: weight-decomposed LoRA (PEFT use_dora: a trained magnitude per output "
        "row times the direction of W + BA)",
    )
    use_rslora: bool = Field(
        False,
        description="rank-stabilised scale alpha/sqrt(r) instead of alpha/r (PEFT use_rslora); not with plan.rule=cut "
        "and plan.rank_scaling=rslora, which already puts sqrt(r) into alpha",
    )
    init: str = Field(
        "default",
        description="initial adapter weights (PEFT init_lora_weights): default (A Kaiming, B zero) | gaussian | "
        "pissa | pissa_niter_K (K-iteration fast SVD) | olora | orthogonal; pissa and olora move the top of W into "
        "the adapter and the export converts it back to a plain LoRA on the original base",
    )

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v in LORA_INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", v):
            return v
        why = {
            "eva": "it needs a pass over the data before training",
            "corda": "it needs a pass over the data before training",
            "lora_ga": "it needs a pass over the data before training",
            "loftq": "it quantises the base model",
        }.get(v.lower())
        allowed = " | ".join([*LORA_INITS, "pissa_niter_K"])
        raise ValueError(f"{'not supported: ' + why + '; ' if why else ''}one of {allowed}")

    @property
    def rewrites_base(self) -> bool:
        """PiSSA and OLoRA start the adapter from the top of W and subtract that start from W itself."""
        return self.init.split("_niter_")[0] in BASE_REWRITING_INITS

    @model_validator(mode="after")
    def _init_with_variant(self) -> "LoraSection":
        if self.variant == "dora" and self.rewrites_base:
            # PEFT's conversion (LoraModel.subtract_mutated_init) rebuilds the A and B factors only
            raise ValueError(
                f"lora.init={self.init} with lora.variant=dora: the exported adapter is converted back to the "
                "original base (PEFT path_initial_model_for_weight_conversion), which keeps no DoRA magnitude; "
                "choose one of them"
            )
        return self


def rank_scaling_conflict(rule: str, rank_scaling: Optional[str], lora: "LoraSection") -> Optional[str]:
    """The one-line refusal when lora.use_rslora would scale a plan's ranks a second time, else None."""
    if lora.use_rslora and rule == "cut" and rank_scaling == "rslora":
        return (
            "lora.use_rslora=true: plan.rule=cut with plan.rank_scaling=rslora already gives alpha = 2 sqrt(min_r r), "
            "so rsLoRA's alpha/sqrt(r) on top would leave one scale, 2 sqrt(min_r), at every rank; set "
            "plan.rank_scaling=standard (alpha = 2r, scale 2 sqrt(r)) or lora.use_rslora=false"
        )
    return None


class TrainSection(Section):
    output_dir: str = Field("runs/default", description="probe.json, plan.json, metrics.jsonl, adapter/ land here")
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps; default: epochs over the data")
    # > 0: zero epochs would still train one step (the schedule rounds up)
    epochs: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="passes over the training data when max_steps is unset"
    )
    micro_batch_size: OneOrMore = Field(4, description="examples per rank per forward")
    grad_accum: OneOrMore = Field(1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    weight_decay: FiniteNonNegative = Field(
        0.0, description="AdamW weight decay (LoRA A/B matrices only; never biases)"
    )
    warmup_steps: Optional[int] = Field(None, ge=0, description="default: warmup_ratio x total steps")
    warmup_ratio: Share = Field(0.03, description="share of steps spent warming up")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warm-up (transformers.get_scheduler)"
    )
    max_grad_norm: FiniteNonNegative = Field(1.0, description="gradient clipping (0: off)")
    seed: Seed = Field(42, description="data order and dropout seed")
    gradient_checkpointing: bool = Field(False, description="non-reentrant activation checkpointing")
    no_recompute_layers: Union[int, Literal["auto"]] = Field(
        0,
        description="with gradient_checkpointing: the top N adapted layers keep their activations instead of "
        "recomputing them (0: every adapted layer recomputes); auto: after the first step, as many as the GPU "
        "memory left below the measured peak holds (cost.layer_activation_bytes per layer)",
    )
    liger: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="Liger kernels (pip install 'aletheia-ds[liger]'): fused linear cross-entropy, RMSNorm, SwiGLU, "
        "RoPE, for llama/mistral/qwen2/qwen3; auto: on when installed, on CUDA, for those families, not under ZeRO-3 "
        "(there true applies it without the fused loss)",
    )
    frozen_prefix: bool = Field(True, description="run layers below the lowest adapted layer under no_grad")
    sequence_parallel_size: OneOrMore = Field(
        1,
        description="Ulysses sequence parallelism (DeepSpeed ALST): ranks that split every sequence (attention "
        "heads exchanged all-to-all, loss tiled over the vocabulary); must divide the ranks and the attention heads",
    )
    tiled_mlp: bool = Field(
        False,
        description="run dense MLP blocks over slices of the sequence (DeepSpeed TiledMLP), recomputed in backward",
    )
    compile: bool = Field(False, description="torch.compile the adapted layers (ZeRO stage 0-2)")
    prefix_cache: bool = Field(
        False,
        description="keep the frozen prefix's output per example (CPU memory) and skip "
        "the prefix in later epochs; needs no dropout there and ZeRO stage 0-2",
    )
    log_every: OneOrMore = Field(1, description="steps between metrics lines")
    eval_every: ZeroOrMore = Field(
        0,
        description="steps between held-out evaluations logged to metrics.jsonl as "
        "eval_loss (0: only before and after training, in eval.json)",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="metrics backends besides metrics.jsonl (always written), rank 0 only: "
        "tensorboard (output_dir/tensorboard), wandb (offline unless WANDB_MODE is set), mlflow (output_dir/mlruns "
        "unless MLFLOW_TRACKING_URI is set)",
    )
    quiet: bool = Field(False, description="no progress bars: plain periodic lines (for logs)")
    save_every: ZeroOrMore = Field(0, description="steps between resumable checkpoints (0: only at the end)")
    keep_last: OneOrMore = Field(2, description="checkpoints kept")
    resume: Optional[str] = Field(
        None,
        description="auto (the latest checkpoint in output_dir, if any) | PATH "
        "(a checkpoints/ directory or one step-N checkpoint)",
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="non-finite loss/grad norm: stop (keep the last checkpoint) or skip that update"
    )
    max_nan_skips: ZeroOrMore = Field(10, description="skipped steps allowed under nan_policy=skip, then stop")
    objective: Literal["sft", "dpo", "simpo"] = Field(
        "sft",
        description="sft: next-token loss; dpo (reference: the base with the adapters off) or simpo (no reference) "
        "on {prompt, chosen, rejected} rows, as TRL computes them (docs/PREFERENCE.md)",
    )
    beta: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="dpo/simpo: TRL's beta (DPO: KL strength; SimPO: reward scale)"
    )
    simpo_gamma: FiniteNonNegative = Field(0.5, description="simpo: TRL's simpo_gamma, the target reward margin")
    cpo_alpha: FiniteNonNegative = Field(
        0.0, description="simpo: weight of the chosen rows' NLL (TRL's cpo_alpha; its default 1.0 is CPO-SimPO)"
    )
    router_aux_loss_coef: Optional[FiniteNonNegative] = Field(
        None,
        description="mixture-of-experts models: weight of the router load-balancing loss added to the training "
        "loss (TRL's router_aux_loss_coef); unset: the architecture's own coefficient, as TRL and LLaMA-Factory "
        "train; 0 turns it off. Training steps only: the probe and the held-out loss leave it out",
    )
    stop_grace_s: FiniteNonNegative = Field(
        120.0,
        description="seconds the scheduler allows between SIGTERM and the kill (SLURM KillWait, Kubernetes "
        "terminationGracePeriodSeconds): on SIGTERM the current step ends and a checkpoint is written unless the "
        "last one took longer than the time left; then the job exits 75",
    )

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))  # each backend once

    @field_validator("no_recompute_layers")
    @classmethod
    def _no_recompute_layers(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be >= 0 or auto, got {v}")
        return v

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not v.strip():
            raise ValueError("must be 'auto' or a checkpoint path, got an empty string")
        return v


class DeepSpeedSection(Section):
    config: str = Field("ds_configs/zero3.json", description="DeepSpeed JSON; 'auto' values are filled from train.*")
    overrides: dict[str, Any] = Field(default_factory=dict, description="keys merged into the DeepSpeed JSON")


class RaySection(Section):
    """launch/ray_train.py only: where and how wide the Ray Train job runs (the other launchers ignore it)."""

    address: Optional[str] = Field(
        None,
        description="Ray cluster: the head's host:port (6379 unless changed) or auto; default: RAY_ADDRESS "
        "as `ray job submit` sets it, else a new local Ray",
    )
    num_workers: OneOrMore = Field(1, description="training workers (processes), one per GPU when use_gpu")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL; false: CPU workers and gloo")
    resources_per_worker: Optional[dict[str, float]] = Field(
        None,
        description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}; default: Ray's (1 CPU, or 1 GPU when use_gpu)",
    )
    storage_path: Optional[str] = Field(
        None,
        description="run storage (a file system path every node sees: NFS, Lustre, a bucket mount); "
        "default: ~/ray_results",
    )
    name: Optional[str] = Field(
        None,
        description="run directory under storage_path; default: the last part of "
        "train.output_dir. Same name again: continue from its last checkpoint",
    )
    max_failures: int = Field(
        0, description="worker-group failures to recover from, each from the last checkpoint (-1: no limit)"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how Ray places the workers on nodes: PACK fills few nodes; STRICT_SPREAD puts each "
        "worker on a node of its own",
    )
    check_resources: bool = Field(
        True,
        description="refuse at once when the cluster cannot ever fit the workers "
        "(false for autoscaling clusters that grow on demand)",
    )

    @field_validator("max_failures")
    @classmethod
    def _failures(cls, v: int) -> int:
        # not a range: -1 is a sentinel, and ">= -1" would hide that
        if v < -1:
            raise ValueError(f"must be >= 0, or -1 for no limit, got {v}")
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, v: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        if v is not None:
            bad = {k: amount for k, amount in v.items() if not k or amount < 0}
            if bad:
                raise ValueError(f"resource amounts must be >= 0 with a name, got {bad}")
            if not any(amount > 0 for amount in v.values()):
                raise ValueError(f"needs at least one resource > 0, got {v}")
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "://" in v:
            # the run's checkpoints are DeepSpeed directories that every rank writes and reads in place
            raise ValueError(
                f"must be a file system path that every node sees (NFS, Lustre, or a bucket mounted "
                f"with s3fs/gcsfuse), got the URI {v!r}"
            )
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v or "/" in v or v in (".", "..")):
            raise ValueError(f"must be one directory name (no '/'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _gpu_resources(self) -> "RaySection":
        gpus = (self.resources_per_worker or {}).get("GPU")
        if self.use_gpu and gpus == 0:
            raise ValueError(
                "ray.resources_per_worker: GPU is 0 while ray.use_gpu is true; give each worker a GPU "
                "or set ray.use_gpu=false"
            )
        if not self.use_gpu and gpus:
            raise ValueError(
                f"ray.resources_per_worker: GPU is {gpus:g} while ray.use_gpu is false; set ray.use_gpu=true"
            )
        return self


class RunConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    plan: PlanSection = Field(default_factory=PlanSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="after")
    def _preference_data_path(self) -> "RunConfig":
        # pairs are two rows that must stay side by side in one batch; these paths handle single rows only
        if self.train.objective != "sft":
            for knob, on in (
                ("data.packing", self.data.packing),
                ("data.cache_dir", self.data.cache_dir),
                ("train.prefix_cache", self.train.prefix_cache),
                ("train.sequence_parallel_size", self.train.sequence_parallel_size > 1),
            ):
                if on:
                    raise ConfigError(
                        f"{knob}: not supported with train.objective={self.train.objective} (preference pairs); "
                        f"unset {knob} or use train.objective=sft"
                    )
        return self

    @model_validator(mode="after")
    def _lora_against_plan(self) -> "RunConfig":
        # a given plan.plan brings its own rule; aletheia_ds/adapters/peft_config.py checks that one
        problem = None if self.plan.plan else rank_scaling_conflict(self.plan.rule, self.plan.rank_scaling, self.lora)
        if problem:
            raise ConfigError(problem)
        return self

    def require_paths(self) -> None:
        """Checks that need the file system, done once at start-up rather than at parse time."""
        if not self.model.path:
            raise ConfigError("model.path is required: set it to a local Hugging Face model directory")
        if not Path(self.model.path).is_dir():
            raise ConfigError(f"model.path: directory {self.model.path!r} does not exist")
        if not (Path(self.model.path) / "config.json").is_file():
            raise ConfigError(f"model.path: {self.model.path!r} has no config.json")
        tok = self.model.tokenizer or self.model.path
        if not Path(tok).is_dir():
            raise ConfigError(f"model.tokenizer: directory {tok!r} does not exist")
        if not self.data.train:
            raise ConfigError("data.train is required: set it to a JSONL/parquet file or a datasets directory")
        sources = self.data.train_sources()
        named = (
            [("data.train", self.data.train)]
            if isinstance(self.data.train, str)
            else [(f"data.train[{i}].path", source.path) for i, source in enumerate(sources)]
        )
        for knob, value in (
            *named,
            ("data.eval", self.data.eval),
            ("data.chat_template", self.data.chat_template),
            ("probe.report", self.probe.report),
            ("plan.plan", self.plan.plan),
            ("plan.cost", self.plan.cost),
        ):
            if value and not Path(value).exists():
                raise ConfigError(f"{knob}: {value!r} does not exist")
        if self.deepspeed.config and not Path(self.deepspeed.config).is_file():
            shipped = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
            raise ConfigError(
                f"deepspeed.config: {self.deepspeed.config!r} does not exist"
                + (f" (ds_configs/ has {', '.join(shipped)})" if shipped else "")
            )


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# names other trainers use for our knobs (HF Trainer, axolotl, LLaMA-Factory)
ALIASES = {
    "learning_rate": "train.lr",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "max_grad_norm": "train.max_grad_norm",
    "warmup": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "lora_r": "plan.attention_r",
    "r": "plan.attention_r",
    "lora_alpha": "plan.attention_alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "max_seq_length": "data.seq_len",
    "sequence_len": "data.seq_len",
    "cutoff_len": "data.seq_len",
    "model_name_or_path": "model.path",
    "base_model": "model.path",
    "dataset": "data.train",
}


def _at(where: str, text: str) -> str:
    return f"{where}: {text}" if where else text


def _unknown_key_error(key: str, where: str) -> ConfigError:
    known = _known_keys(RunConfig)
    if "." not in key:  # a section name (`trian:`): a key of some section would be the wrong hint
        close = difflib.get_close_matches(key, list(RunConfig.model_fields), n=1, cutoff=0.5)
        hint = f"; did you mean section {close[0]!r}?" if close else ""
        return ConfigError(
            _at(where, f"unknown config section {key!r}{hint} (sections: {', '.join(RunConfig.model_fields)})")
        )
    section, _, leaf = key.rpartition(".")
    same_section = [k for k in known if k.startswith(section + ".")] if section else []
    close = (
        ([ALIASES[leaf]] if leaf in ALIASES else [])
        or difflib.get_close_matches(key, same_section, n=1, cutoff=0.6)
        or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    )
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(_at(where, f"unknown config key {key!r}{hint}"))


def _section_name(section: type[BaseModel]) -> str:
    return next((name for name, field in RunConfig.model_fields.items() if field.annotation is section), "")


def config_field(key: str, model: type[BaseModel] | None = None) -> FieldInfo | None:
    """The field behind a dotted knob name (`plan.top_pct`), or None where the name goes past the sections."""
    model, field = model or RunConfig, None
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = field.annotation
    return field


def _number(bound: float) -> str:
    if isinstance(bound, int) and bound >= 2**16 and bound & (bound - 1) == 0:
        return f"2**{bound.bit_length() - 1}"
    return f"{bound:g}"


_BOUND_WORDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _allowed_range(field: FieldInfo) -> str:
    """A bounded knob's allowed values as its error says them: `in (0, 100]`, `>= 1`, `a finite number > 0`."""
    bounds = {
        name: getattr(m, name) for m in field.metadata for name in _BOUND_WORDS if getattr(m, name, None) is not None
    }
    low = next((name for name in ("gt", "ge") if name in bounds), None)
    high = next((name for name in ("lt", "le") if name in bounds), None)
    if low and high:
        text = (
            f"in {'(' if low == 'gt' else '['}{_number(bounds[low])}, "
            f"{_number(bounds[high])}{')' if high == 'lt' else ']'}"
        )
    else:
        text = " ".join(f"{_BOUND_WORDS[name]} {_number(bounds[name])}" for name in (low, high) if name)
    finite = any(getattr(m, "allow_inf_nan", True) is False for m in field.metadata)
    return f"a finite number {text}".strip() if finite else text


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _range_error(field: FieldInfo, got: Any) -> str:
    wording = next((m for m in field.metadata if isinstance(m, Wording)), Wording())
    note = f" ({wording.note})" if wording.note else ""
    return f"{wording.subject} must be {_allowed_range(field)}{note}, got {got!r:.80}".lstrip()


def _flatten_error(
    err: ValidationError, where: str, model: type[BaseModel] | None = None, prefix: str = ""
) -> ConfigError:
    """pydantic's first error as one line naming the knob; `model` is the class validated (default RunConfig),
    `prefix` its section name."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a nested section's own __init__ has said it already
        return ConfigError(_at(where, str(cause)))
    key = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    if first["type"] == "extra_forbidden":
        return _unknown_key_error(key, where)
    field = config_field(".".join(str(p) for p in first["loc"]), model)
    got = first.get("input")
    if first["type"] in _RANGE_ERRORS and field is not None:
        return ConfigError(_at(where, f"{key}: {_range_error(field, got)}"))
    msg = first["msg"].removeprefix("Value error, ")
    got_text = "" if isinstance(got, dict) or "got" in msg else f" (got {got!r:.80})"
    if msg.startswith(f"{key}."):  # a check across a section's keys names its knob itself
        return ConfigError(_at(where, msg))
    return ConfigError(_at(where, f"{key}: {msg}{got_text}"))


def _set_dotted(tree: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    if len(parts) < 2 or any(not p for p in parts):
        raise ConfigError(f"{where}: override {key!r} must look like section.key=value (e.g. train.lr=1e-4)")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key_error(key, where)
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> tuple[Optional[str], list[tuple[str, Any]]]:
    """`--config F`, then `section.key=value` or `--section.key value` pairs; `--resume X` is train.resume.

    `--local_rank` from the DeepSpeed launcher is accepted and ignored (LOCAL_RANK is read from the env).
    """
    config_path = None
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            i += 1 if "=" in arg else 2
            continue
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
                i += 1
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"command line: {arg} needs a value")
                key, raw = body, args[i + 1]
                i += 2
        elif "=" in arg:
            key, raw = arg.split("=", 1)
            i += 1
        else:
            raise ConfigError(f"command line: cannot read {arg!r}; use --config FILE and section.key=value")
        key = key.replace("-", "_")
        if key == "config":
            config_path = raw
            continue
        if key == "resume":
            key = "train.resume"
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError):  # ValueError: an integer past Python's digit limit
            value = raw
        overrides.append((key, value))
    return config_path, overrides


def load_config(argv: list[str] | None = None, *, base: dict | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> validated RunConfig."""
    config_path, overrides = parse_overrides(list(argv or []))
    tree: dict = dict(base or {})
    where = "command line"
    if config_path:
        where = config_path
        tree = read_yaml(config_path)
        if overrides:
            validate_shape(tree, where)
    for key, value in overrides:
        if key.startswith("deepspeed.overrides."):
            # free-form DeepSpeed keys: nested as written, validated later by DeepSpeed itself
            node = tree.setdefault("deepspeed", {}).setdefault("overrides", {})
            parts = key.removeprefix("deepspeed.overrides.").split(".")
            if not isinstance(node, dict) or any(not p for p in parts):
                raise ConfigError(
                    f"{where} (override {key}): must look like deepspeed.overrides.KEY[.KEY...]=value "
                    "with deepspeed.overrides a mapping"
                )
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{where} (override {key}): {part!r} already holds a value, not a mapping")
            node[parts[-1]] = value
            continue
        if key not in _known_keys(RunConfig):
            raise _unknown_key_error(key, f"{where} (override)")
        _set_dotted(tree, key, value, f"{where} (override {key})")
    validate_shape(tree, where)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        # a bad value given on the command line is the command line's, not the file's (the one-line error
        # starts with the knob it is about)
        knob = str(_flatten_error(err, "")).split(":", 1)[0].split(" ", 1)[0]
        given = any(knob == key or knob.startswith(key + ".") for key, _ in overrides)
        raise _flatten_error(err, "command line" if given else where) from None


def validate_shape(tree: Any, where: str) -> None:
    """A mapping of known sections, each a mapping: checked before overrides are merged into it."""
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections "
            f"(model, data, probe, plan, lora, train, deepspeed, ray), got {type(tree).__name__}"
        )
    for section, body in tree.items():
        if not isinstance(section, str) or section not in RunConfig.model_fields:
            raise _unknown_key_error(str(section), where)
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {type(body).__name__}")


def validate_tree(tree: Any, where: str) -> RunConfig:
    validate_shape(tree, where)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise _flatten_error(err, where) from None


def read_yaml(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    try:
        tree = yaml.safe_load(text)
    except ValueError as err:  # an integer past Python's digit limit
        raise ConfigError(f"{p}: {str(err).split(';')[0]}; fix the YAML value") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}:{line}: {problem}; fix the YAML syntax") from None
    return {} if tree is None else tree


def _flow_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def defaults_yaml() -> str:
    """The default config as commented YAML, for `aletheia-ds defaults` and the docs."""
    lines = []
    for section, field in RunConfig.model_fields.items():
        lines.append(f"{section}:")
        model = field.annotation
        for name, sub in model.model_fields.items():
            default = sub.get_default(call_default_factory=True)
            comment = f"  # {sub.description}" if sub.description else ""
            lines.append(f"  {name}: {_flow_yaml(default)}{comment}")
    return "\n".join(lines) + "\n"


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: `int | null`, `cosine | linear`, `list[str]`."""
    from typing import Union, get_args, get_origin

    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in get_args(annotation))
    if origin is Union:
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def config_reference_markdown() -> str:
    """docs/CONFIG.md: every section's keys with type, default and meaning (`aletheia-ds defaults --markdown`)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses (`aletheia_ds/config.py`) by "
        "`aletheia-ds defaults --markdown > docs/CONFIG.md`; a test keeps it in step.",
        "",
        "A run reads a YAML file of these sections (`--config FILE`); any key can be overridden on the command "
        "line as `section.key=value` or `--section.key value`. `aletheia-ds defaults` prints the defaults as "
        "YAML.",
        "",
    ]
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        lines += [f"## {section}", ""]
        doc = (model.__dict__.get("__doc__") or "").strip()
        if doc:
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, sub in model.model_fields.items():
            default = sub.get_default(call_default_factory=True)
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            meaning = (sub.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | {_type_name(sub.annotation)} | `{shown}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)
