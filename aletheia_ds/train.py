"""One job: setup -> probe -> plan -> LoRA training -> adapter export, on one process or many.

cfg = load_config(argv)
with distributed(cfg) as ctx, lock_output_dir(ctx, cfg):  # one job per output_dir
    resume = find_resume(ctx, cfg)     # train.resume: the checkpoint to continue from, checked against cfg
    run = Run.setup(ctx, cfg)          # tokenizer, data, frozen base model (zero.Init under ZeRO-3)
    if resume:
        plan = run.resume_plan(resume) # the checkpoint's plan: no probe, no planning
    else:
        run.check_given_inputs()       # plan.plan, probe.report: this model's, before any compute
        report = run.probe()           # one forward + backward per probe batch, norms all-reduced
        plan = run.plan(report)        # rank 0 plans, every rank receives the same plan
    run.prepare_training(plan, resume) # adapters attached and verified, frozen prefix..., DeepSpeed engine
    for step in run.remaining_steps():
        run.train_step(step)           # micro-batches, non-finite guard, metrics, evaluation, checkpoints
        run.stop_if_asked(step)        # SIGTERM on any rank: every rank checkpoints this step, exit 75
    run.finish()                       # held-out loss after training, run results
    run.export()                       # PEFT adapter gathered from ZeRO-3 partitions, rank 0 writes eval.json
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import data as data_mod
from .adapters.attach import layer_update_norms
from .adapters.export import export_adapter
from .adapters.peft_config import plan_json
from .arch import Layout, describe
from .checkpoint import Checkpoint, find_resume, restore_checkpoint, save_checkpoint, step_name
from .config import (
    INTERRUPTED_EXIT,
    PREEMPTED_EXIT,
    ConfigError,
    RunConfig,
    Stopped,
    TrainingError,
    exit_code,
    load_config,
)
from .cost import CostModel, layer_activation_bytes, layers_without_recompute
from .dist import (
    DistContext,
    distributed,
    held_parameter_elements,
    peak_host_rss_gib,
    print0,
    resolve_dtype,
    write_json0,
)
from .evaluate import held_out_loss
from .execution import ExecutionOptions, FrozenPrefix, PrefixCache, PrefixCacheError, PreparedModel, base_model
from .host_memory import HostMemoryPeaks
from .io import OutputLock, save_safetensors_atomic, write_json_atomic
from .kernels import resolve_liger
from .metrics import check_backends, open_metrics
from .model import check_sequence_lengths, check_vocabulary, fingerprint_digest, load_model, model_type
from .model import fingerprint as model_fingerprint
from .objectives import Objective, reward_metrics, router_aux_loss_coef
from .plan import Plan, make_plan, pilot_plan
from .probe.report import ProbeReport
from .probe.run import run_probe
from .progress import Progress
from .run_report import RunResults, plot_experts, plot_probe
from .sequence_parallel import SequenceParallel, sp_setup, tile_mlps


class RunObserver:
    """Hooks that follow the job's progress besides metrics.jsonl: a cluster's tracker (launch/ray_train.py
    sends it to Ray Train through launchers/ray.py's RayObserver). This one does nothing.

    Every rank calls each method at the same points and the same number of times, so an implementation may
    synchronise the ranks (ray.train.report is a barrier).
    """

    # True when the tracker deletes old checkpoints itself (Ray Train's CheckpointConfig(num_to_keep)), so
    # that the run does not delete ones it still lists
    keeps_checkpoints = False

    def started(self, ctx: DistContext, model: nn.Module) -> None:
        """The frozen base model is built (partitioned under ZeRO-3); no DeepSpeed engine exists yet."""

    def planned(self, report: Optional[ProbeReport], plan: Plan) -> None:
        """`plan` is the one this rank trains: made from `report` (probe.json, plan.json written), or taken from
        the checkpoint the run resumes (report None)."""

    def step(self, row: dict, checkpoint: Optional[Path] = None) -> None:
        """A metrics.jsonl row (every train.log_every steps, the last step, a skipped step), and the
        checkpoint written after this step if any (complete, on every rank's view of output_dir)."""

    def finished(self, results: dict) -> None:
        """The adapter and eval.json are written."""

    def watch_stop(self, stop_signal: StopSignal) -> None:
        """Training starts: from here a stop request ends the job after the current step, with a checkpoint.
        `stop_signal` already takes SIGTERM when the job runs in the process's main thread; a launcher that runs
        it elsewhere (Ray Train: a worker thread, where Python takes no signals) or that is told to stop through
        its own channel (`ray job stop`) calls `stop_signal.request()` itself."""


class NonFiniteGuard:
    """train.nan_policy: a step whose loss or gradient norm is not finite is never applied.

    DeepSpeed's ZeRO optimizers skip an update whose global gradient norm is not finite (the norm is
    all-reduced, so every rank skips together) and leave the LR scheduler where it was, as for an fp16
    overflow. `stop` then ends the run naming the step; `skip` moves on to the next step's data, up to
    train.max_nan_skips skipped steps in the whole run (resumptions included).
    """

    def __init__(self, policy: str, max_skips: int, skips: int = 0, loss_scaling: bool = False):
        self.policy, self.max_skips, self.skips = policy, max_skips, skips
        self.loss_scaling = loss_scaling  # fp16: DeepSpeed's loss scaler owns gradient overflow

    def check(
        self, step: int, loss: float, grad_norm: Optional[float], applied: bool, last_checkpoint: Optional[Path]
    ) -> bool:
        """True when the step was skipped; raises TrainingError when the run must stop."""
        grad_bad = grad_norm is not None and not math.isfinite(grad_norm) and not self.loss_scaling
        if math.isfinite(loss) and not grad_bad:
            return False
        what = (
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
            f"(loss {loss}, grad norm {grad_norm})"
        )
        resume = (
            f"last good checkpoint: {last_checkpoint} (continue with --resume auto)"
            if last_checkpoint
            else "no checkpoint written yet"
        )
        if applied:
            raise TrainingError(
                f"train: {what} and the optimizer applied the update (it does not skip "
                f"non-finite steps; use a ZeRO stage >= 1); {resume}"
            )
        if self.policy == "stop":
            raise TrainingError(
                f"train: {what}; the update was not applied; {resume}; lower train.lr or check "
                "this step's data, or set train.nan_policy=skip"
            )
        if self.skips >= self.max_skips:
            raise TrainingError(
                f"train: {what}; {self.skips} steps skipped already, train.max_nan_skips={self.max_skips}; {resume}"
            )
        self.skips += 1
        print0(f"train: {what}; update skipped ({self.skips}/{self.max_skips} allowed by train.max_nan_skips)")
        return True


class StopSignal:
    """SIGTERM, what SLURM, Kubernetes and Ray send a job before they kill it, only raises a flag: the step
    under way ends normally and Run.stop_if_asked turns the flag into a checkpoint and a clean exit."""

    def __init__(self):
        self.received_at: Optional[float] = None  # time.monotonic() of the first SIGTERM

    def install(self) -> None:
        # Python delivers signals to the main thread only; for a job run in a worker thread (Ray Train) the
        # launcher relays them (RunObserver.watch_stop)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._received)

    def _received(self, signum, frame) -> None:
        self.request()

    def request(self) -> None:
        """Stop after the current step, as on SIGTERM (a later request keeps the first one's time)."""
        if self.received_at is None:
            self.received_at = time.monotonic()

    def seconds_since(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at


@contextlib.contextmanager
def lock_output_dir(ctx: DistContext, cfg: RunConfig):
    """Rank 0 holds train.output_dir's lock for the job's life; a second job there is refused in one line (on
    every rank together), and so is an output_dir that cannot be written, before anything is loaded."""
    lock, problem = None, None
    if ctx.is_main:
        try:
            lock = OutputLock(cfg.train.output_dir).acquire()
        except ConfigError as err:
            problem = str(err)
    problem = ctx.broadcast_object(problem)
    if problem:
        ctx.raise_together(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def param_groups(model: nn.Module, weight_decay: float, layers_path: Optional[str] = None) -> list[dict]:
    """Only trainable (LoRA) parameters; biases and 1-D tensors get no decay. Empty groups are dropped.
    `layers_path`: one pair of groups per decoder layer (key "layer"), so that a layer's learning rate can be set
    to 0 on its own (the pilot rule freezes the layers below its cut that way: AdamW's moments would otherwise keep
    moving parameters that get no more gradient)."""
    pattern = re.compile(re.escape(layers_path) + r"\.(\d+)\.") if layers_path else None
    grouped: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        found = pattern.search(name) if pattern else None
        layer = int(found.group(1)) if found else -1
        grouped.setdefault((layer, p.ndim < 2 or name.endswith(".bias")), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay, **({"layer": layer} if pattern else {})}
        for (layer, no_decay), params in sorted(grouped.items())
    ]


def scheduler_factory(cfg: RunConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = (
        cfg.train.warmup_steps
        if cfg.train.warmup_steps is not None
        else int(math.ceil(cfg.train.warmup_ratio * total_steps))
    )
    return lambda optimizer: get_scheduler(
        cfg.train.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


@dataclass
class TrainingState:
    """What the step loop carries from one step to the next (built by Run.prepare_training)."""

    plan: Plan
    rows: list  # training examples, packed when data.packing
    schedule: data_mod.StepSchedule
    total_steps: int
    start_step: int  # 0, or the step of the checkpoint resumed from
    scheduler: Any
    guard: NonFiniteGuard
    metrics: Any
    progress: Progress
    loop_started: float  # time.perf_counter() when the first step began
    pilot_step: Optional[int] = None  # plan.rule=pilot: the step after which the cut is placed
    pilot: Optional[dict] = None  # once placed: {"step", "cut", "budget_cut", "layer_change"} (checkpointed)


@dataclass
class Run:
    ctx: DistContext
    cfg: RunConfig
    tokenizer: Any
    train_examples: list
    eval_examples: list
    model: nn.Module
    layout: Layout
    out: Path
    engine: Any = None
    execution: Optional[PreparedModel] = None
    training: Optional[TrainingState] = None
    results: RunResults = field(default_factory=RunResults)
    last_checkpoint: Optional[Path] = None
    last_save_seconds: float = 0.0
    steps_done: int = 0
    stop_signal: StopSignal = field(default_factory=StopSignal)
    _fingerprints: Optional[dict] = None
    report: Optional[ProbeReport] = None
    group_layers: list = field(default_factory=list)
    observer: RunObserver = field(default_factory=RunObserver)
    liger: bool = False  # train.liger as resolved for this model and device
    sp: Optional[SequenceParallel] = None  # train.sequence_parallel_size > 1
    router_aux_loss_coef: float = 0.0  # mixture-of-experts load-balancing loss weight (training steps)

    # ---------------------------------------------------------------- setup
    @classmethod
    def setup(cls, ctx: DistContext, cfg: RunConfig, observer: Optional[RunObserver] = None) -> "Run":
        torch.manual_seed(cfg.train.seed)
        out = Path(cfg.train.output_dir)
        check_sequence_lengths(
            cfg.model,
            {"data.seq_len": cfg.data.seq_len, **({"probe.seq_len": cfg.probe.seq_len} if cfg.probe.seq_len else {})},
        )
        tokenizer = data_mod.load_tokenizer(
            cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code, cfg.data.chat_template
        )
        check_vocabulary(cfg.model, tokenizer)
        liger = resolve_liger(
            cfg.train.liger, ctx.device.type, model_type(cfg.model), ctx.zero3
        )  # refused before any work
        log = print0
        load = data_mod.load_examples
        if cfg.data.cache_dir:  # tokenize once per node (or per job), memory-map on every rank
            from .data_cache import cached_examples

            tokenizes = ctx.rank == 0 if cfg.data.cache_shared else ctx.local_rank == 0
            load = lambda source, tok, seq_len, limit, log: cached_examples(  # noqa: E731
                source,
                tok,
                seq_len,
                cfg.data.cache_dir,
                cfg.data.num_proc,
                tokenizes,
                ctx.barrier,
                limit,
                cfg.data.packing,
                log,
            )
        sources = cfg.data.train_sources()
        # one source: max_examples lets the uncached path stop tokenizing early; a mixture is cut after mixing
        limit = cfg.data.max_examples if len(sources) == 1 else None
        examples = data_mod.mixture(
            [load(s.path, tokenizer, cfg.data.seq_len, limit, log) for s in sources],
            [s.weight for s in sources],
            cfg.train.seed,
            cfg.data.mix_until,
            [s.path for s in sources],
            log,
        )
        if cfg.data.max_examples:
            examples = examples[: cfg.data.max_examples]
        if cfg.data.eval:
            train_examples = examples
            eval_examples = load(cfg.data.eval, tokenizer, cfg.data.seq_len, None, log)
        else:
            train_examples, eval_examples = data_mod.split_eval(examples, cfg.data.eval_fraction)
        check_objective_data(cfg.train.objective, train_examples, eval_examples)
        dtype = resolve_dtype(cfg.model.dtype, ctx.device)
        started = time.perf_counter()
        with HostMemoryPeaks() as host:
            model = load_model(cfg.model, dtype, ctx.device, ctx.model_init, seed=cfg.train.seed, zero3=ctx.zero3)
        build_seconds = time.perf_counter() - started
        layout = describe(model, cfg.lora.target_modules)
        ctx.set_z3_leaf_modules(model, layout.moe_block_classes(model))  # MoE blocks: one ZeRO-3 fetch each
        print0(
            f"model: {cfg.model.path} ({layout.family}, {layout.num_layers} layers, "
            f"{sum(len(t) for t in layout.layer_targets)} target linears, {dtype}); "
            f"data: {len(train_examples)} train / {len(eval_examples)} held-out examples; "
            f"world size {ctx.world_size}, ZeRO stage {ctx.zero_stage}"
        )
        try:
            router_aux = router_aux_loss_coef(model.config, cfg.train.router_aux_loss_coef)
        except ValueError as err:
            raise ConfigError(f"train.router_aux_loss_coef: {err}") from None
        if router_aux:
            # SFT: the model adds its own weight x the load-balancing loss when asked for router logits
            base_model(model).router_aux_loss_coef = router_aux
            print0(
                f"router load-balancing loss: weight {router_aux:g} in training steps "
                f"({'train.router_aux_loss_coef' if cfg.train.router_aux_loss_coef is not None else 'the architecture'}"
                "'s; train.router_aux_loss_coef=0 turns it off)"
            )
        sp = sp_setup(ctx, cfg, model, layout, tokenizer.pad_token_id)
        observer = observer or RunObserver()
        observer.started(ctx, model)
        run = cls(
            ctx,
            cfg,
            tokenizer,
            train_examples,
            eval_examples,
            model,
            layout,
            out,
            observer=observer,
            liger=liger,
            sp=sp,
            router_aux_loss_coef=router_aux,
        )
        held, total = held_parameter_elements(model)
        run.results.seconds["build"] = build_seconds
        run.results.peak_memory_gib["build"] = ctx.peak_memory_gib()
        run.results.base_parameters_total = total
        run.results.base_parameters_held_by_rank = ctx.all_gather_object(held)
        run.results.peak_host_rss_gib_by_rank = ctx.all_gather_object(peak_host_rss_gib())
        run.results.host_anon_gib_by_rank = ctx.all_gather_object(host.summary("anon"))
        run.results.host_file_gib_by_rank = ctx.all_gather_object(host.summary("file"))
        return run

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def attn_implementation(self) -> Optional[str]:
        return getattr(getattr(self.model, "config", None), "_attn_implementation", None)

    @property
    def objective(self) -> Objective:
        return Objective.from_train(self.cfg.train)

    @property
    def prefix_cache(self) -> Optional[PrefixCache]:
        return self.execution.prefix_cache if self.execution is not None else None

    # ---------------------------------------------------------------- probe
    def check_given_inputs(self) -> None:
        """plan.plan and probe.report, when given, are checked against this model before the probe runs, so a
        refused one costs no compute and leaves nothing in output_dir (rank 0 reads them; every rank refuses)."""
        problem = None
        if self.ctx.is_main:
            try:
                if self.cfg.probe.report:
                    self._given_report()
                if self.cfg.plan.plan:
                    self._given_plan()
            except ConfigError as err:
                problem = str(err)
        problem = self.ctx.broadcast_object(problem)
        if problem:
            self.ctx.raise_together(problem)

    def _given_report(self) -> ProbeReport:
        path = self.cfg.probe.report
        return ProbeReport.load(path).check_fits(
            self.layout.to_json(),
            self.layout.num_layers,
            fingerprint_digest(model_fingerprint(self.cfg.model)),
            f"probe.report: {path}",
        )

    def _given_plan(self) -> Plan:
        return Plan.load(self.cfg.plan.plan).check_fits(self.layout, f"plan.plan: {self.cfg.plan.plan}")

    def probe(self, out_path: Optional[Path] = None) -> ProbeReport:
        cfg = self.cfg
        if cfg.probe.report:
            report = self._given_report()
            print0(f"probe: reusing {cfg.probe.report}")
        else:
            seq_len = cfg.probe.seq_len or cfg.data.seq_len
            rows = [data_mod.truncate(ex, seq_len) for ex in self.train_examples]
            rows = [ex for ex in rows if data_mod.has_loss_tokens(ex)]
            batches = data_mod.fixed_batches(rows, cfg.probe.batch_size, cfg.probe.batches, self.pad_id)
            if not batches:
                raise ConfigError(
                    "probe: no probe batches; data.train has no example with loss tokens "
                    f"within probe.seq_len={seq_len}"
                )
            checkpointing = cfg.probe.gradient_checkpointing
            if checkpointing is None:
                checkpointing = cfg.train.gradient_checkpointing
            self.ctx.reset_peak_memory()
            passes = len(data_mod.shard_indices(len(batches), self.ctx.rank, self.ctx.world_size))
            passes *= cfg.train.sequence_parallel_size
            # the batches are dealt over the ranks and the bar is rank 0's: it says whose batches it counts
            share = f", rank 0 of {self.ctx.world_size}" if self.ctx.world_size > 1 else ""
            progress = Progress(f"probe{share}", passes, self.ctx.is_main, cfg.train.quiet, unit="batch")
            # the gradient of the loss the run optimises: the plan is made for that task
            objective = self.objective
            sp = self.sp
            sp_loss = (lambda module, shard: sp.loss(module, module, shard)) if sp else None
            with self.ctx.probe_session(
                self.model, objective.start_loss if objective.preference else None, shard_loss=sp_loss
            ) as forward:
                report = run_probe(
                    self.model,
                    self.layout,
                    batches,
                    forward,
                    model_name=cfg.model.path,
                    rank=self.ctx.rank,
                    world_size=self.ctx.world_size,
                    all_reduce_sum=self.ctx.all_reduce_sum,
                    checkpointing=checkpointing,
                    sketch_dim=cfg.probe.sketch_dim,
                    on_batch=lambda tokens: progress.update(progress.done + 1, tokens),
                    shard=sp.shards if sp else None,
                    token_slices=sp.token_slices() if sp else None,
                )
            progress.close()
            report.validate()
            report.model_fingerprint = fingerprint_digest(model_fingerprint(self.cfg.model))
            self.results.seconds["probe"] = report.seconds
            self.results.peak_memory_gib["probe"] = self.ctx.peak_memory_gib()
            dealt = f" over {self.ctx.world_size} ranks ({passes} on rank 0)" if self.ctx.world_size > 1 else ""
            print0(
                f"probe: {len(batches)} batches{dealt}, {report.tokens} tokens, {report.seconds:.2f} s"
                + (f" (gradient of the {objective.name} loss)" if objective.preference else "")
            )
        write_json0(out_path or self.out / "probe.json", report.to_json())
        return report

    # ---------------------------------------------------------------- plan
    def plan(self, report: ProbeReport) -> Plan:
        cfg = self.cfg
        self.report = report  # plan.rule=pilot places its cut with it after the pilot steps
        plan = None
        if self.ctx.is_main:
            if cfg.plan.plan:
                plan = self._given_plan()
                print0(f"plan: reusing {cfg.plan.plan}")
            else:
                plan = make_plan(report, cfg.plan, self.cost_model(report))
            write_json_atomic(self.out / "plan.json", plan_json(plan))
            plot_probe(report, plan, self.out / "probe.png")
            plot_experts(report, self.out / "experts.png")
        plan = self.ctx.broadcast_object(plan)
        if plan.num_layers != self.layout.num_layers:
            raise ConfigError(f"plan: made for {plan.num_layers} layers, the model has {self.layout.num_layers}")
        predicted = predicted_speed_text(plan, self.ctx.device.type)
        experts = f" + {len(plan.experts)} experts in {len(plan.experts_by_layer())} MoE layers" if plan.experts else ""
        print0(
            f"plan ({plan.rule}): layers {plan.layers}; {len(plan.modules)} adapters{experts}; lowest adapted layer "
            f"{plan.lowest_adapted_layer}; captures {plan.score_captured:.1%} of the probe's gradient energy"
            f"{predicted}"
        )
        self.observer.planned(report, plan)
        return plan

    def cost_model(self, report: ProbeReport) -> CostModel:
        cfg = self.cfg
        if cfg.plan.cost:
            return CostModel.load(cfg.plan.cost).check_matches(report, cfg.plan.cost)
        return CostModel.analytic(report, checkpointing=cfg.train.gradient_checkpointing)

    def resume_plan(self, checkpoint: Checkpoint) -> Plan:
        """The checkpoint's plan as it was: the engine state it holds fits these adapters only."""
        checkpoint.check_fingerprints(self.fingerprints())
        plan = checkpoint.plan()
        if not (self.out / "plan.json").is_file():
            write_json0(self.out / "plan.json", plan_json(plan))
        print0(
            f"plan ({plan.rule}): the checkpoint's, layers {plan.layers}; {len(plan.modules)} adapters "
            "(no probe on resume)"
        )
        self.observer.planned(None, plan)
        return plan

    def fingerprints(self) -> dict:
        """What a checkpoint records to recognise this run's model and data on resume."""
        if self._fingerprints is None:
            self._fingerprints = {
                "model": model_fingerprint(self.cfg.model),
                "data": data_mod.fingerprint(self.train_examples + self.eval_examples),
                "train_rows": len(self.train_examples),
                "eval_rows": len(self.eval_examples),
            }
        return self._fingerprints

    # ---------------------------------------------------------------- train
    def _forward_loss(self, batch: dict, indices: Optional[list[int]] = None, training: bool = False):
        """(loss, PreferenceOutput or None) of a collated micro-batch under train.objective; a training step's
        loss includes the router load-balancing loss of mixture-of-experts models (Run.router_aux_loss_coef)."""
        if self.sp is not None:  # `batch` is this rank's slice: its share of the batch's mean token loss
            return self.sp.loss(self.engine, self.engine.module, batch), None
        if self.prefix_cache is not None:
            self.prefix_cache.begin(indices, batch["attention_mask"])  # None (evaluation): no fill, no replay
        batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
        forward = lambda inputs: self.engine(  # noqa: E731
            **data_mod.model_inputs(inputs, self.attn_implementation), use_cache=False
        )
        aux = self.router_aux_loss_coef if training else 0.0
        return self.execution.objective_loss(forward, batch, self.objective, aux)

    def evaluate(self) -> float:
        batches = data_mod.fixed_batches(
            self.eval_examples, self.cfg.train.micro_batch_size, self.cfg.data.eval_batches, self.pad_id
        )
        if not batches:
            return float("nan")
        self.engine.eval()
        if self.sp is not None:
            loss = self.sp.held_out_loss(
                self.engine, batches, self.ctx.rank, self.ctx.world_size, self.ctx.all_reduce_sum
            )
            self.engine.train()
            return loss
        loss = held_out_loss(
            lambda batch: self._forward_loss(batch)[0],
            batches,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            all_reduce_sum=self.ctx.all_reduce_sum,
            # a preference loss is a mean over pairs (half the collated rows)
            **({"weight": lambda batch: batch["input_ids"].shape[0] // 2} if self.objective.preference else {}),
        )
        self.engine.train()
        return loss

    def _execution_options(self, plan: Plan) -> ExecutionOptions:
        """The train.* execution knobs for this plan; what DeepSpeed cannot run is refused here."""
        train = self.cfg.train
        if train.compile and self.ctx.zero3:
            raise ConfigError(
                "train.compile: not supported under ZeRO-3 (its parameter hooks break the "
                "compiled graphs); use ds_configs/zero2.json or set train.compile=false"
            )
        prefix_cache = train.prefix_cache
        if self.cfg.data.packing:
            data_mod.check_packing(self.attn_implementation)
            if prefix_cache and data_mod.varlen_attention(self.attn_implementation):
                raise ConfigError(
                    "train.prefix_cache: not supported with data.packing under flash attention (its "
                    "packed rows are flattened into one); set one of them false"
                )
        if prefix_cache and plan.lowest_adapted_layer == 0:
            print0("prefix cache: off, the plan adapts layer 0 (there is no frozen prefix)")
            prefix_cache = False
        elif prefix_cache and self.router_aux_loss_coef:
            raise ConfigError(
                "train.prefix_cache: replaying the frozen prefix's output skips its layers' routers, which the "
                "router load-balancing loss needs; set train.router_aux_loss_coef=0 or train.prefix_cache=false"
            )
        elif prefix_cache and self.ctx.zero3:
            raise ConfigError(
                "train.prefix_cache: not supported under ZeRO-3 (ranks would skip different "
                "layers while gathering parameters collectively); use ZeRO stage 0-2"
            )
        print0(f"liger kernels: {'on' if self.liger else 'off'} (train.liger={str(train.liger).lower()})")
        shared_prefix = self.objective.uses_reference
        if shared_prefix and self.router_aux_loss_coef and plan.lowest_adapted_layer > 0:
            # the load-balancing loss is one function of every layer's router logits: the policy pass must run
            # the prefix's routers too
            print0("shared prefix: off, the router load-balancing loss needs the policy pass's prefix routers")
            shared_prefix = False
        no_recompute = train.no_recompute_layers if isinstance(train.no_recompute_layers, int) else 0
        if train.gradient_checkpointing and no_recompute:
            print0(f"recompute: the top {no_recompute} adapted layers keep their activations")
        # adapter dtype left to PEFT: the DeepSpeed engine casts the trainable parameters itself; checkpointing
        # set again here because the probe switched its own off
        return ExecutionOptions(
            lora=self.cfg.lora,
            checkpointing=train.gradient_checkpointing,
            frozen_prefix=train.frozen_prefix,
            prefix_cache=prefix_cache,
            shared_prefix=shared_prefix,
            compile_layers=train.compile,
            no_recompute_layers=no_recompute,
            liger=self.liger,
            partitioned=self.ctx.zero3,
        )

    def choose_no_recompute(self) -> None:
        """train.no_recompute_layers=auto, after the first step (every adapted layer checkpointed): the top layers
        that the GPU memory left below the highest rank's peak can hold stop recomputing. Every rank decides the same
        (the peaks are all-gathered), as ZeRO-3's collective gathers follow the layers' order of work."""
        peaks = self.ctx.peak_memory_gib()
        if peaks is None or not self.cfg.train.gradient_checkpointing:
            return
        config = self.execution.base.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        per_layer = layer_activation_bytes(
            hidden,
            getattr(config, "intermediate_size", None) or 4 * hidden,
            kv_heads * head_dim,
            self.cfg.train.micro_batch_size * self.cfg.data.seq_len,
            torch.finfo(resolve_dtype(self.cfg.model.dtype, self.ctx.device)).bits // 8,
            max(
                sum(m.r for m in self.training.plan.modules if m.layer == layer) for layer in self.training.plan.layers
            ),
        )
        total = torch.cuda.get_device_properties(self.ctx.device).total_memory
        free = total * 0.95 - max(peaks) * 2**30  # 5% of the device left to the allocator's fragmentation
        span = self.layout.num_layers - self.execution.lowest_adapted_layer
        count = layers_without_recompute(free, per_layer, span)
        kept = self.execution.set_recompute(count)
        print0(
            f"recompute: {len(kept)} of {span} adapted layers keep their activations (peak {max(peaks):.1f} GiB of "
            f"{total / 2**30:.1f}, about {per_layer / 2**30:.2f} GiB per layer)"
        )

    def prepare_training(self, plan: Plan, resume: Optional[Checkpoint] = None) -> None:
        """Adapters attached and verified and the model prepared (checkpointing, frozen prefix, compile, prefix
        cache), then the DeepSpeed engine around it; the checkpoint's state restored, or the held-out loss
        before training measured."""
        cfg, ctx = self.cfg, self.ctx
        options = self._execution_options(plan)  # before attaching: a refused option costs no work
        try:
            # kept for the rest of the process, never undone: the DeepSpeed engine takes the adapted model over
            self.execution = PreparedModel.apply(self.model, plan, self.layout, options)
        except PrefixCacheError as err:
            raise ConfigError(f"train.prefix_cache: {err}") from None
        self.model = self.execution.peft_model
        if cfg.train.tiled_mlp:
            print0(f"tiled MLP: {tile_mlps(self.model, self.layout)} blocks")
        rows = data_mod.pack(self.train_examples, cfg.data.seq_len) if cfg.data.packing else self.train_examples
        schedule = data_mod.StepSchedule(
            len(rows), cfg.train.micro_batch_size, cfg.train.grad_accum, ctx.world_size, cfg.train.seed
        )
        total_steps = cfg.train.max_steps or schedule.steps_for_epochs(cfg.train.epochs)
        pilot = plan.rule == "pilot"
        groups = param_groups(self.model, cfg.train.weight_decay, plan.layers_path if pilot else None)
        trainable = sum(p.numel() for g in groups for p in g["params"])  # before ZeRO-3 partitions them
        self.group_layers = [g.get("layer", -1) for g in groups]  # index-aligned with the engine's param groups
        self.engine, optimizer, scheduler = ctx.initialize(
            self.model, groups, scheduler_factory(cfg, total_steps), cfg.train.lr, mpu=self.sp.mpu if self.sp else None
        )
        print0(f"train: {total_steps} steps x {schedule.global_batch} examples; {trainable:,} trainable parameters")
        guard = NonFiniteGuard(
            cfg.train.nan_policy,
            cfg.train.max_nan_skips,
            loss_scaling=bool(ctx.ds_config.get("fp16", {}).get("enabled")),
        )
        start_step = self._resume(resume, total_steps, guard) if resume else 0
        pilot_step = max(1, round(cfg.plan.pilot_fraction * total_steps)) if pilot else None
        if resume is None:
            self.results.eval_loss_before = self.evaluate()
            print0(f"held-out loss before training: {self.results.eval_loss_before:.4f}")
        self.last_checkpoint = resume.path if resume else None
        metrics = open_metrics(
            self.out, cfg.train.report_to, ctx.is_main, append=resume is not None, config=cfg.model_dump()
        )
        self.engine.train()
        progress = Progress("train", total_steps, ctx.is_main, cfg.train.quiet, start=start_step)
        ctx.reset_peak_memory()
        self.training = TrainingState(
            plan,
            rows,
            schedule,
            total_steps,
            start_step,
            scheduler,
            guard,
            metrics,
            progress,
            loop_started=time.perf_counter(),
            pilot_step=pilot_step,
        )
        if resume is not None and resume.state.get("pilot"):  # the cut placed before that checkpoint, again
            self.freeze_below_pilot_cut(resume.state["pilot"])
        self.steps_done = start_step
        self.stop_signal.install()
        self.observer.watch_stop(self.stop_signal)

    def remaining_steps(self) -> range:
        """The 0-based steps still to run: all of them, or those after the checkpoint resumed from."""
        return range(self.training.start_step, self.training.total_steps)

    def train_step(self, step: int) -> None:
        """Optimizer step `step` (0-based): its micro-batches on this rank, the non-finite guard, then the
        metrics row, evaluation and checkpoint when they fall on this step."""
        cfg, ctx, training = self.cfg, self.ctx, self.training
        total_steps, guard = training.total_steps, training.guard
        started = time.perf_counter()
        lr = training.scheduler.get_last_lr()[0] if training.scheduler is not None else cfg.train.lr
        losses, tokens = [], 0  # losses stay on the device: one host sync per step, not per micro-batch
        rewards = torch.zeros(4, dtype=torch.float64)  # preference objectives: PreferenceOutput.sums()
        micro_batches = [
            (data_mod.collate([training.rows[i] for i in indices], self.pad_id), indices)
            for indices in training.schedule.micro_batches(step, ctx.rank)
        ]
        if self.sp is not None:  # every rank of a sequence group runs its slice of each of the group's batches
            micro_batches = [(shard, None) for shard in self.sp.shards(batch for batch, _ in micro_batches)]
        for batch, indices in micro_batches:
            loss, preference = self._forward_loss(batch, indices, training=True)
            if preference is not None:
                rewards = rewards.to(loss.device) + preference.sums()
            # a non-finite loss can still give finite gradients; NaN gradients make DeepSpeed's all-reduced
            # norm check skip the update on every rank. A constant factor, not a branch (a host sync) and
            # not where(loss, loss * nan), whose backward is NaN even when the loss is finite
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
            # sequence parallelism: a batch's gradient is the sum of its group's slice gradients, and DeepSpeed
            # averages over every rank and over grad_accum x sp micro-steps; the factor sp makes that the plain
            # job's mean over batches (checked against it in tests/distributed/test_sequence_parallel_zero3.py)
            self.engine.backward(loss * cfg.train.sequence_parallel_size if self.sp is not None else loss)
            self.engine.step()
            losses.append(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        totals = ctx.all_reduce_sum(
            torch.cat(
                [
                    # a sequence group's slice losses add up to its batches' losses: sp slices count as one batch
                    torch.tensor(
                        [
                            float(torch.stack(losses).double().sum()),
                            len(losses) / cfg.train.sequence_parallel_size,
                            tokens,
                        ],
                        dtype=torch.float64,
                    ),
                    rewards.cpu(),
                ]
            )
        )
        seconds = time.perf_counter() - started
        step_loss = float(totals[0] / totals[1])
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        skipped = guard.check(step + 1, step_loss, grad_norm, self.engine.was_step_applied(), self.last_checkpoint)
        row = None
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps or skipped:
            finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731 (strict JSON)
            row = dict(
                step=step + 1,
                loss=finite(step_loss),
                lr=lr,
                tokens_per_s=float(totals[2]) / seconds,
                grad_norm=finite(grad_norm),
                step_seconds=seconds,
                epoch=training.schedule.epoch_of(step + 1),
                **reward_metrics(totals[3:]),
                **({"skipped": True} if skipped else {}),
            )
            training.metrics.write(row)
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < total_steps:
            eval_loss = self.evaluate()
            training.metrics.write({"step": step + 1, "eval_loss": eval_loss})
            row = {**(row or {"step": step + 1}), "eval_loss": eval_loss}
        training.progress.update(step + 1, int(totals[2]), step_loss, lr=lr)
        if training.pilot_step == step + 1 and training.pilot is None and step + 1 < total_steps:
            self.place_pilot_cut(step + 1)
        saved = None
        if (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0) or step + 1 == total_steps:
            saved = self.save(step + 1, total_steps, training.plan, guard)
        if row is not None or saved is not None:
            self.observer.step(row or {"step": step + 1}, saved)
        self.steps_done = step + 1
        if step == training.start_step and self.cfg.train.no_recompute_layers == "auto":
            self.choose_no_recompute()

    def place_pilot_cut(self, step: int) -> None:
        """plan.rule=pilot, after the pilot's steps: the cut from what the adapters learned (plan.pilot_plan: the
        lowest cut meeting plan.budget, moved down by plan.guard), then the layers below it frozen."""
        plan = self.training.plan
        lora = [p for name, p in self.model.named_parameters() if "lora_" in name]
        with self.ctx.gathered(lora):  # every rank gathers (a collective); rank 0 decides
            change = layer_update_norms(self.model, plan.layers_path, plan.num_layers)
        pilot = None
        if self.ctx.is_main:
            report = self.report or ProbeReport.load(self.out / "probe.json")  # resumed before the pilot ended
            chosen = pilot_plan(report, change, self.cfg.plan, self.cost_model(report))
            pilot = {
                "step": step,
                "cut": chosen.lowest_adapted_layer,
                "budget_cut": chosen.predicted.get("budget_cut"),
                "fraction_of_uniform_after": chosen.predicted.get("fraction_of_uniform"),
                "layer_change": change,
            }
            write_json_atomic(self.out / "pilot.json", pilot)
        pilot = self.ctx.broadcast_object(pilot)
        after = pilot["fraction_of_uniform_after"]
        share = self.training.pilot_step / self.training.total_steps
        whole = f"; whole run {1 / (share + (1 - share) * after):.2f}x uniform's speed (predicted)" if after else ""
        print0(
            f"pilot: after step {step}, cut at layer {pilot['cut']} (budget cut {pilot['budget_cut']}); the adapters "
            f"below it keep what they learned, frozen, and backward stops there{whole}"
        )
        self.freeze_below_pilot_cut(pilot)

    def freeze_below_pilot_cut(self, pilot: dict) -> None:
        """Layers below pilot["cut"]: no gradient (requires_grad off, the frozen prefix stops backward at the cut)
        and learning rate 0 (their AdamW moments would otherwise keep moving them)."""
        training, cut = self.training, int(pilot["cut"])
        training.pilot = pilot
        if cut == 0:
            return
        layers = base_model(self.model).get_submodule(training.plan.layers_path)
        for index in range(cut):
            layers[index].requires_grad_(False)
        groups = self.engine.optimizer.param_groups
        scheduler = training.scheduler
        for index, layer in enumerate(self.group_layers):
            if 0 <= layer < cut:
                groups[index]["lr"] = 0.0
                if scheduler is not None and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[index] = 0.0  # the schedule sets each group's lr from these every step
        if self.cfg.train.frozen_prefix:
            FrozenPrefix(self.model, training.plan.layers_path, cut).apply()

    def stop_if_asked(self, step: int) -> None:
        """After step `step`: when any rank has had SIGTERM, every rank learns it from one all-reduce, a
        checkpoint of this step is written together (unless there is one, or the last save took longer than
        what is left of train.stop_grace_s), and Stopped ends the job with PREEMPTED_EXIT."""
        asked, waited = self.ctx.all_reduce_sum(
            torch.tensor(
                [float(self.stop_signal.received_at is not None), self.stop_signal.seconds_since()], dtype=torch.float64
            )
        )
        if asked == 0:
            return
        done, grace = step + 1, self.cfg.train.stop_grace_s
        waited = float(waited) / float(asked)  # the mean over the ranks signalled; every rank computes the same
        self.training.progress.close()
        if self.last_checkpoint is not None and self.last_checkpoint.name == step_name(done):
            saved = f"checkpoint {self.last_checkpoint}"
        elif waited + self.last_save_seconds <= grace:
            checkpoint = self.save(done, self.training.total_steps, self.training.plan, self.training.guard)
            self.observer.step({"step": done}, checkpoint)  # Ray Train resumes from the checkpoints it was told of
            saved = f"checkpoint {checkpoint}"
        else:
            saved = (
                f"no checkpoint: {grace - waited:.0f} s of train.stop_grace_s={grace:g} left, the last save took "
                f"{self.last_save_seconds:.0f} s; the last one is {self.last_checkpoint or 'none'}"
            )
        raise Stopped(
            f"SIGTERM: stopped after step {done} of {self.training.total_steps}; {saved}; resume with --resume auto",
            PREEMPTED_EXIT,
        )

    def finish(self) -> None:
        """After the last step: training time and memory peak, the held-out loss after training, the results."""
        cfg, ctx, training = self.cfg, self.ctx, self.training
        training.progress.close()
        self.results.seconds["train"] = time.perf_counter() - training.loop_started  # checkpoints included
        self.results.peak_memory_gib["train"] = ctx.peak_memory_gib()
        self.results.eval_loss_after = self.evaluate()
        if cfg.train.eval_every:
            training.metrics.write({"step": training.total_steps, "eval_loss": self.results.eval_loss_after})
        training.metrics.close()
        self.results.steps = training.total_steps
        self.results.skipped_steps = training.guard.skips
        if self.prefix_cache is not None:
            cache = self.prefix_cache
            self.results.prefix_cache = cache.summary()
            print0(
                f"prefix cache: {len(cache.store)} examples, {cache.stored_bytes / 2**20:.1f} MiB on rank 0; "
                f"{cache.hits} micro-batches replayed, {cache.misses} computed"
            )
        print0(f"held-out loss after training:  {self.results.eval_loss_after:.4f}")

    def save(self, step: int, total_steps: int, plan: Plan, guard: NonFiniteGuard) -> Path:
        """A resumable checkpoint of this step (every rank takes part)."""
        state = {
            "total_steps": total_steps,
            "world_size": self.ctx.world_size,
            "zero_stage": self.ctx.zero_stage,
            "nan_skips": guard.skips,
            "eval_loss_before": self.results.eval_loss_before,
            "config": self.cfg.model_dump(),
            "deepspeed": self.ctx.ds_config,
            "plan": plan_json(plan),
            "pilot": self.training.pilot,
            "fingerprints": self.fingerprints(),
            "versions": _versions(),
        }
        keep_last = None if self.observer.keeps_checkpoints else self.cfg.train.keep_last
        started = time.perf_counter()
        self.last_checkpoint = save_checkpoint(self.ctx, self.engine, self.model, self.out, step, state, keep_last)
        self.last_save_seconds = time.perf_counter() - started
        print0(f"checkpoint: {self.last_checkpoint}")
        return self.last_checkpoint

    def _resume(self, checkpoint: Checkpoint, total_steps: int, guard: NonFiniteGuard) -> int:
        """Engine, RNG and metrics as they were after the checkpoint's step; returns that step."""
        saved_total = int(checkpoint.state["total_steps"])
        if saved_total != total_steps:
            raise ConfigError(
                f"train.resume: {checkpoint.path} belongs to a run of {saved_total} steps, this "
                f"one has {total_steps}; set train.max_steps={saved_total}"
            )
        restore_checkpoint(self.ctx, self.engine, self.model, checkpoint, self.out)
        self.results.eval_loss_before = checkpoint.state.get("eval_loss_before")
        guard.skips = int(checkpoint.state.get("nan_skips", 0))
        print0(f"resume: {checkpoint.path}, step {checkpoint.step} of {total_steps}")
        return checkpoint.step

    # ---------------------------------------------------------------- export
    @torch.no_grad()
    def sample_logits(self) -> None:
        """Logits of the trained model on the first held-out batch: a reloaded adapter must reproduce them."""
        batch = data_mod.fixed_batches(
            self.eval_examples or self.train_examples, self.cfg.train.micro_batch_size, 1, self.pad_id
        )[0]
        self.engine.eval()
        if self.prefix_cache is not None:
            self.prefix_cache.begin(None)
        with self.sp.disabled() if self.sp is not None else contextlib.nullcontext():  # whole rows on every rank
            logits = self.engine(**{k: v.to(self.ctx.device) for k, v in batch.items()}, use_cache=False).logits
        self.engine.train()
        if self.ctx.is_main:
            save_safetensors_atomic(
                self.out / "sample_logits.safetensors",
                {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits": logits.float()},
            )

    def export(self) -> Optional[Path]:
        started = time.perf_counter()
        path = export_adapter(self.ctx, self.model, self.out / "adapter")
        self.results.seconds["export"] = time.perf_counter() - started
        self.sample_logits()
        write_json0(self.out / "eval.json", self.results.to_json())
        print0(f"adapter: {path} (load with peft.PeftModel.from_pretrained(base_model, '{path}'))")
        self.observer.finished(self.results.to_json())
        return path


def check_objective_data(objective: str, train_examples, eval_examples) -> None:
    """Preference objectives need {prompt, chosen, rejected} rows and nothing else does (one line otherwise)."""
    for knob, examples in (("data.train", train_examples), ("data.eval", eval_examples)):
        if not len(examples):
            continue
        pairs = isinstance(examples[0], data_mod.PreferencePair)
        if pairs and objective == "sft":
            raise ConfigError(f"{knob}: preference rows (prompt/chosen/rejected); set train.objective=dpo or simpo")
        if not pairs and objective != "sft":
            raise ConfigError(
                f"train.objective={objective}: {knob} must hold {{prompt, chosen, rejected}} rows; "
                "use train.objective=sft for this data"
            )


def predicted_speed_text(plan: Plan, device_type: str) -> str:
    """The plan line's speed prediction, said only where it means something: a plan that freezes no layer
    backpropagates through the whole model as uniform LoRA does (the rest of the analytic model's difference is
    per-adapter overhead), and the uncalibrated analytic model counts FLOPs at a GPU's rate, not a CPU's."""
    if not plan.predicted:
        return ""
    if plan.lowest_adapted_layer == 0:
        return "; freezes no layer, so no speedup over uniform LoRA is predicted"
    source = plan.predicted["source"]
    if not plan.predicted.get("calibrated") and device_type == "cpu":
        source += " for a GPU, not this CPU; `aletheia-ds bench` calibrates it"
    return f"; predicted {plan.predicted['speedup_vs_uniform']:.2f}x uniform LoRA's speed ({source})"


def _versions() -> dict:
    import deepspeed
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def main(cfg: RunConfig, observer: Optional[RunObserver] = None) -> RunResults:
    """The whole job on this rank; `observer` follows its progress (launch/ray_train.py: Ray Train)."""
    cfg.require_paths()
    check_backends(cfg.train.report_to)
    run = None
    try:
        with distributed(cfg) as ctx, lock_output_dir(ctx, cfg):
            resume = find_resume(ctx, cfg)
            run = Run.setup(ctx, cfg, observer)
            if resume:
                plan = run.resume_plan(resume)
            else:
                run.check_given_inputs()
                plan = run.plan(run.probe())
            run.prepare_training(plan, resume)
            for step in run.remaining_steps():
                run.train_step(step)
                run.stop_if_asked(step)
            run.finish()
            run.export()
            return run.results
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank of the terminal's job: one line from rank 0 instead of each one's traceback
        where = f"at step {run.steps_done}" if run is not None and run.training is not None else "before training"
        last = f" (last checkpoint: {run.last_checkpoint})" if run is not None and run.last_checkpoint else ""
        raise Stopped(f"interrupted {where}{last}; resume with --resume auto", INTERRUPTED_EXIT) from None


def cli(argv: list[str] | None = None) -> int:
    """Entry for launch/train.py: one clear line and exit code 2 on a configuration or data problem."""
    import sys

    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        main(cfg)
    except (ConfigError, TrainingError) as err:
        # every rank meets the same bad input or the same all-reduced loss; one line from rank 0
        return exit_code(err, announce=os.environ.get("RANK", "0") == "0")
    return 0


if __name__ == "__main__":  # `deepspeed --module aletheia_ds.train --config ...` (an installed package, no checkout)
    import sys

    sys.exit(cli())
