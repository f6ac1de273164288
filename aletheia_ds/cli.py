"""aletheia-ds probe|plan|train|eval|export|bench|report|defaults

  aletheia-ds probe --model DIR --data FILE --out probe.json [--probe-batches 8 --batch-size 4 --seq-len 1024]
  aletheia-ds plan --probe probe.json --out plan.json [--top-pct 50 --attention-r 16 --mlp-r 64]
  aletheia-ds train --config CONFIG.yaml [--num-gpus N | --hostfile FILE] [--dry-run] [section.key=value ...]
  aletheia-ds eval --model DIR [--adapter DIR] --data FILE [--forgetting-data FILE] [--out eval.json]
  aletheia-ds export --model DIR --adapter DIR --out DIR --merge
  aletheia-ds bench --model DIR --out cost.json
  aletheia-ds report RUN_DIR [--out DIR] [--format md|html]
  aletheia-ds defaults [--markdown]
Every subcommand exits 2 with one line on stderr for bad input (3 when training stops on a non-finite loss).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .config import ConfigError, TrainingError, config_reference_markdown, defaults_yaml, exit_code, load_config
from .io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = {
    "probe": """example (the shipped tiny model and data, one CPU process):
  aletheia-ds probe --model examples/tiny/model --tokenizer examples/tiny/tokenizer \\
      --data examples/tiny/train.jsonl --out runs/x/probe.json --probe-batches 4 --batch-size 8 --seq-len 64
writes probe.json: per layer and module ||dL/dW||_F (see `aletheia-ds report`).""",
    "plan": """example:
  aletheia-ds plan --probe runs/x/probe.json --out runs/x/plan.json --top-pct 50 --attention-r 16 --mlp-r 64
  aletheia-ds plan --probe runs/x/probe.json --out runs/x/plan.json --rule budget --budget 0.6 --cost cost.json""",
    "train": """examples:
  aletheia-ds train --config launch/configs/qwen2_7b_zero3.yaml --num-gpus 8 plan.top_pct=25 train.lr=1e-4
      runs: deepspeed --num_gpus 8 launch/train.py --config launch/configs/qwen2_7b_zero3.yaml plan.top_pct=25 ...
  aletheia-ds train --config launch/configs/qwen2_7b_zero3.yaml --hostfile hosts.txt --dry-run   (print only)
  DS_ACCELERATOR=cpu aletheia-ds train --config launch/configs/tiny_cpu.yaml --num-gpus 2 --quiet
  aletheia-ds train --config launch/configs/tiny_cpu.yaml deepspeed.config=ds_configs/zero2.json   (one process)
Without --num-gpus/--hostfile the job runs in this process (one rank). Keys: `aletheia-ds defaults`.""",
    "eval": """example:
  aletheia-ds eval --model examples/tiny/model --tokenizer examples/tiny/tokenizer --adapter runs/tiny_cpu/adapter \\
      --data examples/tiny/eval.jsonl --forgetting-data examples/tiny/train.jsonl --seq-len 64 --out runs/tiny_cpu/eval_cli.json
prints and writes: base/adapter held-out loss and perplexity, exact match of greedy completions (prompt/completion
rows), forgetting = adapter loss - base loss on --forgetting-data.""",
    "export": """example:
  aletheia-ds export --model examples/tiny/model --tokenizer examples/tiny/tokenizer --adapter runs/tiny_cpu/adapter \\
      --out runs/tiny_cpu/merged --merge
then: AutoModelForCausalLM.from_pretrained("runs/tiny_cpu/merged") (or vLLM / TGI) with no PEFT.""",
    "bench": """example (one GPU; five timed configurations fit the cost model):
  aletheia-ds bench --model /models/qwen2.5-7b --out cost.json --batch-size 4 --seq-len 1024
  aletheia-ds plan --probe runs/x/probe.json --rule budget --budget 0.6 --cost cost.json
For the full speed comparison (uniform vs paper vs budget rows): python tools/bench_speed.py --out RUN_DIR;
`aletheia-ds report RUN_DIR` then adds its table and chart.""",
    "report": """example:
  aletheia-ds report runs/tiny_cpu            # writes runs/tiny_cpu/report.md and its PNGs
  aletheia-ds report runs/tiny_cpu --format html --out /tmp/report""",
    "defaults": """examples:
  aletheia-ds defaults > my_run.yaml
  aletheia-ds defaults --markdown > docs/CONFIG.md""",
}


def _probe(args) -> None:
    from .dist import distributed, print0
    from .train import Run

    overrides = [f"model.path={args.model}", f"data.train={args.data}", f"probe.batches={args.probe_batches}",
                 f"probe.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}", "data.eval_fraction=0",
                 f"model.dtype={args.dtype}", f"model.random_init={str(args.random_init).lower()}",
                 f"deepspeed.config={args.deepspeed or ''}", f"probe.gradient_checkpointing={str(args.checkpointing).lower()}",
                 f"train.quiet={str(args.quiet).lower()}"]
    if args.tokenizer:
        overrides.append(f"model.tokenizer={args.tokenizer}")
    cfg = load_config(overrides)
    cfg.require_paths()
    with distributed(cfg, use_deepspeed=bool(args.deepspeed)) as ctx:
        run = Run.setup(ctx, cfg)
        report = run.probe(Path(args.out))
    ranked = sorted(report.layers, key=lambda layer: -layer.score)[:5]
    print0(f"wrote {args.out}: top layers " + ", ".join(f"{x.index} ({x.score:.3g})" for x in ranked))


def _plan(args) -> None:
    from .adapters.peft_config import save_plan
    from .config import validate_tree
    from .cost import CostModel
    from .plan import make_plan
    from .probe.report import ProbeReport

    report = ProbeReport.load(args.probe)
    settings = {"cost": None, "rule": args.rule, "top_pct": args.top_pct, "budget": args.budget, "attention_r": args.attention_r,
                "mlp_r": args.mlp_r, "attention_alpha": args.attention_alpha, "mlp_alpha": args.mlp_alpha,
                "expert_rule": args.expert_rule, "expert_top_k": args.expert_top_k,
                "expert_energy": args.expert_energy, "expert_r": args.expert_r, "shared_experts": args.shared_experts,
                "moe_attention": not args.no_moe_attention, "routers": args.routers}
    section = validate_tree({"plan": settings}, "plan options").plan
    cost_model = CostModel.load(args.cost).check_matches(report, args.cost) if args.cost else \
        CostModel.analytic(report, checkpointing=args.checkpointing)
    plan = make_plan(report, section, cost_model)
    save_plan(plan, args.out)
    experts = f" + {len(plan.experts)} experts" if plan.experts else ""
    print(f"wrote {args.out}: rule {plan.rule}, layers {plan.layers}, {len(plan.modules)} adapters{experts}, "
          f"captures {plan.score_captured:.1%} of the probe's gradient energy")


def launcher_command(args, overrides: list[str]) -> list[str]:
    """The `deepspeed` command that runs launch/train.py (the module aletheia_ds.train when installed without a
    checkout) on --num-gpus ranks or over --hostfile."""
    from .launchers.deepspeed import deepspeed_command

    script = ROOT / "launch" / "train.py"
    target = (str(script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script)
              if script.is_file() else "aletheia_ds.train")
    return deepspeed_command(target, ["--config", args.config, *overrides], num_gpus=args.num_gpus,
                             hostfile=args.hostfile, master_addr=args.master_addr, master_port=args.master_port,
                             module=not script.is_file())


def _train(args, rest: list[str]) -> None:
    from .metrics import check_backends

    if args.hostfile and not Path(args.hostfile).is_file():
        raise ConfigError(f"--hostfile: {args.hostfile!r} does not exist")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise ConfigError(f"--num-gpus: must be >= 1, got {args.num_gpus}")
    overrides = list(rest) + (["train.quiet=true"] if args.quiet else [])
    argv = (["--config", args.config] if args.config else []) + overrides
    cfg = load_config(argv)  # bad input: one line here, before any rank starts
    cfg.require_paths()
    check_backends(cfg.train.report_to)
    if args.num_gpus or args.hostfile:
        if not args.config:
            raise ConfigError("--config: required with --num-gpus/--hostfile (every rank reads the same file)")
        cmd = launcher_command(args, overrides)
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            os.execvp(cmd[0], cmd)
        return
    if args.dry_run:
        print(f"one process: {sys.executable} -m aletheia_ds.train {shlex.join(argv)}")
        return
    from .train import main

    main(cfg)


def _eval(args) -> None:
    from .evaluate import evaluate_adapter

    result = evaluate_adapter(model=args.model, adapter=args.adapter, data=args.data, tokenizer=args.tokenizer,
                              seq_len=args.seq_len, batches=args.batches, batch_size=args.batch_size,
                              verify_logits=args.verify_logits, random_init=args.random_init,
                              forgetting_data=args.forgetting_data, exact_match_rows=args.exact_match_rows,
                              max_new_tokens=args.max_new_tokens)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


def _export(args) -> None:
    from .merge import export_merged

    if not args.merge:
        raise ConfigError("export: pass --merge (the adapter directory is already the unmerged export, loadable "
                          "with peft.PeftModel.from_pretrained)")
    out = export_merged(args.model, args.adapter, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                        overwrite=args.overwrite)
    print(f"wrote {out}: merged model (safetensors); load with AutoModelForCausalLM.from_pretrained('{out}')")


def _report(args) -> None:
    from .run_report import write_run_report

    run = args.run_dir or args.run
    if not run:
        raise ConfigError("report: give the run directory (aletheia-ds report RUN_DIR)")
    for path in write_run_report(Path(run), Path(args.out) if args.out else None, args.format):
        print(f"wrote {path}")


def _bench(args) -> None:
    from .speed import calibrate_cli

    if not (Path(args.model) / "config.json").is_file():
        raise ConfigError(f"--model: {args.model!r} has no config.json")
    calibrate_cli(args)


def _defaults(args) -> None:
    print(config_reference_markdown() if args.markdown else defaults_yaml(), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aletheia-ds", description=__doc__.split("\n")[0],
                                     epilog="\n".join(__doc__.split("\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str):
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)

    p = command("probe", "per-layer gradient scores -> probe.json")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="JSONL / parquet / datasets directory")
    p.add_argument("--out", default="probe.json")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--probe-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="examples per probe batch")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per example")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--random-init", action="store_true", help="config-only model directory: random weights")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing during the probe")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (e.g. ds_configs/zero3.json) when run under a launcher")
    p.add_argument("--quiet", action="store_true", help="no progress bar: plain lines")
    p.set_defaults(func=_probe)

    p = command("plan", "probe.json -> plan.json (layers, ranks, the exact LoraConfig)")
    p.add_argument("--probe", required=True)
    p.add_argument("--out", default="plan.json")
    p.add_argument("--rule", default="top_pct", choices=["top_pct", "budget", "upper", "all"])
    p.add_argument("--top-pct", type=float, default=50.0)
    p.add_argument("--budget", type=float, default=0.6, help="rule budget: step time as a fraction of uniform LoRA's")
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

    p = command("train", "the whole job (probe -> plan -> train -> adapter), through the DeepSpeed launcher")
    p.add_argument("--config", help="run YAML (launch/configs/*.yaml); then section.key=value overrides")
    p.add_argument("--num-gpus", type=int, help="ranks on this machine: runs `deepspeed --num_gpus N launch/train.py`")
    p.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines) for a multi-node run")
    p.add_argument("--master-addr", help="passed to the launcher (e.g. 127.0.0.1 on one CPU machine)")
    p.add_argument("--master-port", type=int, help="passed to the launcher")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the command; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars: plain periodic lines (train.quiet=true)")
    p.set_defaults(func=_train, takes_rest=True)

    p = command("eval", "held-out loss, perplexity, exact match and forgetting of base and base+adapter")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="PEFT adapter directory (default: the base model alone)")
    p.add_argument("--data", required=True, help="held-out file")
    p.add_argument("--forgetting-data", help="a second file (general text): adapter loss - base loss there")
    p.add_argument("--tokenizer")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batches", type=int, default=8, help="held-out batches scored (per file)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--exact-match-rows", type=int, default=32,
                   help="prompt/completion rows whose greedy completion is compared (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length for exact match")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--verify-logits", help="sample_logits.safetensors written by a training run")
    p.add_argument("--out", help="also write the result here (JSON)")
    p.set_defaults(func=_eval)

    p = command("export", "merge the adapter into the base model -> a plain transformers model (safetensors)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="new directory for the merged model")
    p.add_argument("--merge", action="store_true", help="fold the LoRA deltas into the weights (merge_and_unload)")
    p.add_argument("--tokenizer", help="tokenizer to save beside the model (default: --model's, if it has one)")
    p.add_argument("--dtype", default="auto", help="auto (the base checkpoint's) | float32 | bfloat16 | float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_export)

    p = command("bench", "calibrate the cost model on this hardware -> cost.json")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="cost.json")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.set_defaults(func=_bench)

    p = command("report", "report.md (or .html) with plots of a run directory")
    p.add_argument("run_dir", nargs="?", help="the run's train.output_dir")
    p.add_argument("--run", help=argparse.SUPPRESS)  # the earlier spelling
    p.add_argument("--out", help="where report.md and the PNGs go (default: RUN_DIR)")
    p.add_argument("--format", default="md", choices=["md", "html"])
    p.set_defaults(func=_report)

    p = command("defaults", "print the default config (YAML, commented) or the config reference (Markdown)")
    p.add_argument("--markdown", action="store_true", help="the reference table of docs/CONFIG.md")
    p.set_defaults(func=_defaults)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_rest", False):
            args.func(args, rest)
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        else:
            args.func(args)
    except (ConfigError, TrainingError) as err:
        return exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
