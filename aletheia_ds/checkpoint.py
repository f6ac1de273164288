"""Resumable checkpoints: where a run finds the one it continues from, how it writes and restores one.

Every file is written atomically (aletheia_ds/io.py). Our own files are JSON and safetensors; the one pickle
format is DeepSpeed's engine checkpoint, which dist.py loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from .adapters.attach import INITIAL_FACTORS
from .adapters.export import export_adapter
from .config import ConfigError
from .dist import print0
from .io import (
    atomic_path,
    fsync_tree,
    load_safetensors,
    manifest_problem,
    replace_dir,
    save_safetensors_atomic,
    tree_manifest,
    write_json_atomic,
    write_text_atomic,
)
from .plan import Plan

# ---------------------------------------------------------------------------------------------------------
# Resumable checkpoints
#
#   <output_dir>/checkpoints/
#     latest                      the name of the newest complete checkpoint (replaced atomically)
#     step-00000004/
#       ds/                       DeepSpeed's engine checkpoint: LoRA weights, optimizer and scheduler state
#                                 (every rank writes its own ZeRO shards; frozen base weights excluded)
#       adapter/                  the PEFT adapter at this step (safetensors), also used to verify a load
#       initial_lora_factors.safetensors  lora.init=pissa/olora only: the starting factors B0, A0 (see restore)
#       rng/rank-00000.safetensors  python / numpy / torch RNG states of each rank
#       metrics.jsonl             the metrics rows up to this step
#       probe.json                the probe that made the plan (when the run probed)
#       state.json                step, plan, config, fingerprints, ..., size and sha256 of every other
#                                 file (verified on resume); written last
#     .tmp-step-00000006/         a checkpoint being written; never read, removed at the next save
#
# All ranks write into the temporary directory; after a barrier rank 0 renames it into place and then
# replaces `latest`. A kill at any point leaves `latest` naming a complete checkpoint.
# ---------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1
LATEST = "latest"
INITIAL_FACTORS_FILE = "initial_lora_factors.safetensors"

# knobs that may change between a run and its resumption: they do not change the math of training
# (train.compile does: fused kernels round differently)
RESUME_MAY_CHANGE = {
    "train.output_dir",
    "train.resume",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.nan_policy",
    "train.max_nan_skips",
    "train.gradient_checkpointing",
    "probe.gradient_checkpointing",
    "train.stop_grace_s",
    "train.frozen_prefix",
    "train.prefix_cache",
    "train.eval_every",
    "train.report_to",
    "train.quiet",
    "ray",  # where and how the job runs; ray.num_workers is the world size, checked on its own
}
# paths: compared by what they hold (model, data and plan fingerprints, the effective DeepSpeed config)
RESUME_BY_CONTENT = {
    "model.path",
    "model.tokenizer",
    "data.train",
    "data.eval",
    "probe.report",
    "plan.plan",
    "plan.cost",
    "deepspeed.config",
    "deepspeed.overrides",
}
# DeepSpeed keys that only tune speed or logging
DS_PERFORMANCE_KEYS = {
    "steps_per_print",
    "wall_clock_breakdown",
    "flops_profiler",
    "comms_logger",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "memory_breakdown",
    "dump_state",
    "zero_optimization.overlap_comm",
    "zero_optimization.contiguous_gradients",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.stage3_max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    "zero_optimization.sub_group_size",
}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _differences(saved: dict, current: dict, ignore) -> list[str]:
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(saved_flat) | set(current_flat) if not ignore(k))
    missing = object()
    out = []
    for key in keys:
        then, now = saved_flat.get(key, missing), current_flat.get(key, missing)
        if then != now:
            show = lambda v: "unset" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: {show(then)} in the checkpoint, {show(now)} now")
    return out


def config_differences(saved_config: dict, config: dict) -> list[str]:
    """Knobs that change the math of training and differ between a checkpoint's run and this one."""
    skip = RESUME_MAY_CHANGE | RESUME_BY_CONTENT
    return _differences(saved_config, config, lambda k: any(k == s or k.startswith(s + ".") for s in skip))


def deepspeed_differences(saved_ds: dict, ds_config: dict) -> list[str]:
    return [
        f"deepspeed {d}"
        for d in _differences(
            saved_ds, ds_config, lambda k: any(k == s or k.startswith(s + ".") for s in DS_PERFORMANCE_KEYS)
        )
    ]


@dataclass
class Checkpoint:
    """A complete checkpoint on disk and its state.json."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def plan(self) -> Plan:
        return Plan.from_json(self.state["plan"], f"{self.path}/state.json (plan)")

    @classmethod
    def read(cls, path: Path) -> "Checkpoint":
        state_path = path / "state.json"
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no state.json)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"train.resume: cannot read {state_path} ({err})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"train.resume: {state_path} is not an aletheia_ds checkpoint of format {CHECKPOINT_FORMAT}"
            )
        for needed in ("step", "total_steps", "world_size", "config", "deepspeed", "plan", "fingerprints"):
            if needed not in state:
                raise ConfigError(f"train.resume: {state_path} lacks {needed!r}")
        return cls(path, state)

    def check_compatible(self, config: dict, world_size: int, ds_config: dict) -> None:
        """One ConfigError naming what differs, before anything heavy is loaded."""
        saved_world = int(self.state["world_size"])
        if saved_world != world_size:
            # The global batch is micro_batch_size x grad_accum x world_size and ZeRO partitions the
            # optimizer state by rank: another world size is another run, not a resumption. (DeepSpeed's
            # universal checkpoint, ds_to_universal.py, can re-shard for a deliberate change of topology.)
            raise ConfigError(
                f"train.resume: {self.path} was written by {saved_world} ranks, this run has "
                f"{world_size}; resume on {saved_world} ranks (the world size sets the global "
                "batch and the ZeRO partitioning)"
            )
        plan_file = config.get("plan", {}).get("plan")
        if plan_file:
            given, saved = Plan.load(plan_file), self.plan()
            if (given.layers, given.modules, given.experts) != (saved.layers, saved.modules, saved.experts):
                raise ConfigError(
                    f"plan.plan: {plan_file} adapts layers {given.layers} ({len(given.modules)} "
                    f"modules), the checkpoint {self.path} layers {saved.layers} "
                    f"({len(saved.modules)} modules); resume with the checkpoint's plan"
                )
        problems = config_differences(self.state["config"], config) + deepspeed_differences(
            self.state["deepspeed"], ds_config
        )
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ConfigError(
                f"train.resume: {self.path} was made with different settings: "
                f"{'; '.join(problems[:3])}{more}; resume with the checkpoint's settings or "
                "start a new train.output_dir"
            )

    def check_fingerprints(self, fingerprints: dict) -> None:
        saved = self.state["fingerprints"]
        model_then, model_now = saved.get("model", {}), fingerprints["model"]
        if model_then != model_now:
            detail = _differences(model_then.get("config", {}), model_now.get("config", {}), lambda k: False)[:2]
            if model_then.get("weight_files") != model_now.get("weight_files"):
                detail.append(
                    f"weight files {model_then.get('weight_files')} in the checkpoint, "
                    f"{model_now.get('weight_files')} now"
                )
            raise ConfigError(
                f"train.resume: {self.path} was made with a different model.path ("
                f"{'; '.join(detail) or 'config differs'})"
            )
        if saved.get("data") != fingerprints["data"]:
            raise ConfigError(
                f"train.resume: {self.path} was made with different data: {saved.get('train_rows')} train / "
                f"{saved.get('eval_rows')} held-out rows then, {fingerprints['train_rows']} / "
                f"{fingerprints['eval_rows']} now, or different tokens (data.train, data.eval or the "
                "tokenizer changed); resume with the same data"
            )


def checkpoint_candidates(resume: str, output_dir: Path) -> list[Path]:
    """train.resume -> the checkpoints to try, newest first: the one `latest` names, then the older complete
    ones of that directory (fallbacks should it be damaged); one path for an explicit step-N; [] for `auto`
    when the run has none yet."""

    def from_root(root: Path) -> Optional[list[Path]]:
        latest = root / LATEST
        if not latest.is_file():
            return None
        name = latest.read_text(encoding="utf-8").strip()
        if not name or "/" in name or not (root / name).is_dir():
            raise ConfigError(f"train.resume: {latest} names {name!r}, which is not a checkpoint there")
        older = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name < name), reverse=True)
        return [root / name, *older]

    if resume == "auto":
        return from_root(output_dir / "checkpoints") or []
    path = Path(resume)
    if (path / "state.json").is_file():
        return [path]
    for root in (path, path / "checkpoints"):
        found = from_root(root)
        if found is not None:
            return found
    raise ConfigError(
        f"train.resume: {resume!r} is neither a checkpoint (step-N directory with state.json), "
        "a checkpoints/ directory with a 'latest' file, nor a run directory holding one"
    )


def resolve_checkpoint(resume: str, output_dir: Path) -> Optional[Path]:
    """train.resume -> the checkpoint directory it names; None for `auto` when the run has none yet."""
    candidates = checkpoint_candidates(resume, output_dir)
    return candidates[0] if candidates else None


def first_intact(candidates: list[Path]) -> Checkpoint:
    """The first of `candidates` whose files all have the sizes and checksums its state.json recorded; says
    which ones were skipped and why. One ConfigError when none is intact."""
    damaged = []
    for path in candidates:
        try:
            checkpoint = Checkpoint.read(path)
            problem = manifest_problem(path, checkpoint.state.get("files", {}))
        except ConfigError as err:
            problem = str(err).removeprefix("train.resume: ")
        if problem is None:
            if damaged:
                print0(
                    f"resume: skipping damaged checkpoints ({'; '.join(damaged)}); continuing from {path.name}, "
                    "the newest intact one"
                )
            return checkpoint
        damaged.append(f"{path.name}: {problem}")
    where = candidates[0].parent if candidates else "?"
    raise ConfigError(
        f"train.resume: no intact checkpoint in {where} ({'; '.join(damaged)}); start a new "
        "train.output_dir, or run without --resume"
    )


def find_resume(ctx, cfg) -> Optional[Checkpoint]:
    """The checkpoint this run continues from (rank 0 reads, every rank gets the same), checked against
    this run's config, world size and DeepSpeed config; None for a fresh run.

    A fresh run refuses an output_dir that already holds checkpoints: they are the expensive part of an
    earlier run, and its next save would mix the two runs' checkpoints.
    """
    found, problem = None, None
    if ctx.is_main:
        root = Path(cfg.train.output_dir) / "checkpoints"
        try:
            if cfg.train.resume:
                candidates = checkpoint_candidates(cfg.train.resume, Path(cfg.train.output_dir))
                found = first_intact(candidates) if candidates else None
            elif (root / LATEST).is_file():
                problem = (
                    f"train.output_dir: {root} holds checkpoints of an earlier run (latest: "
                    f"{(root / LATEST).read_text(encoding='utf-8').strip()}); continue it with --resume "
                    "auto, or remove that directory, or choose another train.output_dir"
                )
        except ConfigError as err:
            problem = str(err)
    # the verdict travels with the checkpoint so that every rank raises together instead of waiting
    found, problem = ctx.broadcast_object((found, problem))
    if problem:
        ctx.raise_together(problem)
    if found is not None:
        found.check_compatible(cfg.model_dump(), ctx.world_size, ctx.ds_config)
    elif cfg.train.resume:
        print0(f"resume: no checkpoint in {Path(cfg.train.output_dir) / 'checkpoints'} yet; starting fresh")
    return found


# ---------------------------------------------------------------- RNG states (safetensors + JSON metadata)
def save_rng(path: Path) -> None:
    import random

    import numpy as np
    from safetensors.torch import save_file

    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    metadata = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)]),
    }
    with atomic_path(path) as tmp:  # the umask's mode, not save_file's 0600
        save_file(tensors, str(tmp), metadata=metadata)


def load_rng(path: Path) -> None:
    import random

    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# ---------------------------------------------------------------- save / restore
def _prune(root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    ctx, engine, peft_model: nn.Module, output_dir: Path, step: int, state: dict, keep_last: Optional[int]
) -> Path:
    """Write a checkpoint of `step` atomically (every rank takes part); returns its final path. Older ones
    beyond `keep_last` are deleted; None keeps them all (Ray Train prunes the ones it lists)."""
    root = Path(output_dir) / "checkpoints"
    final = root / step_name(step)
    tmp = root / f".tmp-{final.name}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    ctx.barrier()
    ctx.save_engine_state(engine, tmp)
    export_adapter(ctx, peft_model, tmp / "adapter")
    initial = getattr(peft_model, INITIAL_FACTORS, None)
    if initial is not None and ctx.is_main:
        save_safetensors_atomic(tmp / INITIAL_FACTORS_FILE, initial)
    save_rng(tmp / "rng" / f"rank-{ctx.rank:05d}.safetensors")
    ctx.barrier()  # every rank's files are in tmp
    if ctx.is_main:
        for artefact in ("metrics.jsonl", "probe.json"):
            if (Path(output_dir) / artefact).is_file():
                shutil.copyfile(Path(output_dir) / artefact, tmp / artefact)
        # sizes and checksums of every other file, checked on resume: a truncated shard or RNG file is
        # found before DeepSpeed or safetensors trip over it, and the run falls back to an older checkpoint
        write_json_atomic(
            tmp / "state.json", {"format": CHECKPOINT_FORMAT, "step": step, **state, "files": tree_manifest(tmp)}
        )
        fsync_tree(tmp)
        replace_dir(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        fsync_tree(root, recursive=False)  # the two renames above
        if keep_last:
            _prune(root, keep_last, keep=final.name)
    ctx.barrier()
    return final


def _adapter_difference(saved_dir: Path, fresh_dir: Path) -> Optional[str]:
    """None when every safetensors file of two exported adapters holds the same tensors, bit for bit."""
    names = sorted(f.name for f in saved_dir.glob("*.safetensors"))
    if not names or names != sorted(f.name for f in fresh_dir.glob("*.safetensors")):
        return f"adapter files {names} saved, {sorted(f.name for f in fresh_dir.glob('*.safetensors'))} now"
    for name in names:
        saved, fresh = load_safetensors(saved_dir / name), load_safetensors(fresh_dir / name)
        if saved.keys() != fresh.keys():
            return f"{name}: tensor names differ ({sorted(set(saved) ^ set(fresh))[:2]})"
        bad = [k for k in saved if not torch.equal(saved[k], fresh[k])]
        if bad:
            return f"{name}: {len(bad)} LoRA tensors differ (first: {bad[0]})"
    return None


def restore_checkpoint(ctx, engine, peft_model: nn.Module, checkpoint: Checkpoint, output_dir: Path) -> None:
    """Engine state, then a check that it matches the checkpoint's adapter bit for bit, then RNG and metrics.

    The check exports the loaded weights the way a checkpoint does (the one exporter, so PEFT's and the
    per-expert files are covered alike) and compares them with the checkpoint's adapter/.
    """
    _check_initial_factors(ctx, peft_model, checkpoint)
    ctx.load_engine_state(engine, checkpoint.path)
    scratch = Path(output_dir) / ".resume-check-adapter"
    export_adapter(ctx, peft_model, scratch)
    problem = None
    if ctx.is_main:
        try:
            problem = _adapter_difference(checkpoint.path / "adapter", scratch)
        except Exception as err:  # a missing or damaged file: every rank must hear of it, not wait
            problem = f"cannot read the adapter ({type(err).__name__}: {err})"
        shutil.rmtree(scratch, ignore_errors=True)
    problem = ctx.broadcast_object(problem)
    if problem:
        raise ConfigError(f"train.resume: {checkpoint.path}: the DeepSpeed state and the adapter disagree: {problem}")
    rng = checkpoint.path / "rng" / f"rank-{ctx.rank:05d}.safetensors"
    if not rng.is_file():
        raise ConfigError(f"train.resume: {checkpoint.path} has no RNG state for rank {ctx.rank}")
    load_rng(rng)
    if ctx.is_main:
        _restore_metrics(checkpoint, Path(output_dir) / "metrics.jsonl")
        if not (Path(output_dir) / "probe.json").is_file() and (checkpoint.path / "probe.json").is_file():
            shutil.copyfile(checkpoint.path / "probe.json", Path(output_dir) / "probe.json")


def _check_initial_factors(ctx, peft_model: nn.Module, checkpoint: Checkpoint) -> None:
    """lora.init=pissa/olora: the run trains on the rewritten base W - s B0 A0, which no checkpoint holds (it is as
    large as the model). The resumed run rebuilds it by attaching again, from the same base (the fingerprint check)
    with the same seed; that is exact only when B0, A0 come out bit for bit as they did, which a different device,
    BLAS or PEFT version need not give. Refused then: the same trained factors on another base are another model."""
    initial = getattr(peft_model, INITIAL_FACTORS, None)
    saved_path = checkpoint.path / INITIAL_FACTORS_FILE
    if initial is None or not saved_path.is_file():  # a plain init, or a checkpoint from before this file
        return
    problem = None
    if ctx.is_main:
        saved = load_safetensors(saved_path)
        differ = sorted(k for k in set(saved) | set(initial) if k not in saved or k not in initial)
        differ += sorted(k for k in set(saved) & set(initial) if not torch.equal(saved[k], initial[k]))
        if differ:
            init = checkpoint.state["config"]["lora"]["init"]
            problem = (
                f"train.resume: {checkpoint.path}: lora.init={init} rewrote the base weights to W - s B0 A0 from "
                f"starting factors that this run recomputes differently ({len(differ)} tensors, first: {differ[0]}), "
                "so the base it trained on cannot be rebuilt exactly; resume on the device type and library versions "
                "that wrote the checkpoint, or start a new train.output_dir"
            )
    problem = ctx.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)


def _restore_metrics(checkpoint: Checkpoint, metrics_path: Path) -> None:
    """metrics.jsonl becomes the checkpoint's rows: rows the killed run wrote after this step are dropped
    (the resumed run writes them again, with the same losses)."""
    saved = checkpoint.path / "metrics.jsonl"
    rows = saved.read_text(encoding="utf-8").splitlines(keepends=True) if saved.is_file() else []
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(metrics_path, "".join(rows))
