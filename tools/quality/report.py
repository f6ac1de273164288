"""The study's analysis: per-run records -> paired statistics, goals, table.md, charts, results.json (CPU only).

Per base, each arm's runs at its chosen learning rate (lowest validation loss on the first seed) are
paired by seed with the rank-matched uniform arm (`matched`) and with uniform r16:
  equal steps       relative task-loss difference per seed; mean, bootstrap and t 95% CIs; TOST at
                    +-margin (equivalent when the 90% t interval lies inside)
  equal wall-clock  each run's learning curve on a time axis (steps x the plan's step time measured alone
                    on the device); both arms read at the shorter of the two runs' times
  forgetting        paired difference of the held-out corpus loss rise
Speed: step-time ratio to uniform of the plan measured alone on the study base, and of the same plan shape
at 7B / 72B widths (stage speed). Goals are reported met or missed, never asserted.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from aletheia_ds.io import atomic_path, write_json_atomic, write_text_atomic
from tools.quality import stats
from tools.quality.arms import ARMS, read_records
from tools.quality.settings import Settings
from tools.quality.speed import pilot_ratio

CANDIDATE_EXCLUDED = {"uniform", "matched", "random"}
SPEED_GOALS = {"qwen2-72b": 1.6, "qwen2.5-7b": 1.5}  # uniform's step time / the rule's, at least


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": stats.sample_sd(values), "n": len(values), "values": values}


def chosen_runs(records: list[dict], base: str, s: Settings) -> dict[str, dict[int, dict]]:
    """arm -> seed -> the run at the arm's chosen learning rate."""
    first = s.seed_list()[0]
    by_arm: dict[str, list[dict]] = {}
    for r in records:
        if r["base"] == base:
            by_arm.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, runs in by_arm.items():
        tuning = [r for r in runs if r["seed"] == first]
        if not tuning:
            continue
        best = min(tuning, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)["lr"]
        out[arm] = {r["seed"]: r for r in runs if r["lr"] == best}
    return out


def step_seconds(arm: str, run: dict, alone: dict[str, float], s: Settings) -> float:
    if arm == "pilot":
        return alone["uniform"] * pilot_ratio(run.get("pilot_fraction_after_cut", math.nan), s.pilot_fraction)
    if arm == "random":
        predicted = run["plan"].get("predicted_fraction_of_uniform") or math.nan
        return alone.get("random", alone["uniform"] * predicted)  # the seed-first draw was timed
    return alone[arm]


def timed_curve(arm: str, run: dict, alone: dict[str, float], s: Settings) -> list[tuple[float, float]]:
    if arm != "pilot":
        per_step = step_seconds(arm, run, alone, s)
        return [(step * per_step, loss) for step, loss in run["curve"]]
    cut = run.get("pilot_step", 0)
    after = alone["uniform"] * run.get("pilot_fraction_after_cut", 1.0)
    return [(min(step, cut) * alone["uniform"] + max(0, step - cut) * after, loss) for step, loss in run["curve"]]


def compare_arms(a: dict[int, dict], b: dict[int, dict], metric: str, s: Settings) -> dict | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    result = stats.compare([a[x][metric] for x in seeds], [b[x][metric] for x in seeds], s.margin, seed=s.data_seed)
    result["seeds"] = seeds
    return result


def equal_time(arm: str, runs: dict, ref_arm: str, ref: dict, alone: dict, s: Settings) -> dict | None:
    seeds = sorted(set(runs) & set(ref))
    if not seeds:
        return None
    mine, theirs = [], []
    for x in seeds:
        c1, c2 = timed_curve(arm, runs[x], alone, s), timed_curve(ref_arm, ref[x], alone, s)
        at = min(c1[-1][0], c2[-1][0])
        mine.append(stats.interpolate(c1, at))
        theirs.append(stats.interpolate(c2, at))
    differences = stats.paired_relative(mine, theirs)
    return {
        "seeds": seeds,
        "mean": stats.mean(differences),
        "differences": differences,
        "bootstrap_ci95": stats.bootstrap_ci(differences, seed=s.data_seed),
    }


def analyse_base(base: str, records: list[dict], prepared: dict, speed: dict, s: Settings) -> dict:
    runs = chosen_runs(records, base, s)
    alone = prepared["step_seconds_alone"]
    arms = {}
    for arm, by_seed in runs.items():
        ordered = [by_seed[x] for x in sorted(by_seed)]
        entry = {
            "label": ARMS[arm].label,
            "lr": ordered[0]["lr"],
            "seeds": sorted(by_seed),
            "plan": ordered[0]["plan"],
            "trainable_params": ordered[0]["trainable_params"],
        }
        for metric in ("task_loss", "val_loss", "exact_match", "forgetting", "corpus_loss"):
            entry[metric] = _summary([r[metric] for r in ordered])
        entry["exact_match_by_task"] = {
            t: _summary([r["exact_match_by_task"][t] for r in ordered]) for t in ordered[0]["exact_match_by_task"]
        }
        entry["task_loss_by_task"] = {
            t: _summary([r["task_loss_by_task"][t] for r in ordered]) for t in ordered[0]["task_loss_by_task"]
        }
        entry["step_ratio_alone"] = statistics.fmean(step_seconds(arm, r, alone, s) for r in ordered) / alone["uniform"]
        entry["speed_ratio_at_scale"] = {}
        for shape, block in speed.get("shapes", {}).items():
            found = block["arms"].get(f"{base}/{arm}")
            if found:
                ratio = found["ratio_to_uniform"]
                if arm == "pilot":
                    ratio = pilot_ratio(ratio, s.pilot_fraction)
                entry["speed_ratio_at_scale"][shape] = ratio
        for ref in ("matched", "uniform"):
            if ref in runs and arm != ref:
                entry[f"vs_{ref}"] = {
                    "task_loss": compare_arms(by_seed, runs[ref], "task_loss", s),
                    "forgetting_diff": _paired_abs(by_seed, runs[ref], "forgetting", s),
                    "exact_match_diff": _paired_abs(by_seed, runs[ref], "exact_match", s),
                    "equal_wall_clock": equal_time(arm, by_seed, ref, runs[ref], alone, s),
                }
        entry["curve_mean"] = _mean_curve([r["curve"] for r in ordered])
        entry["timed_curve_mean"] = _mean_curve([timed_curve(arm, r, alone, s) for r in ordered])
        arms[arm] = entry
    if "random" in runs and s.random_like in runs:
        arms["random"]["vs_reference"] = {
            "reference": s.random_like,
            "task_loss": compare_arms(runs["random"], runs[s.random_like], "task_loss", s),
        }
    return {
        "arms": arms,
        "base_eval": {k: v for k, v in prepared["base_eval"].items() if k != "samples"},
        "pretrain": {k: v for k, v in prepared["pretrain"].items() if k != "loss_curve"},
        "probe_layer_scores": [layer["score"] for layer in prepared["probe"]["layers"]],
        "step_seconds_alone": alone,
        "notes": prepared.get("notes", []),
    }


def _paired_abs(a: dict, b: dict, metric: str, s: Settings) -> dict | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    differences = [a[x][metric] - b[x][metric] for x in seeds]
    return {"mean": stats.mean(differences), "bootstrap_ci95": stats.bootstrap_ci(differences, seed=s.data_seed)}


def _mean_curve(curves: list[list]) -> list[list[float]]:
    length = min(len(c) for c in curves)
    return [
        [statistics.fmean(c[i][0] for c in curves), statistics.fmean(c[i][1] for c in curves)] for i in range(length)
    ]


def goals(per_base: dict[str, dict], s: Settings) -> list[dict]:
    """Per candidate rule: equivalence on every base, forgetting, speed at scale; and guided vs random."""
    out = []
    candidates = sorted({a for b in per_base.values() for a in b["arms"]} - CANDIDATE_EXCLUDED)
    for arm in candidates:
        checks, details = [], []
        for base, result in per_base.items():
            entry = result["arms"].get(arm, {})
            tl = (entry.get("vs_matched") or {}).get("task_loss")
            verdict = tl["tost"]["equivalent"] if tl else None
            checks.append(verdict)
            fg = (entry.get("vs_matched") or {}).get("forgetting_diff")
            checks.append(fg["mean"] <= 0 if fg else None)
            if tl:
                low, high = tl["tost"]["interval"]
                details.append(
                    f"{base}: task loss {100 * tl['mean']:+.2f}% vs matched (90% CI {100 * low:+.2f}.."
                    f"{100 * high:+.2f}%, TOST p {tl['tost']['p']:.3f}); forgetting "
                    f"{fg['mean']:+.4f}"
                    if fg
                    else f"{base}: task loss {100 * tl['mean']:+.2f}%"
                )
            for shape, needed in SPEED_GOALS.items():
                ratio = entry.get("speed_ratio_at_scale", {}).get(shape)
                checks.append(None if ratio is None else 1.0 / ratio >= needed)
                if ratio is not None:
                    details.append(f"{base} shape at {shape}: {1.0 / ratio:.2f}x uniform's speed (goal {needed}x)")
        met = None if any(c is None for c in checks) else all(checks)
        out.append(
            {
                "goal": f"{arm}: equivalent to rank-matched uniform (TOST +-{100 * s.margin:g}%) on every base, "
                "forgetting <= its, >= 1.6x uniform at 72B and 1.5x at 7B",
                "arm": arm,
                "met": met,
                "detail": "; ".join(details),
            }
        )
    for base, result in per_base.items():
        vs = result["arms"].get("random", {}).get("vs_reference")
        if vs and vs["task_loss"]:
            low, high = vs["task_loss"]["bootstrap_ci95"]
            out.append(
                {
                    "goal": f"{base}: gradient-guided ({vs['reference']}) beats random layers at the same budget "
                    "(paired 95% CI of random's excess task loss above zero)",
                    "arm": "random",
                    "met": low > 0,
                    "detail": f"random {100 * vs['task_loss']['mean']:+.2f}% task loss vs "
                    f"{vs['reference']} (95% CI {100 * low:+.2f}..{100 * high:+.2f}%)",
                }
            )
    return out


def render_table(results: dict) -> str:
    lines = [
        f"Command: `{results['command']}`  ",
        f"Study key: `{results['study_key']}`; tasks "
        f"{results['settings']['tasks']}; seeds {results['settings']['seeds']}; learning rates tried on the first "
        f"seed {results['settings']['lrs']}; {results['settings']['lora_steps']} steps x "
        f"{results['settings']['lora_batch']} rows per run.",
        "",
    ]
    for base, result in results["bases"].items():
        pre = result["pretrain"]
        lines += [
            f"### Base {base}: {pre.get('params', 0) / 1e6:.1f}M parameters, {pre.get('steps_done')} pretraining "
            f"steps ({pre.get('tokens_seen', 0) / 1e6:.0f}M tokens, stopped by {pre.get('stopped_by')}); base "
            f"task loss {result['base_eval']['task_loss']:.4f}, exact match "
            f"{100 * result['base_eval']['exact_match']:.1f}%",
            "",
            "| arm | lr | layers | trainable | task loss | vs matched (95% CI) | TOST ±1% | equal time vs "
            "matched | EM % | forgetting | Δ forgetting vs matched | step alone | 7B | 72B |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, e in result["arms"].items():
            vs = e.get("vs_matched") or {}
            tl, eq, fg = vs.get("task_loss"), vs.get("equal_wall_clock"), vs.get("forgetting_diff")
            ci = (
                f"{100 * tl['mean']:+.2f}% ({100 * tl['bootstrap_ci95'][0]:+.2f}..{100 * tl['bootstrap_ci95'][1]:+.2f})"
                if tl
                else "–"
            )
            tost = (
                "–"
                if not tl or tl["tost"]["equivalent"] is None
                else f"{'yes' if tl['tost']['equivalent'] else 'no'} (p {tl['tost']['p']:.3f})"
            )
            eqs = f"{100 * eq['mean']:+.2f}%" if eq else "–"
            scale = e["speed_ratio_at_scale"]
            layers = e["plan"]["layers"] if arm != "random" else f"{len(e['plan']['layers'])} drawn per seed"
            fg_text = f"{fg['mean']:+.4f}" if fg else "–"
            lines.append(
                f"| {arm} | {e['lr']:g} | {layers} | {e['trainable_params']:,} | "
                f"{e['task_loss']['mean']:.4f} ± {e['task_loss']['sd']:.4f} | {ci} | {tost} | {eqs} | "
                f"{100 * e['exact_match']['mean']:.1f} | {e['forgetting']['mean']:+.4f} | {fg_text} |"
            )
            lines[-1] += (
                f" {e['step_ratio_alone']:.2f} | {scale.get('qwen2.5-7b', math.nan):.2f} | "
                f"{scale.get('qwen2-72b', math.nan):.2f} |"
            )
        tasks = list(next(iter(result["arms"].values()))["exact_match_by_task"]) if result["arms"] else []
        lines += [
            "",
            "Exact match by task (%):",
            "",
            "| arm | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
            "| base model | "
            + " | ".join(f"{100 * result['base_eval']['exact_match_by_task'][t]:.1f}" for t in tasks)
            + " |",
        ]
        for arm, e in result["arms"].items():
            lines.append(
                f"| {arm} | " + " | ".join(f"{100 * e['exact_match_by_task'][t]['mean']:.1f}" for t in tasks) + " |"
            )
        lines.append("")
    lines += ["Goals:", ""] + [
        f"- **{g['goal']}**: {dict([(True, 'met'), (False, 'MISSED'), (None, '–')])[g['met']]} — {g['detail']}"
        for g in results["goals"]
    ]
    if results["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def pareto_points(results: dict) -> list[dict]:
    """Per arm, over bases: step-time ratio at 72B widths (else 7B, else alone) and task-loss ratio vs matched."""
    points = []
    names = sorted({a for b in results["bases"].values() for a in b["arms"]})
    for arm in names:
        entries = [b["arms"][arm] for b in results["bases"].values() if arm in b["arms"]]
        speed, source = [], None
        for key in ("qwen2-72b", "qwen2.5-7b", None):
            speed = [
                e["speed_ratio_at_scale"][key] if key else e["step_ratio_alone"]
                for e in entries
                if (key is None or key in e["speed_ratio_at_scale"])
            ]
            if speed:
                source = key or "study base, alone"
                break
        losses = [
            1.0 + e["vs_matched"]["task_loss"]["mean"] for e in entries if (e.get("vs_matched") or {}).get("task_loss")
        ]
        if arm == "matched":
            losses = [1.0] * len(entries)
        if speed and losses:
            points.append(
                {
                    "arm": arm,
                    "step_ratio": statistics.fmean(speed),
                    "loss_ratio": statistics.fmean(losses),
                    "speed_source": source,
                }
            )
    front = stats.pareto_front([(p["step_ratio"], p["loss_ratio"]) for p in points])
    for i, p in enumerate(points):
        p["pareto"] = i in front
    return points


def render_charts(results: dict, out: Path, log) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("charts: matplotlib is not installed; run --stage report elsewhere")
        return
    points = results["pareto"]
    fig, ax = plt.subplots(figsize=(8, 6))
    for p in points:
        ax.scatter(p["step_ratio"], p["loss_ratio"], color="tab:red" if p["pareto"] else "tab:blue", zorder=3)
        ax.annotate(p["arm"], (p["step_ratio"], p["loss_ratio"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = sorted((p["step_ratio"], p["loss_ratio"]) for p in points if p["pareto"])
    if front:
        ax.plot(*zip(*front), color="tab:red", linewidth=1, label="Pareto front")
    ax.axhspan(
        1 - results["settings"]["margin"],
        1 + results["settings"]["margin"],
        color="green",
        alpha=0.1,
        label="±1% of rank-matched uniform",
    )
    ax.axvline(1 / 1.6, color="gray", linestyle=":", label="1.6x uniform's speed")
    sources = sorted({p["speed_source"] for p in points})
    ax.set_xlabel(f"step time / uniform r16's ({', '.join(sources)})")
    ax.set_ylabel("task loss / rank-matched uniform's (mean over bases and seeds)")
    ax.legend(fontsize=8)
    ax.set_title("Speed vs quality per arm")
    fig.tight_layout()
    with atomic_path(out / "pareto.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    bases = list(results["bases"])
    fig, axes = plt.subplots(2, max(1, len(bases)), figsize=(7 * max(1, len(bases)), 9), squeeze=False)
    for column, base in enumerate(bases):
        for row, (key, xlabel) in enumerate(
            (("curve_mean", "step"), ("timed_curve_mean", "seconds (step time alone)"))
        ):
            ax = axes[row][column]
            for arm, e in results["bases"][base]["arms"].items():
                curve = e[key]
                ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label=arm)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test task loss (mean over seeds)")
            ax.set_title(f"{base}: learning curves")
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def stage_report(s: Settings, key: str, command: str, log) -> dict:
    cache, out = Path(s.cache), Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(cache, key)
    speed_path = cache / f"speed-{key}.json"
    speed = json.loads(speed_path.read_text()) if speed_path.exists() else {}
    per_base, notes = {}, []
    for base in s.names("bases"):
        path = cache / "bases" / base / f"plans-{key}.json"
        if path.exists():
            per_base[base] = analyse_base(base, records, json.loads(path.read_text()), speed, s)
            notes += [f"{base}: {n}" for n in per_base[base]["notes"]]
    if not speed:
        notes.append("no speed stage results: speed at 7B/72B widths missing from goals and chart")
    corpus = json.loads((cache / "corpus.json").read_text()) if (cache / "corpus.json").exists() else {}
    results = {
        "command": command,
        "study_key": key,
        "settings": json.loads(json.dumps(s.__dict__)),
        "corpus": corpus,
        "speed": speed,
        "bases": per_base,
        "notes": notes,
        "runs": len(records),
    }
    results["goals"] = goals(per_base, s)
    results["pareto"] = pareto_points(results)
    write_json_atomic(out / "results.json", results)
    write_json_atomic(out / "runs.json", [{k: v for k, v in r.items() if k != "samples"} for r in records])
    table = render_table(results)
    write_text_atomic(out / "table.md", table)
    render_charts(results, out, log)
    log(table)
    return results
