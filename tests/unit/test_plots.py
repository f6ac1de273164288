"""The report's plots, read back from their matplotlib objects (no pixels): scales, axes, legends, markers."""

import json

import pytest
from helpers.reports import report_with

from aletheia_ds import run_report
from aletheia_ds.config import PlanSection
from aletheia_ds.plan import make_plan
from aletheia_ds.run_report import RunResults


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """Each plot's figure, kept open instead of written."""
    kept = []

    def keep(fig, out):
        kept.append(fig)
        return out

    monkeypatch.setattr(run_report, "_save", keep)
    yield kept
    for fig in kept:
        run_report._pyplot().close(fig)


def test_heat_map_is_log_scaled_and_titled_with_the_models_path(figures, tmp_path):
    from matplotlib.colors import LogNorm

    report = report_with([0.5, 2.0, 40.0, 900.0])
    report.model = "/data/examples/tiny/model"
    report.layers[0].modules["k_proj"] = 0.0  # no gradient reached it: blank, not the bottom of the scale
    run_report.plot_probe_heatmap(report, tmp_path / "probe_modules.png")
    (ax, _colorbar) = figures[0].axes
    image = ax.get_images()[0]
    assert isinstance(image.norm, LogNorm)
    scores = [s for layer in report.layers for s in layer.modules.values() if s > 0]
    assert image.norm.vmin == pytest.approx(min(scores)) and image.norm.vmax == pytest.approx(max(scores))
    assert ax.get_title().startswith("probe module scores of tiny/model: 2 batches, 512 tokens")


@pytest.mark.parametrize("scores,frozen_prefix", [([9, 1, 1, 1, 8, 7, 1, 1], False), ([1, 1, 1, 2, 8, 9, 7, 6], True)])
def test_plan_axis_spans_the_scores_and_names_a_frozen_prefix_only_when_there_is_one(
    figures, tmp_path, scores, frozen_prefix
):
    report = report_with(scores)
    plan = make_plan(report, PlanSection(rule="top_pct", top_pct=50))
    assert (plan.lowest_adapted_layer > 0) == frozen_prefix
    run_report.plot_plan(plan, report, tmp_path / "plan.png")
    fig = figures[0]
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.0, 1.0)  # score / max: nothing lies beyond 1
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert ("frozen prefix (no_grad)" in legend) == frozen_prefix
    # every adapted layer's ranks are written beside the axes, none outside the figure
    fig.canvas.draw()
    labels = [t for t in ax.texts if t.get_text().startswith("attention r")]
    assert len(labels) == len(plan.planned_layers())
    figure_box = fig.bbox
    assert all(figure_box.x0 <= t.get_window_extent().x0 and t.get_window_extent().x1 <= figure_box.x1 for t in labels)


@pytest.mark.parametrize("evaluations,joined", [(0, False), (2, True)])
def test_held_out_loss_is_markers_joined_only_across_evaluations_during_training(
    figures, tmp_path, evaluations, joined
):
    rows = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 9)]
    rows += [{"step": s, "eval_loss": 2.9 - 0.1 * s} for s in (3, 6)[:evaluations]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = RunResults(eval_loss_before=3.0, eval_loss_after=2.0, steps=8)
    run_report.plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png", results)
    (ax,) = figures[0].axes
    held_out = [line for line in ax.get_lines() if line.get_label().startswith("held-out")][0]
    assert list(held_out.get_xdata()) == [0, *(3, 6)[:evaluations], 8] and held_out.get_marker() == "o"
    assert (held_out.get_linestyle() != "None") == joined
