"""Where a run's metrics go: metrics.jsonl always, plus the backends of `train.report_to`, on rank 0 only.

    check_backends(cfg.train.report_to)                 # every rank, before anything is written
    sink = open_metrics(out_dir, cfg.train, enabled=ctx.is_main, append=resumed, config=cfg.model_dump())
    sink.write({"step": 3, "loss": 2.1, "lr": 1e-4, "tokens_per_s": 5120.0})   # one row to every backend
    sink.close()

Off rank 0 `open_metrics` returns the no-op `MetricsSink`, so the loop never asks which rank it is on.
Rows are metrics.jsonl rows: `step` plus numbers (train rows: loss, lr, tokens_per_s, grad_norm,
step_seconds, epoch; evaluation rows: eval_loss). Backends get the numeric fields as `train/<name>` or
`eval/<name>` scalars at `step`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .io import append_line

# backend -> (module that must import, what to install)
BACKENDS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def check_backends(report_to: list[str]) -> None:
    """One line naming train.report_to when a backend asked for is not installed."""
    for name in report_to:
        module, install = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.report_to: {name} is not installed; {install}, or remove {name} from train.report_to"
            )


def scalars(row: dict) -> dict[str, float]:
    """A metrics row's numbers as backend scalar names (`train/loss`, `eval/loss`); null values are left out."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class MetricsSink:
    """The interface, and the sink of every rank but 0: does nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(MetricsSink):
    def __init__(self, path: Path, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # O_APPEND even for a fresh file: every row lands whole at the end, whoever else writes here
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC), 0o666)

    def write(self, row: dict) -> None:
        # unbuffered: a crash keeps every row written so far (checkpoints copy this file)
        append_line(self.fd, json.dumps(row))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class TensorBoardSink(MetricsSink):
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink(MetricsSink):
    def __init__(self, out_dir: Path, config: Optional[dict]):
        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless the user says so
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "aletheia-ds"),
            name=out_dir.name,
            dir=str(out_dir),
            config=config or {},
        )

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class MlflowSink(MetricsSink):
    def __init__(self, out_dir: Path, config: Optional[dict]):
        import mlflow

        # a local file store under the run directory unless the user points somewhere else
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "aletheia-ds"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=out_dir.name)
        if config:
            from .checkpoint import _flatten

            flat = _flatten(config)
            mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def write(self, row: dict) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars(row).items()}, step=int(row["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


class Sinks(MetricsSink):
    """Every row to each of several sinks."""

    def __init__(self, sinks: list[MetricsSink]):
        self.sinks = sinks

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_metrics(
    out_dir: Path, report_to: list[str], enabled: bool, append: bool = False, config: Optional[dict] = None
) -> MetricsSink:
    """metrics.jsonl + the asked-for backends on rank 0 (`enabled`); the no-op sink elsewhere."""
    if not enabled:
        return MetricsSink()
    check_backends(report_to)
    sinks: list[MetricsSink] = [JsonlSink(out_dir / "metrics.jsonl", append)]
    for name in report_to:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(out_dir / "tensorboard"))
        elif name == "wandb":
            sinks.append(WandbSink(out_dir, config))
        elif name == "mlflow":
            sinks.append(MlflowSink(out_dir, config))
    return Sinks(sinks)
