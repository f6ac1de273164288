"""Plots and the run report: layer scores with the plan's selection, the loss curve, expert heat maps."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan
from .probe.report import ProbeReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probe(report: ProbeReport, plan: Plan | None, out: Path) -> Path:
    plt = _pyplot()
    selected = set(plan.layers) if plan else set()
    fig, ax = plt.subplots(figsize=(max(6, report.num_layers * 0.3), 3.5))
    scores = report.layer_scores()
    colors = ["tab:orange" if i in selected else "tab:gray" for i in range(report.num_layers)]
    ax.bar(range(report.num_layers), scores, color=colors)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("probe score  sqrt(sum ||dL/dW||^2)")
    title = f"{Path(report.model).name or 'model'}: {report.batches} probe batches, {report.tokens} tokens"
    if plan:
        title += f"\norange: plan '{plan.rule}' ({len(plan.layers)} layers, {plan.score_captured:.0%} of energy)"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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
    fig, axes = plt.subplots(1, 2, figsize=(max(8, n_experts * 0.5), max(3, len(layers) * 0.35 + 1.5)))
    for ax, grid, title in ((axes[0], score, "expert gradient score"), (axes[1], load, "tokens routed")):
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None and "step" in r]  # skipped steps log loss null
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_run_report(run_dir: Path) -> list[Path]:
    from .config import ConfigError

    if not (run_dir / "probe.json").is_file():
        raise ConfigError(f"--run: {run_dir} has no probe.json")
    report = ProbeReport.load(run_dir / "probe.json")
    plan = Plan.load(run_dir / "plan.json") if (run_dir / "plan.json").is_file() else None
    written = [plot_probe(report, plan, run_dir / "probe.png")]
    experts = plot_experts(report, run_dir / "experts.png")
    if experts:
        written.append(experts)
    if (run_dir / "metrics.jsonl").is_file():
        loss = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        if loss:
            written.append(loss)
    return written
