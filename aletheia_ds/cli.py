"""aletheia-ds probe|plan|train|eval|export|bench|report|defaults

  aletheia-ds probe [--config FILE] --model DIR --data FILE --out probe.json [--probe-batches 8 ...] \
      [section.key=value ...]
  aletheia-ds plan [--config FILE] --probe probe.json --out plan.json [--top-pct 50 ...] [section.key=value ...]
  aletheia-ds train --config CONFIG.yaml [--num-gpus N] [--hostfile FILE [--node-rank R] | --slurm] [--dry-run] ...
  aletheia-ds eval --model DIR [--adapter DIR] --data FILE [--forgetting-data FILE] [--out eval.json]
  aletheia-ds export --model DIR --adapter DIR --out DIR --merge
  aletheia-ds bench --model DIR --out cost.json
  aletheia-ds report RUN_DIR [--out DIR] [--format md|html]
  aletheia-ds defaults [--markdown]
probe, plan and train read the run config (`aletheia-ds defaults`): their flags are short names for its knobs.
Every subcommand exits 2 with one line on stderr for bad input (3 when training stops on a non-finite loss).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from .config import (
    ConfigError,
    PlanSection,
    RunConfig,
    TrainingError,
    config_field,
    config_reference_markdown,
    defaults_yaml,
    exit_code,
    load_config,
)
from .io import check_writable

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = {
    "probe": """example (the shipped tiny model and data, one CPU process):
  aletheia-ds probe --model examples/tiny/model --tokenizer examples/tiny/tokenizer \\
      --data examples/tiny/train.jsonl --out runs/x/probe.json --probe-batches 4 --batch-size 8 --seq-len 64
writes probe.json: per layer and module ||dL/dW||_F (see `aletheia-ds report`).""",
    "plan": """example:
  aletheia-ds plan --probe runs/x/probe.json --out runs/x/plan.json --top-pct 50 --attention-r 16 --mlp-r 64
  aletheia-ds plan --probe runs/x/probe.json --out runs/x/plan.json --rule budget --budget 0.6 --cost cost.json
  aletheia-ds plan --config launch/configs/tiny_cpu.yaml --probe runs/x/probe.json plan.rule=upper   (as the run)""",
    "train": """examples:
  aletheia-ds train --config launch/configs/qwen2_7b_zero3.yaml --num-gpus 8 plan.top_pct=25 train.lr=1e-4
      runs: deepspeed --num_gpus 8 launch/train.py --config launch/configs/qwen2_7b_zero3.yaml plan.top_pct=25 ...
  aletheia-ds train --config launch/configs/qwen2_7b_zero3.yaml --hostfile hosts.txt --dry-run   (print only)
  aletheia-ds train --config launch/configs/qwen2_72b_zero3.yaml --hostfile hosts.txt --node-rank 1 --master-addr node-1
      one launcher per node, no ssh: runs deepspeed --hostfile hosts.txt --no_ssh --node_rank 1 ... (docs/MULTINODE.md)
  srun --ntasks-per-node=1 aletheia-ds train --config launch/configs/qwen2_72b_zero3.yaml --slurm   (launch/slurm/)
  DS_ACCELERATOR=cpu aletheia-ds train --config launch/configs/tiny_cpu.yaml --num-gpus 2 --quiet
  aletheia-ds train --config launch/configs/tiny_cpu.yaml deepspeed.config=ds_configs/zero2.json   (one process)
Without --num-gpus/--hostfile/--slurm the job runs in this process (one rank). Keys: `aletheia-ds defaults`.""",
    "eval": """example:
  aletheia-ds eval --model examples/tiny/model --tokenizer examples/tiny/tokenizer --adapter runs/tiny_cpu/adapter \\
      --data examples/tiny/eval.jsonl --forgetting-data examples/tiny/train.jsonl --seq-len 64 \\
      --out runs/tiny_cpu/eval_cli.json
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


# probe flags -> the knobs they set (the flag names predate the config sections)
PROBE_FLAGS = {
    "--model": "model.path",
    "--tokenizer": "model.tokenizer",
    "--data": "data.train",
    "--probe-batches": "probe.batches",
    "--batch-size": "probe.batch_size",
    "--seq-len": "data.seq_len",
    "--dtype": "model.dtype",
    "--random-init": "model.random_init",
    "--checkpointing": "probe.gradient_checkpointing",
    "--quiet": "train.quiet",
}
# probe without --config: one process without DeepSpeed, every example probed (a config file says its own)
PROBE_STANDALONE = {"data": {"eval_fraction": 0}, "deepspeed": {"config": ""}}
# plan flags: one per plan.* knob (`--top-pct` is plan.top_pct) but plan.plan, which reuses a plan instead
PLAN_FLAGS = {f"--{name.replace('_', '-')}": f"plan.{name}" for name in PlanSection.model_fields if name != "plan"}


def _flag_type(annotation: Any) -> tuple[type, Optional[list]]:
    """(argparse type, choices) of a scalar knob; Optional[X] reads as X."""
    if get_origin(annotation) is Union:
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return str, list(get_args(annotation))
    if annotation in (bool, int, float, str):
        return annotation, None
    raise TypeError(f"no flag for a knob of type {annotation}; use section.key=value")


def config_flag(
    parser: argparse.ArgumentParser, flag: str, key: str, *, dest: Optional[str] = None, help: Optional[str] = None
) -> None:
    """`flag` generated from the config knob `key`: its type, choices, default and description.

    Without `dest` the flag is an override of the knob (`--top-pct 25` is `plan.top_pct=25`; left out, the config
    file's value or the default stands), and the config loader checks its value as it checks any override. With
    `dest` it is a plain argument of a command that reads no run config (eval, bench), the knob's default its default.
    """
    field = config_field(key)
    kind, choices = _flag_type(field.annotation)
    default = field.get_default(call_default_factory=True)
    shown = json.dumps(default) if isinstance(default, bool) else default  # true/false, as a config file says it
    text = help or (field.description or "") + ("" if default in (None, "") else f"; default {shown}")
    options: dict[str, Any] = {"dest": dest or key, "default": default if dest else argparse.SUPPRESS}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif dest:
        options.update(type=kind, choices=choices)
    elif choices:
        options["choices"] = choices
    else:
        # the override keeps the text as typed (`got 150`, not `got 150.0`); a string is quoted so that YAML
        # keeps it one (a path named `null` or `1e3`)
        options.update(
            type=json.dumps if kind is str else None,
            metavar=flag.lstrip("-").upper().replace("-", "_") if kind is str else kind.__name__.upper(),
        )
    if not dest:
        text += f" [{key}]"
    parser.add_argument(flag, help=text.replace("%", "%%"), **options)


def run_overrides(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The command line's `section.key=value` overrides: those written so, then the generated flags given (their
    dests are the knobs' dotted names)."""
    return list(rest) + [
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in vars(args).items()
        if "." in key
    ]


def run_config(args: argparse.Namespace, rest: list[str], base: Optional[dict] = None) -> RunConfig:
    argv = (["--config", args.config] if args.config else []) + run_overrides(args, rest)
    return load_config(argv, base=base)


def _probe(args, rest: list[str]) -> None:
    from .dist import distributed, print0
    from .train import Run

    cfg = run_config(args, rest, base=PROBE_STANDALONE)
    cfg.require_paths()
    with distributed(cfg, use_deepspeed=bool(cfg.deepspeed.config)) as ctx:
        run = Run.setup(ctx, cfg)
        report = run.probe(Path(args.out))
    ranked = sorted(report.layers, key=lambda layer: -layer.score)[:5]
    print0(f"wrote {args.out}: top layers " + ", ".join(f"{x.index} ({x.score:.3g})" for x in ranked))


def _plan(args, rest: list[str]) -> None:
    from .adapters.peft_config import save_plan
    from .cost import CostModel
    from .plan import make_plan
    from .probe.report import ProbeReport

    cfg = run_config(args, rest)
    if not cfg.probe.report:
        raise ConfigError("plan: give the probe.json to plan from: --probe FILE (or probe.report in --config)")
    check_writable(args.out, "plan --out")
    report = ProbeReport.load(cfg.probe.report)
    if cfg.model.path:
        from .model import fingerprint, fingerprint_digest

        report.check_fingerprint(fingerprint_digest(fingerprint(cfg.model)), f"probe.report: {cfg.probe.report}")
        checked = f"probe.json checked against {cfg.model.path}"
    else:
        # without a model only the report's own layout could be checked (from_json): a report of another
        # model plans as well as this one's, and train refuses it
        checked = "no model.path given: probe.json not checked against a model"
    cost = cfg.plan.cost
    cost_model = (
        CostModel.load(cost).check_matches(report, cost)
        if cost
        else CostModel.analytic(report, checkpointing=cfg.train.gradient_checkpointing)
    )
    plan = make_plan(report, cfg.plan, cost_model)
    save_plan(plan, args.out)
    experts = f" + {len(plan.experts)} experts" if plan.experts else ""
    print(
        f"wrote {args.out}: rule {plan.rule}, layers {plan.layers}, {len(plan.modules)} adapters{experts}, "
        f"captures {plan.score_captured:.1%} of the probe's gradient energy ({checked})"
    )


def train_target() -> tuple[str, bool]:
    """(what the launcher runs, whether it is a module): launch/train.py, or the module aletheia_ds.train when
    installed without a checkout."""
    script = ROOT / "launch" / "train.py"
    if not script.is_file():
        return "aletheia_ds.train", True
    return str(script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script), False


def launcher_command(args, overrides: list[str]) -> list[str]:
    """The `deepspeed` command that runs the job on --num-gpus ranks, over --hostfile, or (--node-rank) the ranks
    of one node of --hostfile."""
    from .launchers.deepspeed import deepspeed_command

    target, module = train_target()
    return deepspeed_command(
        target,
        ["--config", args.config, *overrides],
        num_gpus=args.num_gpus,
        hostfile=args.hostfile,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        module=module,
    )


def _check_launch_flags(args) -> None:
    if args.hostfile and not Path(args.hostfile).is_file():
        raise ConfigError(f"--hostfile: {args.hostfile!r} does not exist")
    for flag, value, least in (
        ("--num-gpus", args.num_gpus, 1),
        ("--num-nodes", args.num_nodes, 1),
        ("--node-rank", args.node_rank, 0),
    ):
        if value is not None and value < least:
            raise ConfigError(f"{flag}: must be >= {least}, got {value}")
    if args.slurm and (args.hostfile or args.node_rank is not None or args.num_nodes or args.master_addr):
        raise ConfigError(
            "--slurm: the allocation gives the hosts, node rank and master; drop --hostfile, "
            "--num-nodes, --node-rank and --master-addr"
        )
    if (args.node_rank is not None or args.num_nodes) and not args.hostfile:
        raise ConfigError(
            "--hostfile: required with --num-nodes/--node-rank (every node's launcher reads the same list of nodes)"
        )
    if args.node_rank is not None and not args.master_addr:
        raise ConfigError(
            "--master-addr: required with --node-rank (the first node's address; without it "
            "DeepSpeed asks the first host over ssh)"
        )


def _train(args, rest: list[str]) -> None:
    from .metrics import check_backends

    _check_launch_flags(args)
    overrides = run_overrides(args, rest)
    argv = (["--config", args.config] if args.config else []) + overrides
    cfg = load_config(argv)  # bad input: one line here, before any rank starts
    cfg.require_paths()
    check_backends(cfg.train.report_to)
    if args.slurm:
        if not args.config:
            raise ConfigError("--config: required with --slurm (every rank reads the same file)")
        from .launchers.deepspeed import slurm_launch

        target, module = train_target()
        launch = slurm_launch(
            os.environ,
            target,
            ["--config", args.config, *overrides],
            module=module,
            ranks_per_node=args.num_gpus,
            master_port=args.master_port,
        )
        print(launch.describe(), flush=True)
        print(shlex.join(launch.command), flush=True)
        if not args.dry_run:
            launch.write_hostfile()
            os.execvp(launch.command[0], launch.command)
        return
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

    if args.out:
        check_writable(args.out, "eval --out")

    result = evaluate_adapter(
        model=args.model,
        adapter=args.adapter,
        data=args.data,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batches=args.batches,
        batch_size=args.batch_size,
        verify_logits=args.verify_logits,
        random_init=args.random_init,
        forgetting_data=args.forgetting_data,
        exact_match_rows=args.exact_match_rows,
        max_new_tokens=args.max_new_tokens,
        trust_remote_code=args.trust_remote_code,
    )
    if args.out:
        from .io import write_json_atomic

        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


def _export(args) -> None:
    import time

    from .dist import peak_host_rss_gib
    from .host_memory import HostMemoryPeaks
    from .merge import export_merged

    if not args.merge:
        raise ConfigError(
            "export: pass --merge (the adapter directory is already the unmerged export, loadable "
            "with peft.PeftModel.from_pretrained)"
        )
    # the merged model is written into a folder beside --out, then renamed onto it
    check_writable(Path(args.out).resolve().parent, "export --out", directory=True)
    started = time.perf_counter()
    with HostMemoryPeaks() as host:
        out = export_merged(
            args.model,
            args.adapter,
            args.out,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
        )
    anon, mapped = host.summary("anon"), host.summary("file")
    print(f"wrote {out}: merged model (safetensors); load with AutoModelForCausalLM.from_pretrained('{out}')")
    # anonymous memory is what the merge holds; mapped shard pages are the kernel's to drop; ru_maxrss adds both
    print(
        f"merge: {time.perf_counter() - started:.1f} s; host memory peak {anon['peak']} GiB anonymous "
        f"(from {anon['before']}), {mapped['peak']} GiB mapped files (from {mapped['before']}), "
        f"ru_maxrss {peak_host_rss_gib()} GiB"
    )


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
    parser = argparse.ArgumentParser(
        prog="aletheia-ds",
        description=__doc__.split("\n")[0],
        epilog="\n".join(__doc__.split("\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str):
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )

    p = command("probe", "per-layer gradient scores -> probe.json")
    p.add_argument("--config", help="run YAML: probe as that run would; flags and section.key=value override it")
    p.add_argument("--out", default="probe.json")
    for flag, key in PROBE_FLAGS.items():
        config_flag(p, flag, key)
    config_flag(
        p,
        "--deepspeed",
        "deepspeed.config",
        help="DeepSpeed JSON (e.g. ds_configs/zero3.json) when run "
        "under a launcher; default: none, unless --config names one",
    )
    p.set_defaults(func=_probe, takes_rest=True)

    p = command("plan", "probe.json -> plan.json (layers, ranks, the exact LoraConfig)")
    p.add_argument("--config", help="run YAML: plan as that run would; flags and section.key=value override it")
    p.add_argument("--out", default="plan.json")
    config_flag(p, "--probe", "probe.report", help="the probe.json to plan from")
    for flag, key in PLAN_FLAGS.items():
        config_flag(p, flag, key)
    config_flag(
        p,
        "--checkpointing",
        "train.gradient_checkpointing",
        help="plan for a run with gradient checkpointing (the analytic cost model)",
    )
    p.set_defaults(func=_plan, takes_rest=True)

    p = command("train", "the whole job (probe -> plan -> train -> adapter), through the DeepSpeed launcher")
    p.add_argument("--config", help="run YAML (launch/configs/*.yaml); then section.key=value overrides")
    p.add_argument(
        "--num-gpus",
        type=int,
        help="ranks on this machine (per node with --hostfile/--slurm): runs `deepspeed --num_gpus N launch/train.py`",
    )
    p.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines) for a multi-node run")
    p.add_argument("--num-nodes", type=int, help="use the first N nodes of --hostfile")
    p.add_argument(
        "--node-rank",
        type=int,
        help="start only node R's ranks of --hostfile, without ssh; run one "
        "such launcher on every node (docs/MULTINODE.md)",
    )
    p.add_argument(
        "--slurm",
        action="store_true",
        help="inside a SLURM allocation (srun, one task per node): this "
        "node's launcher, hosts and master from SLURM_* (launch/slurm/deepspeed.sbatch)",
    )
    p.add_argument("--master-addr", help="passed to the launcher (e.g. 127.0.0.1 on one CPU machine)")
    p.add_argument("--master-port", type=int, help="passed to the launcher")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the command; run nothing")
    config_flag(p, "--quiet", "train.quiet")
    config_flag(p, "--resume", "train.resume")
    p.set_defaults(func=_train, takes_rest=True)

    p = command("eval", "held-out loss, perplexity, exact match and forgetting of base and base+adapter")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="PEFT adapter directory (default: the base model alone)")
    p.add_argument("--data", required=True, help="held-out file")
    p.add_argument("--forgetting-data", help="a second file (general text): adapter loss - base loss there")
    p.add_argument("--tokenizer")
    config_flag(p, "--seq-len", "data.seq_len", dest="seq_len")
    p.add_argument("--batches", type=int, default=8, help="held-out batches scored (per file)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--exact-match-rows",
        type=int,
        default=32,
        help="prompt/completion rows whose greedy completion is compared (0: skip)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length for exact match")
    config_flag(p, "--random-init", "model.random_init", dest="random_init")
    p.add_argument("--verify-logits", help="sample_logits.safetensors written by a training run")
    p.add_argument("--out", help="also write the result here (JSON)")
    config_flag(p, "--trust-remote-code", "model.trust_remote_code", dest="trust_remote_code")
    p.set_defaults(func=_eval)

    p = command("export", "merge the adapter into the base model -> a plain transformers model (safetensors)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="new directory for the merged model")
    p.add_argument("--merge", action="store_true", help="fold the LoRA deltas into the weights (merge_and_unload)")
    p.add_argument("--tokenizer", help="tokenizer to save beside the model (default: --model's, if it has one)")
    p.add_argument("--dtype", default="auto", help="auto (the base checkpoint's) | float32 | bfloat16 | float16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    config_flag(p, "--trust-remote-code", "model.trust_remote_code", dest="trust_remote_code")
    p.set_defaults(func=_export)

    p = command("bench", "calibrate the cost model on this hardware -> cost.json")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="cost.json")
    p.add_argument("--batch-size", type=int, default=4)
    config_flag(p, "--seq-len", "data.seq_len", dest="seq_len")
    p.add_argument("--steps", type=int, default=5)
    config_flag(p, "--random-init", "model.random_init", dest="random_init")
    config_flag(p, "--checkpointing", "train.gradient_checkpointing", dest="checkpointing")
    p.set_defaults(func=_bench)

    p = command("report", "report.md (or .html) with plots of a run directory")
    p.add_argument("run_dir", nargs="?", help="the run's train.output_dir")
    p.add_argument("--run", help="the run directory, as RUN_DIR")
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
