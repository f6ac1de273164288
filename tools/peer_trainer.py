"""deepspeed --num_gpus 2 tools/peer_trainer.py --model M --train D --ds-config ds_configs/peer_zero3_stock.json --out O

The peer stack, as LLaMA-Factory and axolotl run it underneath: transformers `Trainer` + PEFT `LoraConfig`
(every decoder layer, r16, alpha 32, every attention/MLP linear and MoE expert bank) + DeepSpeed ZeRO-3 through
`TrainingArguments(deepspeed=...)`. The model directory holds config.json only: the random weights are built
under zero.Init by transformers' own HfDeepSpeedConfig path (TrainingArguments with a ZeRO-3 config first,
then `from_config`). The data is the job's: the shipped tokenizer, packed to --seq-len (aletheia_ds.data), one
micro-batch per GPU per step. bf16 on GPU, float32 on CPU; non-reentrant gradient checkpointing as the job's.

Writes in --out: metrics.jsonl (the job's row form: step, loss, tokens_per_s, step_seconds) and summary.json in
the form tools/bench_scale.py's `summarize` gives the job's arms (tokens/s per GPU, MFU over uniform r16
adapters, peak GPU memory per rank, build/train seconds), plus what the trained LoRA covers. A failure (out of
memory, anything raised) is written by each rank as failed_rank<N>.json with its reason, and the ranks exit 1.
tools/bench_scale.py runs this as its `peer_tuned` and `peer_stock` arms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import ROOT  # first: it puts this checkout on sys.path
from bench_scale import H200_BF16_DENSE_TFLOPS, throughput
from transformers import TrainerCallback

from aletheia_ds.arch import describe
from aletheia_ds.cost import lora_step_flops_per_token
from aletheia_ds.data import IGNORE, Example, collate, load_examples, load_tokenizer
from aletheia_ds.dist import held_parameter_elements, peak_host_rss_gib
from aletheia_ds.io import write_json_atomic

# the rank of the job's uniform arm, with LLaMA-Factory's default alpha (twice the rank, finetuning_args.py)
PEER_RANK, PEER_ALPHA = 16, 32


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", required=True, help="a directory with config.json (random weights are built)")
    parser.add_argument("--tokenizer", default=str(ROOT / "examples/tiny/tokenizer"))
    parser.add_argument("--train", required=True, help="JSONL of {'text': ...} rows (tools/bench_scale.write_data)")
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", default="peer", help="the name the summary carries")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    parser.add_argument("--cpu", action="store_true", help="CPU ranks over gloo, float32")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def chunked_rows(examples, seq_len: int) -> list[Example]:
    """Every example's tokens one after another, cut into rows of exactly seq_len (the last partial row dropped):
    the peers' packing (transformers' run_clm `group_texts`, LLaMA-Factory's pre-training packing), so each step
    carries micro_batch x seq_len tokens whatever the examples' lengths. Position ids run on across examples as
    theirs do; an example's first token is not predicted from the one before it."""
    ids: list[int] = []
    labels: list[int] = []
    rows = []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE, *ex.labels[1:]]
        while len(ids) >= seq_len:
            rows.append(Example(ids[:seq_len], labels[:seq_len], None))
            ids, labels = ids[seq_len:], labels[seq_len:]
    return rows


class StepTimer(TrainerCallback):
    """Times each optimizer step from its start to the end of its update, the device synchronised at both ends
    (the Trainer does not wait for the GPU between steps), and writes the job's metrics.jsonl rows on rank 0."""

    def __init__(self, tokens_per_step: int, metrics_path: Path, is_main: bool, cuda: bool):
        self.tokens_per_step, self.metrics_path, self.is_main, self.cuda = tokens_per_step, metrics_path, is_main, cuda
        self.rows: list[dict] = []
        self.started = 0.0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        seconds = time.perf_counter() - self.started
        self.rows.append(
            {
                "step": state.global_step,
                "loss": None,
                "tokens_per_s": self.tokens_per_step / seconds,
                "step_seconds": seconds,
            }
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        # logging_steps=1: the log of step N follows its on_step_end
        if logs and "loss" in logs and self.rows and self.rows[-1]["step"] == state.global_step:
            self.rows[-1]["loss"] = float(logs["loss"])
            if self.is_main:
                with self.metrics_path.open("a") as handle:
                    handle.write(json.dumps(self.rows[-1]) + "\n")


def failure_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    if "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory ({text})"
    return f"{type(err).__name__}: {text}"


def lora_coverage(model, layers_path: str) -> dict:
    """Which decoder layers and module names carry LoRA after training, at which ranks, and how many lora_B
    factors moved from their zero start (gathered from the ZeRO-3 partitions, every rank takes part)."""
    import deepspeed
    import torch

    layers, modules, ranks, trained, adapters = set(), set(), set(), 0, 0
    prefix = layers_path.rsplit(".", 1)[-1] + "."
    for name, param in model.named_parameters():
        if "lora_B" not in name:
            continue
        after = name.split(prefix, 1)[1]
        layer, rest = after.split(".", 1)
        layers.add(int(layer))
        modules.add(rest.split(".lora_B")[0].rsplit(".", 1)[-1])
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            ranks.add(int(param.shape[1]))
            trained += bool(torch.count_nonzero(param.detach()) > 0)
        adapters += 1
    return {
        "layers": sorted(layers),
        "modules": sorted(modules),
        "ranks": sorted(ranks),
        "adapters": adapters,
        "adapters_trained": trained,
    }


def run(args) -> dict:
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = not args.cpu and torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        # accelerate finds no backend for CPU ranks under DeepSpeed and would see a world of one (wrong "auto"
        # batch sizes, unsharded data): a gloo state set up here, which the Trainer then uses
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    # TrainingArguments(deepspeed=...) before the model: it registers the HfDeepSpeedConfig that makes
    # from_config build under zero.Init, as LLaMA-Factory and axolotl do
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        deepspeed=str(Path(args.ds_config).resolve()),
        bf16=cuda,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=args.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        accelerator_config={"use_configured_state": not cuda},
    )
    tokenizer = load_tokenizer(args.tokenizer)
    rows = chunked_rows(load_examples(args.train, tokenizer, args.seq_len, log=lambda m: None), args.seq_len)
    if len(rows) < args.micro_batch * world:  # fewer than the steps need is fine: the Trainer runs more epochs
        raise SystemExit(
            f"error: --train: {len(rows)} rows of {args.seq_len} tokens, one step needs {args.micro_batch * world}"
        )

    started = time.perf_counter()
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    build_seconds = time.perf_counter() - started
    held, total = held_parameter_elements(model)
    layout = describe(model)
    targets = sorted({t.path.rsplit(".", 1)[-1] for targets in layout.layer_targets for t in targets})
    # MoE: every expert bank through PEFT's target_parameters (what PEFT turns the peers' expert projection
    # names into on transformers 5), and the MoE blocks as ZeRO-3 leaves, as LLaMA-Factory sets them
    # (model/model_utils/moe.py add_z3_leaf_module)
    banks = [f"{layout.layers_path}.{i}.{b.path}" for i, _, _ in layout.iter_moe(model) for b in layout.moe[i].banks]
    if banks:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, layout.moe_block_classes(model))
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=PEER_RANK,
            lora_alpha=PEER_ALPHA,
            lora_dropout=0.0,
            bias="none",
            target_modules=targets,
            target_parameters=banks or None,
        ),
    )

    timer = StepTimer(args.micro_batch * args.seq_len * world, out / "metrics.jsonl", rank == 0, cuda)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=[timer],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trained_at = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - trained_at
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    coverage = lora_coverage(trainer.model, layout.layers_path)

    gathered = [None] * world
    dist.all_gather_object(gathered, {"peak": peak, "held": held, "rss": peak_host_rss_gib()})
    shapes = layout.shapes()
    layer_matmul = [sum(i * o for i, o in shapes.values())] * layout.num_layers
    adapters = [(layer, PEER_RANK, *shapes[key]) for layer in range(layout.num_layers) for key in shapes]
    flops_per_token = lora_step_flops_per_token(
        layer_matmul, config.hidden_size, config.vocab_size, args.seq_len, adapters
    )
    losses = [r["loss"] for r in timer.rows if r["loss"] is not None]
    summary = {
        "arm": args.arm,
        "rule": "trainer+peft",
        "layers_adapted": len(coverage["layers"]),
        "lowest_adapted_layer": min(coverage["layers"], default=None),
        "adapters": coverage["adapters"],
        **throughput(timer.rows, args.warmup, world, flops_per_token, args.peak_tflops),
        "predicted_speedup": None,
        "seconds": {"build": build_seconds, "train": train_seconds},
        "peak_memory_gib": {"train": [g["peak"] for g in gathered] if cuda else None},
        "eval_loss_before": None,
        "eval_loss_after": None,
        "base_held_fraction_by_rank": [g["held"] / total for g in gathered],
        "host_rss_gib_by_rank": [g["rss"] for g in gathered],
        "adapter_bytes": None,
        "run_dir": str(out),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "lora": {**coverage, "target_modules": targets, "alpha": PEER_ALPHA},
        "ds_config": str(args.ds_config),
        "resolved_zero_optimization": trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get(
            "zero_optimization"
        ),
    }
    if rank == 0:
        write_json_atomic(out / "summary.json", summary)
    return summary


def main(argv=None) -> None:
    args = arguments(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    try:
        summary = run(args)
    except BaseException as err:  # the table reports the reason; the launcher still sees the failure
        if isinstance(err, SystemExit) and not str(err).startswith("error"):
            raise
        rank = os.environ.get("RANK", "0")
        write_json_atomic(
            out / f"failed_rank{rank}.json", {"arm": args.arm, "rank": int(rank), "reason": failure_reason(err)}
        )
        raise
    if os.environ.get("RANK", "0") == "0":
        print(
            f"{args.arm}: {summary['step_seconds']:.2f} s/step, {summary['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
            f"MFU {summary['mfu']:.1%}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
