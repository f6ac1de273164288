"""The one door to DeepSpeed and torch.distributed: init, zero.Init, probe session, engine, gather, reduce.

Everything here is a no-op or a plain local path when there is one process and ZeRO-3 is off, so the
pure core (probe math, planning, LoRA config, data) never needs to know about ranks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import torch
import torch.nn as nn

from .config import ConfigError, RunConfig
from .io import write_json_atomic
from .launchers.deepspeed import free_port

_RANK = int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only."""
    if _RANK == 0:
        print(*args, **kwargs, flush=True)


def write_json0(path: str | Path, blob: Any) -> None:
    """Write a JSON artefact atomically from global rank 0 only (every rank holds the same `blob`)."""
    if _RANK == 0:
        write_json_atomic(path, blob)


# per-module state that ZeRO-3's hook registration keeps in module.__dict__ (DeepSpeed
# runtime/zero/parameter_offload.py, _register_deepspeed_module: `if "pre_bwd_fn" not in module.__dict__`)
_ZERO3_BACKWARD_HOOK_STATE = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt")


def _forget_backward_hooks(model: nn.Module) -> None:
    """Drop the backward-hook functions a destroyed ZeRO-3 engine left on `model`'s modules.

    DeepSpeed builds each module's pre-/post-backward autograd functions once and reuses them when a later
    engine hooks the same module; engine.destroy() removes the hooks but keeps those functions, which stay
    bound to the destroyed engine's parameter coordinator. The training engine would then fetch and release
    the frozen weights in backward through the probe's coordinator while its own sees no backward at all, so
    its checkpoint-recompute bookkeeping (frozen weights a recompute gathers are held until the module in
    backward finishes) finds no module in backward, releases them, and torch.utils.checkpoint refuses the
    recomputed (empty) weights."""
    for module in model.modules():
        for name in _ZERO3_BACKWARD_HOOK_STATE:
            module.__dict__.pop(name, None)


def peak_host_rss_gib() -> float:
    """This process's peak resident host memory so far, in GiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


def _ensure_single_process_env() -> None:
    """Launched without a launcher: a world of one on loopback, so DeepSpeed's init finds what it needs."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    """Replace "auto" leaves by values[dotted path] (HF Trainer's convention for DeepSpeed JSONs)."""
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node == "auto":
        if path not in values:
            raise ConfigError(f"deepspeed config: {path} is 'auto' but aletheia_ds does not fill it; give a value")
        return values[path]
    return node


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: RunConfig, world_size: int, dtype: torch.dtype) -> dict:
    path = Path(cfg.deepspeed.config)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"deepspeed.config: cannot read {str(path)!r} ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.config: {str(path)!r} must hold a JSON object")
    raw = _merge(raw, cfg.deepspeed.overrides)
    t = cfg.train
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        # sequence parallelism: each rank runs a slice of each of its group's batches, sp per batch it was given
        "gradient_accumulation_steps": t.grad_accum * t.sequence_parallel_size,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        "bf16.enabled": dtype == torch.bfloat16,
        "fp16.enabled": dtype == torch.float16,
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
    }
    ds = _fill_auto(raw, values)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        ds.setdefault(key, values[key])
    ds.setdefault("bf16", {"enabled": values["bf16.enabled"]})
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    if "scheduler" in ds:
        raise ConfigError(
            f"deepspeed.config: {str(path)!r} has a 'scheduler' section; remove it and set "
            "train.lr_scheduler / train.warmup_steps instead"
        )
    return ds


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ds_config: dict = field(default_factory=dict)
    _hf_ds_config: Any = None  # must stay alive while the model is built and used under ZeRO-3
    owns_group: bool = False  # this job made the process group (not Ray Train): it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed or self.world_size == 1:
            return tensor
        # gloo reduces on CPU; nccl on the rank's GPU
        work = tensor.to(self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(work)
        return work.to(tensor.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gib(self) -> Optional[list[float]]:
        """Every rank's peak allocated GPU memory since the last reset, in GiB (None on CPU); collective."""
        if self.device.type != "cuda":
            return None
        return self.all_gather_object(round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3))

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            torch.distributed.barrier()

    def raise_together(self, problem: str) -> NoReturn:
        """Every rank holds the same verdict (a broadcast one): leave the process group together, then raise the
        one-line error. Exiting with the group alive can abort in its communication threads and turn the
        refusal's exit status into a crash's."""
        if self.distributed and self.owns_group:
            self.barrier()
            torch.distributed.destroy_process_group()
        raise ConfigError(problem)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value on every rank (e.g. the plan, so every rank attaches the same adapters)."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def model_init(self) -> Iterator[None]:
        """Under ZeRO-3 `from_pretrained`/`from_config` build each weight straight into its partition.

        transformers decides that from a live HfDeepSpeedConfig; creating it before the build (and
        keeping it alive) is what makes zero.Init work in transformers 5. A checkpoint is read one shard at a
        time (`zero3_load_shard_by_shard`).
        """
        if not self.zero3:
            yield
            return
        if self._hf_ds_config is None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        with zero3_load_shard_by_shard():
            yield

    @contextlib.contextmanager
    def probe_session(
        self,
        model: nn.Module,
        loss_of: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None,
        shard_loss: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None,
    ) -> Iterator[Callable[[dict], torch.Tensor]]:
        """Yields forward(batch) -> loss on the frozen model, with ZeRO-3 parameter fetching when needed;
        `loss_of(module, batch)` computes it (default: the model's own token loss); `shard_loss(module, shard)`
        computes it on a sequence-parallel shard as given (it places its own tensors).

        Under ZeRO-3 an optimizer-less DeepSpeed engine installs the fetch/release hooks; it is destroyed
        afterwards (its hooks removed) so that the training engine can be created once the adapters are
        attached: DeepSpeed fixes the trainable set at initialize.
        """
        engine = None
        if self.zero3:
            import deepspeed

            probe_config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
            engine, *_ = deepspeed.initialize(model=model, config=probe_config)
            module = engine.module  # call the module: the engine's own forward/backward expect an optimizer
        else:
            module = model

        def forward(batch: dict) -> torch.Tensor:
            if shard_loss is not None:
                return shard_loss(module, batch)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if loss_of is not None:
                return loss_of(module, batch)
            return module(**batch, use_cache=False).loss

        try:
            yield forward
        finally:
            if engine is not None:
                engine.empty_partition_cache()  # weights still gathered after the last backward
                engine.destroy()
                _forget_backward_hooks(model)

    # ------------------------------------------------------------ ZeRO-3 leaf modules (mixture of experts)
    def set_z3_leaf_modules(self, model: nn.Module, classes: list[type]) -> None:
        """ZeRO-3 fetches each instance of `classes` (the MoE blocks) whole, as one leaf; a no-op otherwise.

        Without it ZeRO-3 gathers parameters module by module as they run, so ranks whose tokens reach
        different experts (or a router whose choice differs) issue different all-gathers and wait on each
        other forever (DeepSpeed #4808, LLaMA-Factory #1998); PEFT's parameter adapters also read weights
        of modules that are never called, which only a leaf around them fetches.
        """
        if not self.zero3 or not classes:
            return
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list(classes))

    def _param_adapters_as_leaves(self, model: nn.Module) -> None:
        """PEFT's ParamWrapper forms W + BA from `lora_A.weight` without calling lora_A, and registers the
        parametrization before its base layer runs, so ZeRO-3's per-module fetch would see neither: each
        wrapper becomes a leaf, fetched whole when it is called."""
        try:
            from peft.tuners.lora.layer import ParamWrapper
        except ImportError:
            return
        if any(isinstance(m, ParamWrapper) for m in model.modules()):
            self.set_z3_leaf_modules(model, [ParamWrapper])

    def initialize(self, model: nn.Module, param_groups: list[dict], scheduler_fn: Callable, lr: float, mpu=None):
        """The training engine: only `param_groups` (the LoRA parameters) reach the optimizer; `mpu`: the
        sequence-parallel groups (gradients summed over a sequence group, averaged over the groups)."""
        import deepspeed

        if self.zero3:
            self._param_adapters_as_leaves(model)
        optimizer = None
        if "optimizer" not in self.ds_config:
            fused = self.device.type == "cuda"
            optimizer = (
                torch.optim.AdamW(param_groups, lr=lr, fused=fused) if fused else torch.optim.AdamW(param_groups, lr=lr)
            )
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=param_groups if optimizer is None else None,
            lr_scheduler=scheduler_fn,
            config=self.ds_config,
            mpu=mpu,
        )
        return engine, optimizer, scheduler

    def save_engine_state(self, engine, directory: Path) -> None:
        """DeepSpeed's own checkpoint of the trainable state into `directory`/ds (every rank writes its shards).

        The frozen base weights are left out: a resumed run rebuilds them from model.path.
        """
        engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_engine_state(self, engine, directory: Path) -> None:
        """LoRA weights, optimizer and scheduler state from `directory`/ds, unpickled with weights_only=True."""
        _load_weights_only(engine)
        try:
            # not strict: the checkpoint holds the trainable parameters only (exclude_frozen_parameters)
            path, _ = engine.load_checkpoint(
                str(directory),
                tag=ENGINE_TAG,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        except FileNotFoundError as err:
            raise ConfigError(f"train.resume: {directory} is incomplete ({err})") from None
        if path is None:
            raise ConfigError(f"train.resume: DeepSpeed found no engine state in {directory}/{ENGINE_TAG}")

    def gathered(self, params: list[torch.nn.Parameter]):
        """Full parameters inside the block on every rank; a no-op unless ZeRO-3 partitions them."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


ENGINE_TAG = "ds"  # a checkpoint's DeepSpeed files live in <checkpoint>/ds/


def weights_only_checkpoint_engine():
    """DeepSpeed's TorchCheckpointEngine, loading with torch.load(weights_only=True).

    DeepSpeed's own engine calls torch.load(weights_only=False), which runs whatever a pickle names.
    Its checkpoint files hold tensors, plain containers and three DeepSpeed types (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2 and ZeRO-3 checkpoints), so loading
    them with weights_only=True and those types allow-listed reads every genuine checkpoint and refuses
    anything else.
    """
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                lines = str(err).splitlines() or [type(err).__name__]
                detail = next((line for line in lines if "GLOBAL" in line), lines[0])
                detail = detail.split("WeightsUnpickler error:")[-1].strip()
                raise ConfigError(f"train.resume: refusing to unpickle {path}: {detail}") from None

    return WeightsOnlyCheckpointEngine


def _load_weights_only(engine) -> None:
    """Swap the engine's checkpoint loader for the weights-only one (other engines, e.g. Nebula, stay)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = weights_only_checkpoint_engine()(engine._config)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# Notices a user of aletheia_ds cannot act on: DeepSpeed calls collectives that torch deprecates (a notice on every
# step); PEFT reads, and the probe and execution.py call, transformers' gradient-checkpointing methods, which
# transformers 5.2x renames to activation_checkpointing_* (the old names are the ones older releases know)
LIBRARY_NOTICES = (
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated",
)


def quiet_library_notices() -> None:
    for message in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


@contextlib.contextmanager
def distributed(cfg: RunConfig, use_deepspeed: bool = True) -> Iterator[DistContext]:
    """Process-group set-up and tear-down around one job (gloo on CPU, nccl on GPU).

    A process group that already exists (Ray Train creates one per worker) is used as it is.
    """
    global _RANK
    _ensure_single_process_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    quiet_library_notices()
    if use_deepspeed:
        import deepspeed

        # on CPU DeepSpeed prints "deepspeed_shm_comm_op built successfully" here on every run; a failed build
        # still raises
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=backend)
    elif int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        _RANK, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        _RANK, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dtype = resolve_dtype(cfg.model.dtype, device)
    ds_config = build_ds_config(cfg, world_size, dtype) if use_deepspeed else {}
    ctx = DistContext(
        rank=_RANK,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        ds_config=ds_config,
        owns_group=owns_group,
    )
    yield ctx
    # not in `finally`: after a failure on one rank, a collective tear-down would wait on the others
    if ctx.distributed and owns_group:
        ctx.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def zero3_load_shard_by_shard() -> Iterator[None]:
    """`from_pretrained` under ZeRO-3 with rank 0 holding one shard of the checkpoint at a time.

    transformers (modeling_utils._load_pretrained_model) first reads every shard into one state dict (rank 0:
    tensors memory-mapped from the safetensors files; the other ranks: meta tensors of the same shapes), then
    copies it into the partitions module by module (integrations.deepspeed._load_state_dict_into_zero3_model:
    gather a module's partitions, copy on rank 0, re-partition). Every page rank 0 copies stays mapped until
    the whole load ends, so its resident memory grows to the checkpoint's size (file-backed pages: ru_maxrss
    counts them; aletheia_ds.host_memory tells them from anonymous memory). Here the first step reads only
    names and shapes, and the same transformers copy runs once per shard group (model.shard_groups), each
    group's tensors read just before and dropped, mapping and all, right after; a tied head the checkpoint
    stores only as the embedding is tied before the copy, not after (model.tie_before_copy). transformers has no hook
    between the two steps, hence the two module names replaced for the length of the build. Checkpoints
    other than safetensors load as transformers does.
    """
    import transformers.modeling_utils as loading

    from .model import shard_groups, tie_before_copy

    read, copy_in = loading.load_state_dict, loading._load_state_dict_into_zero3_model
    names_by_file: dict[str, list[str]] = {}
    read_options: dict[str, Any] = {}

    def read_names(checkpoint_file, map_location="cpu", weights_only=True, disable_mmap=None):
        checkpoint_file = str(checkpoint_file)
        if not checkpoint_file.endswith(".safetensors"):  # *.bin: transformers' own path (never mixed with these)
            return read(checkpoint_file, map_location, weights_only, disable_mmap)
        read_options.update(weights_only=weights_only, disable_mmap=disable_mmap)
        shapes = read(checkpoint_file, map_location="meta")  # the header only: names, shapes, dtypes
        names_by_file[checkpoint_file] = list(shapes)
        return shapes

    def copy_in_by_group(model, state_dict, load_config=None):
        if not names_by_file:
            return copy_in(model, state_dict, load_config)
        weight_map = {name: file for file, names in names_by_file.items() for name in names}
        where = "cpu" if torch.distributed.get_rank() == 0 else "meta"
        errors, missing = [], None
        tie_before_copy(model, weight_map)
        for group in shard_groups(model, weight_map):
            part = {}
            for file in group:
                part.update(read(file, map_location=where, **read_options))
            group_errors, group_missing = copy_in(model, part, load_config)
            del part  # the group's tensors, and with the last of them its files' mappings
            errors += group_errors
            missing = group_missing if missing is None else missing & group_missing  # missing from every group
        return errors, missing if missing is not None else set()

    loading.load_state_dict, loading._load_state_dict_into_zero3_model = read_names, copy_in_by_group
    try:
        yield
    finally:
        loading.load_state_dict, loading._load_state_dict_into_zero3_model = read, copy_in


def gathered_parameters(model: nn.Module) -> list[str]:
    """Names of ZeRO-3 partitioned parameters that are gathered whole right now (persistent ones aside):
    between passes there should be none."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [
        name
        for name, p in model.named_parameters()
        if hasattr(p, "ds_status")
        and p.ds_status != ZeroParamStatus.NOT_AVAILABLE
        and not getattr(p, "ds_persist", False)
    ]


def held_parameter_elements(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model).

    ZeRO-3 keeps a 1/world_size partition per rank in `ds_tensor` and the full size in `ds_numel`; a model
    built outside zero.Init holds every element until an engine partitions it.
    """
    held = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            held += p.numel()
            total += p.numel()
    return held, total
