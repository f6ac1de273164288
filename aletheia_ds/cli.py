"""aletheia-ds probe|plan|train|eval|bench|report|defaults

  aletheia-ds probe --model DIR --data FILE --out probe.json [--probe-batches 8 --batch-size 4 --seq-len 1024]
  aletheia-ds plan --probe probe.json --out plan.json [--top-pct 50 --attention-r 16 --mlp-r 64]
  aletheia-ds train --config CONFIG.yaml [section.key=value ...]     (one process; use `deepspeed launch/train.py` for many)
  aletheia-ds eval --model DIR --adapter DIR --data FILE [--verify-logits RUN/sample_logits.safetensors]
  aletheia-ds report --run RUN_DIR
  aletheia-ds defaults
Every subcommand exits 2 with one line on stderr for bad input (3 when training stops on a non-finite loss).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, TrainingError, defaults_yaml, load_config


def _probe(args) -> None:
    from .dist import distributed
    from .train import Run

    overrides = [f"model.path={args.model}", f"data.train={args.data}", f"probe.batches={args.probe_batches}",
                 f"probe.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}", "data.eval_fraction=0",
                 f"model.dtype={args.dtype}", f"model.random_init={str(args.random_init).lower()}",
                 f"deepspeed.config={args.deepspeed or ''}", f"probe.gradient_checkpointing={str(args.checkpointing).lower()}"]
    if args.tokenizer:
        overrides.append(f"model.tokenizer={args.tokenizer}")
    cfg = load_config(overrides)
    cfg.require_paths()
    with distributed(cfg, use_deepspeed=bool(args.deepspeed)) as ctx:
        run = Run.setup(ctx, cfg)
        report = run.probe(Path(args.out))
    if ctx.is_main:
        ranked = sorted(report.layers, key=lambda layer: -layer.score)[:5]
        print(f"wrote {args.out}: top layers " + ", ".join(f"{x.index} ({x.score:.3g})" for x in ranked))


def _plan(args) -> None:
    from .checkpoint import write_json_atomic
    from .config import validate_tree
    from .plan import make_plan
    from .probe.report import ProbeReport

    report = ProbeReport.load(args.probe)
    settings = {"cost": None, "rule": args.rule, "top_pct": args.top_pct, "budget": args.budget, "attention_r": args.attention_r,
                "mlp_r": args.mlp_r, "attention_alpha": args.attention_alpha, "mlp_alpha": args.mlp_alpha,
                "expert_rule": args.expert_rule, "expert_top_k": args.expert_top_k,
                "expert_energy": args.expert_energy, "expert_r": args.expert_r, "shared_experts": args.shared_experts,
                "moe_attention": not args.no_moe_attention, "routers": args.routers}
    section = validate_tree({"plan": settings}, "plan options").plan
    from .cost import CostModel

    cost_model = CostModel.load(args.cost).check_matches(report, args.cost) if args.cost else \
        CostModel.analytic(report, checkpointing=args.checkpointing)
    plan = make_plan(report, section, cost_model)
    write_json_atomic(args.out, plan.to_json())
    experts = f" + {len(plan.experts)} experts" if plan.experts else ""
    print(f"wrote {args.out}: rule {plan.rule}, layers {plan.layers}, {len(plan.modules)} adapters{experts}, "
          f"captures {plan.score_captured:.1%} of the probe's gradient energy")


def _train(args) -> None:
    from .train import main

    main(load_config(args.rest))


def _eval(args) -> None:
    from .evaluate import evaluate_adapter

    result = evaluate_adapter(model=args.model, adapter=args.adapter, data=args.data, tokenizer=args.tokenizer,
                              seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
                              verify_logits=args.verify_logits, random_init=args.random_init)
    print(json.dumps(result, indent=2))


def _report(args) -> None:
    from .report import write_run_report

    for path in write_run_report(Path(args.run)):
        print(f"wrote {path}")


def _bench(args) -> None:
    from .speed import calibrate_cli

    calibrate_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aletheia-ds", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="per-layer gradient scores -> probe.json")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="probe.json")
    p.add_argument("--tokenizer")
    p.add_argument("--probe-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--random-init", action="store_true", help="config-only model directory: random weights")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing during the probe")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (e.g. ds_configs/zero3.json) when run under a launcher")
    p.set_defaults(func=_probe)

    p = sub.add_parser("plan", help="probe.json -> plan.json")
    p.add_argument("--probe", required=True)
    p.add_argument("--out", default="plan.json")
    p.add_argument("--rule", default="top_pct", choices=["top_pct", "budget", "upper", "all"])
    p.add_argument("--top-pct", type=float, default=50.0)
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--attention-r", type=int, default=16)
    p.add_argument("--mlp-r", type=int, default=64)
    p.add_argument("--attention-alpha", type=float)
    p.add_argument("--mlp-alpha", type=float)
    p.add_argument("--cost", help="cost.json from `aletheia-ds bench` (default: an analytic cost model)")
    p.add_argument("--expert-rule", default="energy", choices=["energy", "top_k", "load", "all", "none"],
                   help="MoE: experts adapted in each chosen layer")
    p.add_argument("--expert-top-k", type=int, default=2)
    p.add_argument("--expert-energy", type=float, default=0.8)
    p.add_argument("--expert-r", type=int, default=16)
    p.add_argument("--shared-experts", default="with_layer", choices=["with_layer", "all_moe_layers", "none"])
    p.add_argument("--no-moe-attention", action="store_true", help="MoE layers: adapt experts only, not attention")
    p.add_argument("--routers", default="frozen", choices=["frozen", "lora"])
    p.add_argument("--checkpointing", action="store_true", help="plan for a run with gradient checkpointing")
    p.set_defaults(func=_plan)

    p = sub.add_parser("train", help="the whole job on one process")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="held-out loss of base and base+adapter; optional logits check")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--verify-logits", help="sample_logits.safetensors written by a training run")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="plots of a finished run")
    p.add_argument("--run", required=True)
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="calibrate the cost model on this hardware -> cost.json")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="cost.json")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("defaults", help="print the default config (YAML, commented)")
    p.set_defaults(func=lambda _args: print(defaults_yaml(), end=""))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2 if isinstance(err, ConfigError) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
