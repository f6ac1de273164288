"""Plots and the run report: `aletheia-ds report RUN_DIR` -> RUN_DIR/report.md (or report.html) and its PNGs.

    probe.png           layer scores, the plan's layers highlighted (also drawn by the training run)
    probe_heatmap.png   layer x module ||dL/dW||_F
    experts.png         layer x expert gradient score and routing load (MoE models)
    plan.png            the plan on the layer stack: adapted span, ranks, where backward stops, frozen prefix
    loss.png            training loss per step, held-out loss (before, during with train.eval_every, after)
    speed.png           tokens/s per plan when a benchmark ran (bench_speed.json from tools/bench_speed.py)

Every number in report.md is read from probe.json, plan.json, metrics.jsonl, eval.json and bench_speed.json
as they are; nothing is re-measured.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError
from .io import atomic_path, check_writable, read_json_object, write_text_atomic
from .plan import Plan
from .probe.report import ProbeReport

NORM = r"$\|\partial L / \partial W\|_F$"


@dataclass
class RunResults:
    """What a training run measured: its eval.json, which tests and tools read by these keys.

    Times and memory peaks are per phase ("build", "probe", "train", "export"); a phase that did not run
    (the probe of a resumed run or of a reused probe.json) has no entry.
    """

    seconds: dict[str, float] = field(default_factory=dict)  # "train" includes the checkpoints written
    peak_memory_gib: dict[str, Optional[list[float]]] = field(default_factory=dict)  # per rank; None on CPU
    base_parameters_total: int = 0
    # zero.Init evidence: the base parameter elements each rank holds after the build, and its host memory peak
    base_parameters_held_by_rank: list[int] = field(default_factory=list)
    peak_host_rss_gib_by_rank: list[float] = field(default_factory=list)
    # the build's host memory, sampled (aletheia_ds.host_memory): anonymous pages (what a rank holds) and
    # file-backed pages (mapped checkpoint shards), each {"before", "peak"} in GiB per rank; ru_maxrss counts both
    host_anon_gib_by_rank: list[dict] = field(default_factory=list)
    host_file_gib_by_rank: list[dict] = field(default_factory=list)
    eval_loss_before: Optional[float] = None  # a resumed run carries the first run's
    eval_loss_after: Optional[float] = None
    steps: Optional[int] = None
    skipped_steps: Optional[int] = None  # train.nan_policy=skip, resumptions included
    prefix_cache: Optional[dict[str, int]] = None  # PrefixCache.summary(), when train.prefix_cache was on

    def to_json(self) -> dict[str, Any]:
        out = {
            "seconds": dict(self.seconds),
            "peak_memory_gib": dict(self.peak_memory_gib),
            "base_parameters": {
                "total": self.base_parameters_total,
                "held_by_rank": list(self.base_parameters_held_by_rank),
            },
            "peak_host_rss_gib_by_rank": list(self.peak_host_rss_gib_by_rank),
            "host_anon_gib_by_rank": list(self.host_anon_gib_by_rank),
            "host_file_gib_by_rank": list(self.host_file_gib_by_rank),
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
        }
        if self.prefix_cache is not None:
            out["prefix_cache"] = dict(self.prefix_cache)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunResults":
        """An eval.json as written by `to_json`; keys an older or unfinished run lacks keep their defaults."""
        base = data.get("base_parameters") or {}
        return cls(
            seconds=dict(data.get("seconds") or {}),
            peak_memory_gib=dict(data.get("peak_memory_gib") or {}),
            base_parameters_total=int(base.get("total", 0)),
            base_parameters_held_by_rank=list(base.get("held_by_rank", [])),
            peak_host_rss_gib_by_rank=list(data.get("peak_host_rss_gib_by_rank") or []),
            host_anon_gib_by_rank=list(data.get("host_anon_gib_by_rank") or []),
            host_file_gib_by_rank=list(data.get("host_file_gib_by_rank") or []),
            eval_loss_before=data.get("eval_loss_before"),
            eval_loss_after=data.get("eval_loss_after"),
            steps=data.get("steps"),
            skipped_steps=data.get("skipped_steps"),
            prefix_cache=data.get("prefix_cache"),
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)
    return out


def _model_name(report: ProbeReport) -> str:
    # the last two parts of the path: a checkout's model directory is often just "model" (examples/tiny/model)
    return "/".join(Path(report.model).parts[-2:]) or "model"


def plot_probe(report: ProbeReport, plan: Plan | None, out: Path) -> Path:
    plt = _pyplot()
    selected = set(plan.layers) if plan else set()
    fig, ax = plt.subplots(figsize=(max(6, report.num_layers * 0.3), 3.5))
    scores = report.layer_scores()
    colors = ["tab:orange" if i in selected else "tab:gray" for i in range(report.num_layers)]
    ax.bar(range(report.num_layers), scores, color=colors)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("layer score  " + r"$\sqrt{\sum \|\partial L/\partial W\|_F^2}$")
    ax.set_xticks(
        range(report.num_layers),
        [str(i) for i in range(report.num_layers)],
        fontsize=8 if report.num_layers <= 40 else 6,
    )
    title = f"probe layer scores of {_model_name(report)}: {report.batches} batches, {report.tokens} tokens"
    if plan:
        title += f"\norange: plan '{plan.rule}' ({len(plan.layers)} layers, {plan.score_captured:.0%} of energy)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def module_grid(report: ProbeReport) -> tuple[list[str], list[list[float]]]:
    """Module keys (attention first, in model order) and scores[layer][module] (nan where a layer lacks one)."""
    kinds = report.layout.get("module_kinds", {})
    keys: list[str] = []
    for layer in report.layers:
        for key in layer.modules:
            if key not in keys:
                keys.append(key)
    order = {k: i for i, k in enumerate(keys)}
    keys = sorted(keys, key=lambda k: (kinds.get(k) != "attention", order[k]))
    return keys, [[layer.modules.get(k, math.nan) for k in keys] for layer in report.layers]


def plot_probe_heatmap(report: ProbeReport, out: Path) -> Path:
    """Layer x module heat map of the probe's module scores, on a log colour scale: the scores of one model span
    orders of magnitude (q/k projections far below the MLP's), which a linear scale paints all black."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    keys, grid = module_grid(report)
    data = np.array(grid, dtype=float)
    positive = data[np.isfinite(data) & (data > 0)]
    # a zero score (a module no gradient reached) has no place on a log scale: drawn blank, like a missing one
    data = np.where(data > 0, data, np.nan)
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(keys) + 3), max(4, 0.3 * report.num_layers + 2)))
    im = ax.imshow(data, aspect="auto", cmap="magma", origin="lower", norm=norm)
    ax.set_xticks(range(len(keys)), keys, rotation=35, ha="right", fontsize=8)
    step = max(1, report.num_layers // 32)
    ax.set_yticks(range(0, report.num_layers, step), [str(i) for i in range(0, report.num_layers, step)], fontsize=8)
    ax.set_xlabel("module")
    ax.set_ylabel("decoder layer")
    ax.set_title(
        f"probe module scores of {_model_name(report)}: {report.batches} batches, {report.tokens} tokens", fontsize=9
    )
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(NORM + " (RMS over probe batches)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_experts(report: ProbeReport, out: Path) -> Path | None:
    """Layer x expert heat maps of gradient score and routing load (MoE models)."""
    if not report.experts:
        return None
    import numpy as np

    plt = _pyplot()
    layers = sorted({e.layer for e in report.experts})
    n_experts = max(e.expert for e in report.experts) + 1
    score = np.full((len(layers), n_experts), np.nan)
    load = np.full((len(layers), n_experts), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    for e in report.experts:
        score[row[e.layer], e.expert] = e.score
        load[row[e.layer], e.expert] = e.tokens
    fig, axes = plt.subplots(1, 2, figsize=(max(8, n_experts * 0.5), max(3, len(layers) * 0.35 + 1.8)))
    for ax, grid, title, unit in (
        (axes[0], score, "expert gradient score", NORM + " over the expert's banks"),
        (axes[1], load, "routing load", "tokens routed (all probe batches)"),
    ):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        fig.colorbar(im, ax=ax).set_label(unit, fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plan_rows(plan: Plan) -> list[dict]:
    """Per adapted layer: module ranks ('attention r16', 'mlp r64') and planned experts."""
    rows = []
    experts = plan.experts_by_layer()
    for layer in plan.planned_layers():
        ranks: dict[str, set] = {}
        for m in plan.modules:
            if m.layer == layer:
                ranks.setdefault(m.kind, set()).add(m.r)
        parts = [f"{kind} r{'/'.join(str(r) for r in sorted(rs))}" for kind, rs in sorted(ranks.items())]
        if layer in experts:
            parts.append(f"{len(experts[layer])} experts r{experts[layer][0].r}")
        if any(m.layer == layer for m in plan.routers):
            parts.append("router")
        rows.append({"layer": layer, "modules": sum(m.layer == layer for m in plan.modules), "ranks": ", ".join(parts)})
    return rows


def plot_plan(plan: Plan, report: ProbeReport | None, out: Path) -> Path:
    """The layer stack, embeddings at the bottom: adapted layers coloured and labelled with their ranks, the
    frozen prefix shaded, and the line where backward stops (the lowest adapted layer)."""
    from matplotlib.transforms import blended_transform_factory

    plt = _pyplot()
    n = plan.num_layers
    scores = report.layer_scores() if report else [1.0] * n
    top = max(scores) or 1.0
    labels = {row["layer"]: row["ranks"] for row in plan_rows(plan)}
    lowest = plan.lowest_adapted_layer
    fig, ax = plt.subplots(figsize=(8.5, max(3.8, 0.28 * n + 2.2)))
    if lowest > 0:
        ax.axhspan(-1.5, lowest - 0.5, color="tab:blue", alpha=0.08, lw=0)
    for i in range(n):
        adapted = i in labels
        ax.barh(
            i,
            scores[i] / top,
            height=0.8,
            color="tab:orange" if adapted else "lightgray",
            edgecolor="black" if adapted else "none",
            linewidth=0.5,
        )
    # the ranks in a column right of the axes, so the x axis spans the scores (0 to 1) and nothing else
    beside = blended_transform_factory(ax.transAxes, ax.transData)
    for layer, label in labels.items():
        ax.text(1.02, layer, label, va="center", fontsize=7, transform=beside, clip_on=False)
    ax.axhline(lowest - 0.5, color="tab:red", lw=1.5, ls="--")
    below = f"; layers 0-{lowest - 1}: frozen prefix, no backward" if lowest > 0 else "; every layer gets backward"
    ax.text(
        0.01,
        lowest - 0.6,
        f"backward stops here (lowest adapted layer {lowest}){below}",
        ha="left",
        va="top",
        fontsize=8,
        color="tab:red",
        transform=beside,
        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1),
    )
    ax.set_ylim(-1.5, n - 0.3)
    ax.set_xlim(0, 1.0)
    step = max(1, n // 32)
    ax.set_yticks(range(0, n, step), [str(i) for i in range(0, n, step)], fontsize=8)
    ax.set_ylabel("decoder layer (0: next to the embeddings)")
    ax.set_xlabel("probe layer score / max" if report else "")
    predicted = ""
    if plan.predicted:
        predicted = (
            f"; predicted step time {1 / plan.predicted['speedup_vs_uniform']:.2f} x uniform r16 LoRA's "
            f"({plan.predicted['speedup_vs_uniform']:.2f}x speed, {plan.predicted['source']})"
        )
    ax.set_title(
        f"plan '{plan.rule}': {len(plan.planned_layers())} of {n} layers adapted, "
        f"{plan.score_captured:.0%} of the probe energy{predicted}".replace("; ", "\n", 1),
        fontsize=9,
    )
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:orange", label="adapted (ranks written)"), Patch(color="lightgray", label="frozen")]
    if lowest > 0:
        handles.append(Patch(color="tab:blue", alpha=0.15, label="frozen prefix (no_grad)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    return _save(fig, out)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training rows with a loss, evaluation rows) of metrics.jsonl."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in rows if r.get("loss") is not None and "step" in r]  # skipped steps log loss null
    evals = [r for r in rows if r.get("eval_loss") is not None and "step" in r]
    return train, evals


def loss_points(metrics_path: Path, results: Optional[RunResults] = None) -> tuple[list[dict], list[tuple[int, float]]]:
    """Training rows and held-out (step, loss) points: before training (step 0), during, after."""
    train, evals = read_metrics(metrics_path) if metrics_path.is_file() else ([], [])
    points = {r["step"]: r["eval_loss"] for r in evals}
    results = results or RunResults()
    if results.eval_loss_before is not None:
        points.setdefault(0, results.eval_loss_before)
    if results.eval_loss_after is not None and results.steps:
        points.setdefault(int(results.steps), results.eval_loss_after)
    return train, sorted((s, v) for s, v in points.items() if v is not None and math.isfinite(v))


def plot_loss(metrics_path: Path, out: Path, results: Optional[RunResults] = None) -> Path | None:
    train, held_out = loss_points(metrics_path, results)
    if not train and not held_out:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            color="tab:blue",
            lw=1.2,
            label="training loss (mean over the step's micro-batches)",
        )
    if held_out:
        # before and after alone are two measurements, not a curve: a joining line only between evaluations
        # during training (train.eval_every)
        ax.plot(
            [s for s, _ in held_out],
            [v for _, v in held_out],
            marker="o",
            ls="--" if len(held_out) > 2 else "none",
            color="tab:orange",
            ms=5,
            label="held-out loss (step 0: before training)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per predicted token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_rewards(metrics_path: Path, out: Path) -> Path | None:
    """Preference runs (train.objective dpo/simpo): reward margin and accuracy per logged step."""
    train, _ = read_metrics(metrics_path) if metrics_path.is_file() else ([], [])
    rows = [r for r in train if r.get("reward_margin") is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, margin_ax = plt.subplots(figsize=(6.5, 3.8))
    steps = [r["step"] for r in rows]
    margin_ax.plot(steps, [r["reward_margin"] for r in rows], color="tab:blue", lw=1.2, label="reward margin")
    margin_ax.set_xlabel("optimizer step")
    margin_ax.set_ylabel("reward margin (chosen - rejected)")
    margin_ax.grid(alpha=0.3)
    accuracy_ax = margin_ax.twinx()
    accuracy_ax.plot(steps, [r["reward_accuracy"] for r in rows], color="tab:orange", lw=1.0, label="reward accuracy")
    accuracy_ax.set_ylabel("reward accuracy (chosen ranked above rejected)")
    accuracy_ax.set_ylim(-0.02, 1.02)
    lines = margin_ax.get_lines() + accuracy_ax.get_lines()
    margin_ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)


def bench_rows(bench: dict) -> list[dict]:
    """Flat rows of a bench_speed.json: shape, mode, row name and its numbers."""
    rows = []
    for result in bench.get("results", []):
        for mode, body in result.get("modes", {}).items():
            for name, row in body.get("rows", {}).items():
                rows.append({"shape": result["shape"], "checkpointing": mode == "checkpointing", "row": name, **row})
    return rows


def plot_speed(bench: dict, out: Path) -> Path | None:
    rows = bench_rows(bench)
    if not rows:
        return None
    plt = _pyplot()
    groups: dict[tuple[str, bool], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["checkpointing"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), squeeze=False)
    for ax, ((shape, ckpt), group) in zip(axes[0], groups.items()):
        names = [r["row"] for r in group]
        bars = ax.bar(
            range(len(group)),
            [r["tokens_per_s"] for r in group],
            color=[
                "tab:gray" if n.startswith("uniform") else "tab:blue" if n == "paper" else "tab:orange" for n in names
            ],
        )
        for bar, r in zip(bars, group):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                bar.get_height(),
                f"{r['speedup_vs_uniform']:.2f}x",
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(group)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("training throughput (tokens/s)")
        ax.set_title(f"{shape}, checkpointing {'on' if ckpt else 'off'}\n(labels: speedup vs uniform r16)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _read_json(path: Path) -> Optional[dict]:
    return read_json_object(path, path.name) if path.is_file() else None


def render_markdown(
    run_dir: Path,
    report: ProbeReport,
    plan: Optional[Plan],
    results: Optional[RunResults],
    metrics_path: Path,
    bench: Optional[dict],
    images: dict[str, Path],
    out_dir: Path,
) -> str:
    def image(key: str, alt: str) -> list[str]:
        if key not in images:
            return []
        return [f"![{alt}]({images[key].relative_to(out_dir).as_posix()})", ""]

    md = [
        f"# Run report: {run_dir.name or run_dir}",
        "",
        f"Run directory `{run_dir}`; model `{report.model}` ({report.layout.get('family', 'unknown family')}, "
        f"{report.num_layers} decoder layers).",
        "",
    ]
    if results:
        md += [
            "## Result",
            "",
            "| held-out loss before | after | perplexity before | after | steps | skipped steps |",
            "|---|---|---|---|---|---|",
        ]
        before, after = results.eval_loss_before, results.eval_loss_after
        from .evaluate import perplexity

        ppl = lambda v: _fmt(perplexity(v), ".3f") if v is not None else "–"  # noqa: E731
        steps = results.steps if results.steps is not None else "–"
        md += [
            f"| {_fmt(before)} | {_fmt(after)} | {ppl(before)} | {ppl(after)} | {steps} | "
            f"{results.skipped_steps or 0} |",
            "",
        ]
    md += [
        "## Probe",
        "",
        f"{report.batches} batches of {report.batch_size} x up to {report.seq_len} tokens ({report.tokens} tokens) "
        f"on {report.world_size} rank(s), {report.seconds:.2f} s. Module score = RMS over batches of "
        "||dL/dW||_F; layer score = sqrt(sum of its module (and expert) scores squared).",
        "",
    ]
    md += image("probe_heatmap", "probe heat map: layer x module")
    md += image("probe", "layer scores with the plan's layers")
    ranked = sorted(report.layers, key=lambda layer: (-layer.score, layer.index))
    md += ["| rank | layer | score | strongest module |", "|---|---|---|---|"]
    for place, layer in enumerate(ranked[:10], start=1):
        best = max(layer.modules.items(), key=lambda kv: kv[1]) if layer.modules else ("–", math.nan)
        md.append(f"| {place} | {layer.index} | {layer.score:.6g} | {best[0]} ({best[1]:.6g}) |")
    md.append("")
    if report.experts:
        md += [
            "### Experts",
            "",
            f"{len(report.experts)} experts in {len({e.layer for e in report.experts})} MoE "
            f"layers; {sum(e.tokens for e in report.experts)} routed tokens.",
            "",
        ]
        md += image("experts", "expert heat maps: gradient score and routing load")
    if plan:
        md += [
            "## Plan",
            "",
            f"Rule `{plan.rule}`: {len(plan.planned_layers())} of {plan.num_layers} layers, {len(plan.modules)} "
            f"adapted modules{f', {len(plan.experts)} experts' if plan.experts else ''}; captures "
            f"{plan.score_captured:.1%} of the probe's gradient energy. Lowest adapted layer "
            f"{plan.lowest_adapted_layer}: backward stops there, layers 0..{plan.lowest_adapted_layer - 1} "
            "form the frozen prefix."
            if plan.lowest_adapted_layer > 0
            else f"Rule `{plan.rule}`: {len(plan.planned_layers())} of {plan.num_layers} layers, {len(plan.modules)} "
            f"adapted modules{f', {len(plan.experts)} experts' if plan.experts else ''}; captures "
            f"{plan.score_captured:.1%} of the probe's gradient energy. Lowest adapted layer 0: backward runs "
            "through every layer.",
            "",
        ]
        if plan.predicted:
            p = plan.predicted
            md += [
                f"Predicted step time {_fmt(p.get('step_seconds'), '.4g')} s vs uniform r16 LoRA "
                f"{_fmt(p.get('uniform_step_seconds'), '.4g')} s: {p['speedup_vs_uniform']:.2f}x ({p['source']}).",
                "",
            ]
        md += image("plan", "the plan on the layer stack")
        md += ["| layer | adapted modules | ranks |", "|---|---|---|"]
        md += [f"| {r['layer']} | {r['modules']} | {r['ranks']} |" for r in plan_rows(plan)]
        md.append("")
    train, held_out = loss_points(metrics_path, results)
    if train or held_out:
        md += ["## Training", ""]
        if train:
            speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
            md += [
                f"{len(train)} logged steps; loss {train[0]['loss']:.4f} at step {train[0]['step']} -> "
                f"{train[-1]['loss']:.4f} at step {train[-1]['step']}"
                + (f"; median {sorted(speeds)[len(speeds) // 2]:,.0f} tokens/s (all ranks)" if speeds else "")
                + ".",
                "",
            ]
        if held_out:
            md += ["Held-out loss: " + ", ".join(f"step {s}: {v:.4f}" for s, v in held_out) + ".", ""]
        md += image("loss", "loss curves")
        rewarded = [r for r in train if r.get("reward_margin") is not None]
        if rewarded:
            first, last = rewarded[0], rewarded[-1]
            md += [
                f"Preference rewards: margin {first['reward_margin']:.4f} -> {last['reward_margin']:.4f}, accuracy "
                f"{first['reward_accuracy']:.2f} -> {last['reward_accuracy']:.2f} (steps {first['step']} -> "
                f"{last['step']}; the held-out loss is the preference loss).",
                "",
            ]
            md += image("rewards", "reward margin and accuracy")
    if bench:
        md += [
            "## Speed",
            "",
            f"From `bench_speed.json` ({bench.get('device', '?')}, torch {bench.get('torch', '?')}; "
            f"`{bench.get('command', '')}`).",
            "",
            "| shape | checkpointing | row | layers (lowest) | ms/step | tokens/s | peak GiB | speedup |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in bench_rows(bench):
            md.append(
                f"| {r['shape']} | {'on' if r['checkpointing'] else 'off'} | {r['row']} | "
                f"{len(r.get('layers', []))} ({r.get('lowest_adapted_layer', '–')}) | "
                f"{r['median_step_s'] * 1000:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{_fmt(r.get('peak_memory_gib'), '.1f')} | {r['speedup_vs_uniform']:.2f}x |"
            )
        md.append("")
        md += image("speed", "throughput per plan")
    return "\n".join(md)


def write_run_report(run_dir: Path, out_dir: Optional[Path] = None, fmt: str = "md") -> list[Path]:
    """report.md (or report.html) and its PNGs for a run directory; returns the files written."""
    if not run_dir.is_dir():
        raise ConfigError(f"report: run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "probe.json").is_file():
        raise ConfigError(f"report: {run_dir} has no probe.json (is it a train.output_dir?)")
    if fmt == "html":
        try:
            import markdown  # noqa: F401
        except ImportError:
            raise ConfigError("report --format html: needs the markdown package (pip install markdown)") from None
    out_dir = out_dir or run_dir
    check_writable(out_dir, "report --out", directory=True)
    # read everything first: a broken input is refused before any file is written
    report = ProbeReport.load(run_dir / "probe.json")
    plan = Plan.load(run_dir / "plan.json") if (run_dir / "plan.json").is_file() else None
    eval_json = _read_json(run_dir / "eval.json")
    results = RunResults.from_json(eval_json) if eval_json else None  # `{}`: no results, as no file
    bench = _read_json(run_dir / "bench_speed.json")
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        try:
            read_metrics(metrics_path)
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(f"{metrics_path}: not JSON lines ({err})") from None
    images: dict[str, Path] = {
        "probe_heatmap": plot_probe_heatmap(report, out_dir / "probe_heatmap.png"),
        "probe": plot_probe(report, plan, out_dir / "probe.png"),
    }
    if report.experts:
        images["experts"] = plot_experts(report, out_dir / "experts.png")
    if plan:
        images["plan"] = plot_plan(plan, report, out_dir / "plan.png")
    loss = plot_loss(metrics_path, out_dir / "loss.png", results)
    if loss:
        images["loss"] = loss
    rewards = plot_rewards(metrics_path, out_dir / "rewards.png")
    if rewards:
        images["rewards"] = rewards
    speed = plot_speed(bench, out_dir / "speed.png") if bench else None
    if speed:
        images["speed"] = speed
    text = render_markdown(run_dir, report, plan, results, metrics_path, bench, images, out_dir)
    if fmt == "html":
        import markdown

        body = markdown.markdown(text, extensions=["tables"])
        page = (
            f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{run_dir.name}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>\n"
            f"{body}\n</body></html>\n"
        )
        target = out_dir / "report.html"
        write_text_atomic(target, page)
    else:
        target = out_dir / "report.md"
        write_text_atomic(target, text + "\n")
    return [*images.values(), target]
