"""Every knob of the quality study, one dataclass; each field is a command-line flag (`--lora-steps 200`)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def _help(text: str, default=None) -> dict:
    return {"help": text}


@dataclass
class Settings:
    cache: str = field(default="/tmp/quality_cache", metadata=_help("bases, tokenizer, plans and per-run records"))
    out: str = field(default="docs/quality", metadata=_help("results.json, table.md and charts (stage report)"))
    bases: str = field(default="12x768,24x512", metadata=_help("base shapes (pretrain.BASES), comma-separated"))
    tasks: str = field(default="arithmetic,json,stdlib_body", metadata=_help("tasks (tasks.TASKS), comma-separated"))
    arms: str = field(
        default="uniform,matched,paper,upper25,upper33,upper50,budget,cut,cut_relative,pilot,random",
        metadata=_help("arms (arms.ARMS), comma-separated"),
    )
    seeds: str = field(default="0,1,2,3,4", metadata=_help("seeds per base and arm; the first tunes the learning rate"))
    lrs: str = field(default="3e-4,1e-3,3e-3", metadata=_help("learning rates tried on the first seed"))
    data_seed: int = field(default=1234, metadata=_help("task rows, tokenizer sample and base init"))
    workers: int = field(default=8, metadata=_help("parallel run processes on the one device (stage arms)"))
    time_budget_s: float = field(default=530.0, metadata=_help("a stage stops starting work it cannot finish by then"))
    device: str = field(default="auto", metadata=_help("auto | cuda | cpu"))
    threads: int = field(default=0, metadata=_help("torch CPU threads per process (0: torch's default)"))
    # corpus and tokenizer
    corpus_mb: float = field(default=64.0, metadata=_help("pretraining text in MB over every source"))
    corpus_mix: str = field(
        default="stdlib:0.45,doc:0.2,man:0.2",
        metadata=_help("source:share; sources not named (site-packages, extras) share the rest"),
    )
    corpus_extra: str = field(default="", metadata=_help("carried text directories (man pages, docs), comma-separated"))
    tokenizer_mb: float = 16.0
    vocab_size: int = 16384
    held_out_every: int = field(default=20, metadata=_help("1 corpus file in N is held out (forgetting)"))
    # pretraining
    seq_len: int = 512
    pretrain_steps: int = 6000
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 150
    pretrain_max_s: float = field(default=420.0, metadata=_help("time cap of each base's pretraining"))
    corpus_eval_windows: int = 64
    # tasks
    train_per_task: int = 6000
    val_per_task: int = field(default=128, metadata=_help("validation rows per task (learning-rate choice)"))
    eval_per_task: int = field(default=256, metadata=_help("test rows per task (task loss, learning curves)"))
    em_per_task: int = field(default=128, metadata=_help("test rows per task decoded for exact match"))
    task_seq_len: int = 192
    # arms
    lora_steps: int = 200
    lora_batch: int = 64
    lora_warmup: int = field(default=10, metadata=_help("linear warm-up, then a constant learning rate"))
    curve_points: int = field(default=8, metadata=_help("test-loss points on each learning curve"))
    uniform_r: int = 16
    attention_r: int = 16
    mlp_r: int = 64
    budget: float = 0.6
    min_r: int = 16
    max_r: int = 64
    guard: float = 1.0
    pilot_fraction: float = 0.1
    plan_cost: str = field(
        default="production",
        metadata=_help(
            "cost model the rules plan with: production (the analytic model of --production-shape with checkpointing, "
            "rescaled to the base: cuts fall where the production job puts them) | analytic (the base's own FLOPs) | "
            "calibrated (timed on this device)"
        ),
    )
    production_shape: str = field(
        default="qwen2-72b", metadata=_help("shape whose cost proportions plan_cost=production uses")
    )
    matched_to: str = field(default="cut", metadata=_help("arm whose mean ranks the rank-matched uniform copies"))
    random_like: str = field(default="cut", metadata=_help("arm whose layer count and ranks random copies"))
    margin: float = field(default=0.01, metadata=_help("equivalence margin: relative task loss"))
    probe_batches: int = 8
    probe_batch: int = 16
    probe_sketch_dim: int = field(default=32, metadata=_help("random sketch width of the probe's signal scores"))
    eval_batch: int = 64
    em_batch: int = 128
    timing_steps: int = field(default=8, metadata=_help("timed steps per plan, alone on the device"))
    # speed of the plan shapes at scale (stage speed)
    speed_shapes: str = field(
        default="qwen2.5-7b:28,qwen2-72b:12+20",
        metadata=_help("shape:layers[+layers]: two depths are projected to the full depth"),
    )
    speed_batch: int = 4
    speed_seq_len: int = 1024
    speed_steps: int = 4
    speed_from_logs: str = field(
        default="", metadata=_help("logs of an earlier speed stage, comma-separated: its result rebuilt, nothing timed")
    )
    speed_device: str = field(default="NVIDIA H200", metadata=_help("the device those logs were timed on"))

    def names(self, what: str) -> list[str]:
        return [x for x in getattr(self, what).split(",") if x]

    def seed_list(self) -> list[int]:
        return [int(x) for x in self.names("seeds")]

    def lr_list(self) -> list[float]:
        return [float(x) for x in self.names("lrs")]


# tiny sizes for CPU; one thread: tiny ops gain nothing from more, and a busy machine makes them slower
SMOKE = dict(
    cache="/tmp/quality_smoke_cache",
    bases="2x48,4x32",
    corpus_mb=1.0,
    tokenizer_mb=0.5,
    vocab_size=512,
    seq_len=64,
    pretrain_steps=30,
    pretrain_batch=16,
    pretrain_lr=3e-3,
    pretrain_warmup=3,
    pretrain_max_s=40.0,
    corpus_eval_windows=8,
    train_per_task=96,
    val_per_task=8,
    eval_per_task=8,
    em_per_task=2,
    task_seq_len=128,
    lora_steps=4,
    lora_batch=8,
    lora_warmup=1,
    curve_points=2,
    seeds="0,1",
    lrs="1e-3,3e-3",
    probe_batches=2,
    probe_batch=4,
    eval_batch=32,
    em_batch=32,
    timing_steps=1,
    workers=2,
    device="cpu",
    threads=1,
    time_budget_s=900.0,
    arms="uniform,matched,upper50,cut,cut_rslora,pilot,random",
    speed_shapes="tiny:4+6",
    speed_batch=1,
    speed_seq_len=32,
    speed_steps=1,
)


def parse(argv: list[str] | None, description: str) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--stage",
        choices=["pretrain", "arms", "speed", "report", "restore", "all"],
        default="all",
        help="pretrain: bases into --cache; arms: every run (resumes); speed: plan shapes at scale; "
        "report: stats and outputs in --out (CPU); restore: a cache from a published --out; "
        "all: pretrain, arms, speed, report in turn",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the whole pipeline in < 3 min")
    parser.add_argument("--estimate", action="store_true", help="print the expected GPU time of each stage and exit")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        parser.add_argument(flag, type=kind, default=None, help=f.metadata.get("help", f"default {f.default}"))
    args = parser.parse_args(argv)
    settings = Settings(**(SMOKE if args.smoke else {}))
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name)
        if value is not None:
            setattr(settings, f.name, value)
    if settings.plan_cost not in ("production", "analytic", "calibrated"):
        parser.error(f"--plan-cost must be production, analytic or calibrated, got {settings.plan_cost!r}")
    return settings, args
