"""Metrics sinks: metrics.jsonl always, TensorBoard event files, wandb/mlflow offline by default, a no-op sink off
rank 0, one error line for a backend that is not installed; progress lines in quiet mode."""

import json
import sys
import types

import pytest

from aletheia_ds import metrics as metrics_mod
from aletheia_ds.config import ConfigError
from aletheia_ds.metrics import MetricsSink, open_metrics, scalars
from aletheia_ds.progress import Progress

ROWS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 100.0, "grad_norm": None, "epoch": 0.5},
    {"step": 2, "loss": 2.25, "lr": 5e-4, "tokens_per_s": 120.0, "grad_norm": 0.75, "skipped": True},
    {"step": 2, "eval_loss": 2.4},
]


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_names_and_skips_non_numbers():
    assert scalars(ROWS[0]) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 100.0, "train/epoch": 0.5}
    assert scalars(ROWS[1])["train/grad_norm"] == 0.75 and "train/skipped" not in scalars(ROWS[1])
    assert scalars(ROWS[2]) == {"eval/loss": 2.4}


def test_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    sink = open_metrics(tmp_path, ["tensorboard"], enabled=True)
    for row in ROWS:
        sink.write(row)
    sink.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS
    events = read_events(tmp_path / "tensorboard")
    assert events["train/loss"] == [(1, 2.5), (2, 2.25)]
    assert events["eval/loss"] == [(2, pytest.approx(2.4))]
    assert "train/grad_norm" in events and events["train/grad_norm"] == [(2, 0.75)]


def test_not_rank_zero_writes_nothing(tmp_path):
    sink = open_metrics(tmp_path, ["tensorboard", "wandb", "mlflow"], enabled=False)
    assert type(sink) is MetricsSink
    sink.write(ROWS[0])
    sink.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_backend_is_one_line_naming_the_knob(tmp_path, monkeypatch):
    real = metrics_mod.importlib.util.find_spec
    monkeypatch.setattr(metrics_mod.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(
        ConfigError,
        match=r"^train.report_to: wandb is not installed; pip install wandb, or remove "
        r"wandb from train.report_to$",
    ):
        open_metrics(tmp_path, ["wandb"], enabled=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_and_mlflow_stay_local(tmp_path, monkeypatch):
    """Stand-ins record what the sinks ask of wandb and mlflow (neither is installed in the test environment)."""
    calls = []

    class WandbRun:
        def log(self, values, step):
            calls.append(("wandb.log", step, values))

        def finish(self):
            calls.append(("wandb.finish",))

    def wandb_init(**kwargs):
        calls.append(("wandb.init", kwargs, __import__("os").environ.get("WANDB_MODE")))
        return WandbRun()

    mlflow = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("mlflow.uri", uri)),
        set_experiment=lambda name: calls.append(("mlflow.experiment", name)),
        start_run=lambda run_name: calls.append(("mlflow.start", run_name)),
        log_params=lambda params: calls.append(("mlflow.params", params)),
        log_metrics=lambda values, step: calls.append(("mlflow.log", step, values)),
        end_run=lambda: calls.append(("mlflow.end",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=wandb_init))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setattr(metrics_mod.importlib.util, "find_spec", lambda name: object())
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    sink = open_metrics(run, ["wandb", "mlflow"], enabled=True, config={"train": {"lr": 1e-3}})
    sink.write(ROWS[0])
    sink.close()
    init = next(c for c in calls if c[0] == "wandb.init")
    assert init[2] == "offline" and init[1]["dir"] == str(run) and init[1]["config"] == {"train": {"lr": 1e-3}}
    assert ("wandb.log", 1, scalars(ROWS[0])) in calls
    assert ("mlflow.uri", (run / "mlruns").resolve().as_uri()) in calls
    assert ("mlflow.params", {"train.lr": "0.001"}) in calls
    assert (
        "mlflow.log",
        1,
        {"train_loss": 2.5, "train_lr": 1e-3, "train_tokens_per_s": 100.0, "train_epoch": 0.5},
    ) in calls
    assert calls[-2:] == [("wandb.finish",), ("mlflow.end",)]


def test_quiet_progress_prints_plain_lines(capsys):
    progress = Progress("train", total=20, enabled=True, quiet=True)
    for step in range(1, 21):
        progress.update(step, tokens=512, loss=1.0 / step, lr=1e-4)
    progress.close()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train 20/20  loss 0.0500  lr 1.00e-04  tokens/s ")
    assert "eta 00:00" in lines[-1] and "\r" not in captured.err


def test_progress_off_rank_zero_is_silent(capsys):
    progress = Progress("probe", total=3, enabled=False, quiet=True)
    for step in range(1, 4):
        progress.update(step, tokens=10)
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
