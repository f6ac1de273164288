"""python -m tools.quality --stage pretrain && python -m tools.quality --stage arms && \
    python -m tools.quality --stage speed && python -m tools.quality --stage report

Does gradient-guided layer selection keep quality, and at what speed? A controlled study on one GPU.

  pretrain  corpus (stdlib, /usr/share/doc, man pages: corpus.py records what it found) -> BPE tokenizer ->
            two bases of different depth pretrained side by side (pretrain.py); all saved under --cache
  arms      task data (tasks.py); per base: probe, cost models, every arm's plan, each plan's step time
            alone on the device; then every (base, arm, seed, lr) run in --workers processes on the one
            device (arms.py): learning rates tried on the first seed (validation split), the other seeds at
            each arm's best; one record per run, so a cut call keeps what finished and the next resumes
  speed     each plan's shape moved by relative depth onto the 7B and 72B shapes and timed (speed.py)
  report    paired statistics (stats.py), table.md, charts and results.json in --out (report.py; CPU)
  restore   a cache rebuilt from a published --out (results.json, runs.json): speed and report run again
            without the bases (restore.py)

    python -m tools.quality --smoke --out /tmp/quality_smoke   # every stage on CPU, tiny sizes, < 3 min
    python -m tools.quality --estimate                         # expected GPU seconds of each stage
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not (the GPU machine has no install)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from aletheia_ds.io import write_json_atomic  # noqa: E402
from tools.quality.settings import Settings, parse  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def pick_device(s: Settings) -> torch.device:
    wanted = s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if wanted else "cpu")


def bases_table(s: Settings) -> dict[str, dict]:
    from tools.quality.pretrain import BASES, SMOKE_BASES

    known = {**BASES, **SMOKE_BASES}
    unknown = [b for b in s.names("bases") if b not in known]
    if unknown:
        raise SystemExit(f"--bases: unknown {unknown}; choose from {sorted(known)}")
    return {b: known[b] for b in s.names("bases")}


def study_key(s: Settings) -> str:
    """Runs are filed under the settings that change their numbers (a re-run with new tasks gets a new folder)."""
    fields = (
        "tasks",
        "data_seed",
        "train_per_task",
        "val_per_task",
        "eval_per_task",
        "em_per_task",
        "task_seq_len",
        "lora_steps",
        "lora_batch",
        "lora_warmup",
        "uniform_r",
        "attention_r",
        "mlp_r",
        "budget",
        "min_r",
        "max_r",
        "guard",
        "pilot_fraction",
        "plan_cost",
        "production_shape",
        "matched_to",
        "random_like",
        "probe_batches",
        "probe_batch",
        "probe_sketch_dim",
    )
    blob = json.dumps({f: getattr(s, f) for f in fields}, sort_keys=True)
    return s.tasks.replace(",", "+") + "-" + hashlib.sha1(blob.encode()).hexdigest()[:8]


# ====================================================================== stage pretrain
def pretrain_one(settings: dict, name: str, shape: dict, max_seconds: float) -> None:
    """One base in its own process (spawned): both bases share the GPU, each with its own CUDA context."""
    from transformers import PreTrainedTokenizerFast

    from tools.quality.pretrain import build_model, pretrain, save_base

    s = Settings(**settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    cache, device = Path(s.cache), pick_device(s)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cache / "tokenizer")
    stream = torch.load(cache / "stream.pt")
    model = build_model(shape, tokenizer, s.data_seed, max(s.seq_len, s.task_seq_len + 64))
    params = sum(p.numel() for p in model.parameters())
    log(
        f"[{name}] {params / 1e6:.1f}M parameters; pretraining {s.pretrain_steps} steps x {s.pretrain_batch} x "
        f"{s.seq_len} tokens, cap {max_seconds:.0f} s"
    )
    stats = pretrain(
        model,
        stream,
        steps=s.pretrain_steps,
        batch=s.pretrain_batch,
        seq_len=s.seq_len,
        lr=s.pretrain_lr,
        warmup=s.pretrain_warmup,
        max_seconds=max_seconds,
        seed=s.data_seed,
        device=device,
        log=lambda m: log(f"[{name}]{m}"),
    )
    save_base(model.cpu(), cache / "bases" / name, {**stats, "params": params, "shape": shape})
    log(
        f"[{name}] done: {stats['steps_done']} steps in {stats['seconds']:.0f} s, last loss "
        f"{stats['loss_curve'][-1][1] if stats['loss_curve'] else float('nan'):.3f}"
    )


def stage_pretrain(s: Settings, started: float) -> None:
    from tools.quality.corpus import encode_documents, load_corpus, train_tokenizer, windows

    cache = Path(s.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "stream.pt").exists():
        mix = {k: float(v) for k, v in (item.split(":") for item in s.names("corpus_mix"))}
        corpus = load_corpus(s.corpus_mb, s.held_out_every, mix, s.corpus_extra)
        log(
            f"corpus: {corpus.stats['train_files']} train / {corpus.stats['held_out_files']} held-out files, "
            f"{corpus.stats['train_chars'] / 1e6:.1f}M chars; by source {corpus.stats['sources']}"
        )
        tokenizer = train_tokenizer(corpus.train, s.vocab_size, int(s.tokenizer_mb * 1e6))
        stream = encode_documents(tokenizer, corpus.train)
        held_out = windows(encode_documents(tokenizer, corpus.held_out), s.seq_len + 1, s.corpus_eval_windows)
        tokenizer.save_pretrained(cache / "tokenizer")
        torch.save(held_out.clone(), cache / "held_out.pt")
        write_json_atomic(
            cache / "corpus.json",
            {
                **corpus.stats,
                "train_tokens": len(stream),
                "held_out_windows": len(held_out),
                "vocab_size": len(tokenizer),
            },
        )
        torch.save(stream, cache / "stream.pt")  # last: its presence marks the corpus step done
        log(f"tokens: {len(stream) / 1e6:.2f}M train, {len(held_out)} held-out windows of {s.seq_len}")
    write_json_atomic(cache / "settings.json", dataclasses.asdict(s))
    missing = {n: shape for n, shape in bases_table(s).items() if not (cache / "bases" / n / "pretrain.json").exists()}
    cap = min(s.pretrain_max_s, s.time_budget_s - (time.perf_counter() - started) - 30.0)  # 30 s: saving
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=pretrain_one, args=(dataclasses.asdict(s), n, shape, cap))
        for n, shape in missing.items()
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    failed = [n for n, p in zip(missing, processes) if p.exitcode != 0]
    if failed:
        raise SystemExit(f"pretraining failed for {failed}")


# ====================================================================== stage arms
_WORKER: dict = {}


def load_context(s: Settings, base: str):
    """Everything a run on `base` needs, loaded once per process."""
    from transformers import PreTrainedTokenizerFast

    from aletheia_ds.cost import CostModel
    from aletheia_ds.plan import Plan
    from aletheia_ds.probe.report import ProbeReport
    from tools.quality.arms import RunContext
    from tools.quality.pretrain import load_base

    cache, device = Path(s.cache), pick_device(s)
    key = study_key(s)
    prepared = json.loads((cache / "bases" / base / f"plans-{key}.json").read_text())
    model = load_base(cache / "bases" / base, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return RunContext(
        base=model,
        tokenizer=PreTrainedTokenizerFast.from_pretrained(cache / "tokenizer"),
        data=torch.load(cache / f"tasks-{key}.pt", weights_only=False),
        held_out_rows=torch.load(cache / "held_out.pt"),
        report=ProbeReport.from_json(prepared["probe"]),
        cost=CostModel.from_json(prepared["cost"]),
        calibrated=CostModel.from_json(prepared["calibrated_cost"]),
        plans={n: Plan.from_json(p) for n, p in prepared["plans"].items()},
        base_corpus_loss=prepared["base_eval"]["corpus_loss"],
        device=device,
    )


def prepare_base(s: Settings, base: str, notes: list[str]) -> None:
    """Probe, cost models, plans, each plan's step time alone on the device, base evaluation: once per base."""
    from transformers import PreTrainedTokenizerFast

    from aletheia_ds.arch import describe
    from aletheia_ds.cost import CostModel
    from aletheia_ds.data import collate, fixed_batches
    from aletheia_ds.probe.run import run_probe
    from aletheia_ds.speed import calibrate, time_plan
    from tools.quality.arms import build_plans, evaluate, plan_summary, to_device
    from tools.quality.pretrain import autocast, load_base

    cache, device = Path(s.cache), pick_device(s)
    key = study_key(s)
    path = cache / "bases" / base / f"plans-{key}.json"
    if path.exists():
        return
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cache / "tokenizer")
    data = torch.load(cache / f"tasks-{key}.pt", weights_only=False)
    model = load_base(cache / "bases" / base, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    layout, pad = describe(model), tokenizer.pad_token_id
    batches = fixed_batches(data.train, s.probe_batch, s.probe_batches, pad)
    report = run_probe(
        model,
        layout,
        batches,
        lambda b: model(**to_device(b, device)).loss,
        model_name=f"quality base {base}",
        sketch_dim=s.probe_sketch_dim,
    )
    batch = collate(data.train[: s.lora_batch], pad)
    with autocast(device):  # float32 adapters under bf16 autocast, as the runs execute them
        calibrated = calibrate(
            model,
            layout,
            batch,
            steps=max(1, s.timing_steps // 2),
            warmup=2,
            log=lambda line: log(f"  [{base}] {line}"),
        )
    if s.plan_cost == "production":
        from tools.quality.speed import production_cost

        cost = production_cost(report, s.production_shape)
    else:
        cost = calibrated if s.plan_cost == "calibrated" else CostModel.analytic(report)
    base_notes: list[str] = []
    plans = build_plans(report, cost, s, base_notes)
    notes += [f"{base}: {n}" for n in base_notes]
    timings = {}
    for name, plan in plans.items():
        with autocast(device):
            timing = time_plan(model, layout, plan, batch, steps=s.timing_steps, warmup=2)
        timings[name] = timing.median_s
        log(
            f"  [{base}] plan {name}: layers {plan.layers}, {len(plan.modules)} adapters, "
            f"{1000 * timing.median_s:.1f} ms/step alone ({timing.median_s / timings['uniform']:.2f}x uniform)"
        )
    base_eval = evaluate(model, tokenizer, data, torch.load(cache / "held_out.pt"), s, device)
    log(
        f"  [{base}] base model: task loss {base_eval['task_loss']:.3f}, exact match "
        f"{100 * base_eval['exact_match']:.1f}%, corpus loss {base_eval['corpus_loss']:.3f}"
    )
    write_json_atomic(
        path,
        {
            "probe": report.to_json(),
            "cost": cost.to_json(),
            "calibrated_cost": calibrated.to_json(),
            "plans": {n: p.to_json() for n, p in plans.items()},
            "plan_summaries": {n: plan_summary(p) for n, p in plans.items()},
            "step_seconds_alone": timings,
            "base_eval": base_eval,
            "notes": base_notes,
            "pretrain": json.loads((cache / "bases" / base / "pretrain.json").read_text()),
        },
    )


def run_job(job: tuple) -> str:
    """One run in a worker process; skipped when the worker's last run says it would not end by the deadline."""
    from tools.quality.arms import record_path, train_run, write_record

    settings, base, arm, seed, lr, deadline = job
    s = Settings(**settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    last = _WORKER.get("last_run_s", 0.0)
    if time.time() + 1.1 * last > deadline:
        return f"skipped {base}/{arm}/seed{seed}/lr{lr:g}: would end after the deadline"
    if _WORKER.get("base") != base:
        _WORKER.clear()
        _WORKER.update(base=base, context=load_context(s, base))
    started = time.time()
    record = train_run(_WORKER["context"], arm, seed, lr, s)
    record.update(base=base, wall_seconds=time.time() - started)
    write_record(record_path(Path(s.cache), study_key(s), base, arm, seed, lr), record)
    _WORKER["last_run_s"] = time.time() - started
    return (
        f"{base:7s} {arm:12s} seed {seed} lr {lr:g}: task loss {record['task_loss']:.4f} (val "
        f"{record['val_loss']:.4f}), exact match {100 * record['exact_match']:.1f}%, forgetting "
        f"{record['forgetting']:+.4f}, {record['wall_seconds']:.0f} s"
    )


def best_lrs(records: list[dict], s: Settings) -> dict[tuple[str, str], float]:
    """Each (base, arm)'s learning rate with the lowest validation loss on the first seed (all lrs done)."""
    tuning: dict[tuple[str, str], dict[float, float]] = {}
    for r in records:
        if r["seed"] == s.seed_list()[0]:
            tuning.setdefault((r["base"], r["arm"]), {})[r["lr"]] = r["val_loss"]
    return {
        k: min(v, key=lambda lr: v[lr] if math.isfinite(v[lr]) else math.inf)
        for k, v in tuning.items()
        if all(lr in v for lr in s.lr_list())
    }


def stage_arms(s: Settings, started: float) -> None:
    from transformers import PreTrainedTokenizerFast

    from tools.quality.arms import read_records, record_path
    from tools.quality.tasks import build_task_data

    cache, key = Path(s.cache), study_key(s)
    deadline = time.time() + s.time_budget_s - (time.perf_counter() - started)
    tasks_path = cache / f"tasks-{key}.pt"
    if not tasks_path.exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cache / "tokenizer")
        counts = {
            "train": s.train_per_task,
            "validation": s.val_per_task,
            "test": s.eval_per_task,
            "decode": s.em_per_task,
        }
        data = build_task_data(
            tokenizer, s.names("tasks"), s.data_seed, counts, s.task_seq_len, s.held_out_every, log=lambda m: None
        )
        torch.save(data, tasks_path)
        log(f"tasks {data.tasks}: {data.counts}")
    notes: list[str] = []
    for base in bases_table(s):
        prepare_base(s, base, notes)
    available = {
        base: set(json.loads((cache / "bases" / base / f"plans-{key}.json").read_text())["plans"])
        for base in bases_table(s)
    }
    arms = [a for a in s.names("arms")]
    settings = dataclasses.asdict(s)

    def missing(jobs):
        return [j for j in jobs if not record_path(cache, key, j[1], j[2], j[3], j[4]).exists()]

    first = s.seed_list()[0]
    tune = missing(
        [
            (settings, b, a, first, lr, deadline)
            for b in available
            for a in arms
            if a in available[b]
            for lr in s.lr_list()
        ]
    )
    context = multiprocessing.get_context("spawn")
    with context.Pool(s.workers, maxtasksperchild=None) as pool:
        log(f"arms: {len(tune)} tuning runs on {s.workers} workers")
        for line in pool.imap_unordered(run_job, tune):
            log("  " + line)
        chosen = best_lrs(read_records(cache, key), s)
        final = missing(
            [
                (settings, b, a, seed, chosen[(b, a)], deadline)
                for b in available
                for a in arms
                if (b, a) in chosen
                for seed in s.seed_list()[1:]
            ]
        )
        log(f"arms: {len(final)} runs at each arm's best learning rate")
        for line in pool.imap_unordered(run_job, final):
            log("  " + line)
    left = len(
        missing(
            [
                (settings, b, a, seed, lr, deadline)
                for b in available
                for a in arms
                for seed, lr in [(first, x) for x in s.lr_list()]
            ]
        )
    ) + len(
        missing(
            [
                (settings, b, a, seed, chosen[(b, a)], deadline)
                for b in available
                for a in arms
                if (b, a) in chosen
                for seed in s.seed_list()[1:]
            ]
        )
    )
    log(f"arms: {'all runs done' if left == 0 else f'{left} runs left: call --stage arms again'}")


# ====================================================================== the command
def main(argv: list[str] | None = None) -> int:
    s, args = parse(argv, __doc__.split("\n\n")[1])
    started = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    if args.estimate:
        from tools.quality.estimate import estimate, print_estimate

        print_estimate(estimate(s))
        return 0
    stages = ["pretrain", "arms", "speed", "report"] if args.stage == "all" else [args.stage]
    for stage in stages:
        log(f"== stage {stage}")
        if stage == "pretrain":
            stage_pretrain(s, started)
        elif stage == "arms":
            stage_arms(s, started)
        elif stage == "restore":
            from tools.quality.restore import stage_restore

            stage_restore(s, study_key(s), log)
        elif stage == "speed":
            from tools.quality.speed import stage_speed

            stage_speed(s, study_key(s), log)
        else:
            from tools.quality.report import stage_report

            stage_report(
                s, study_key(s), " ".join(["python -m tools.quality"] + (sys.argv[1:] if argv is None else argv)), log
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
