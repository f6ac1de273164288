"""python tools/quality_study.py --out docs/quality

Does gradient-guided layer selection keep quality? A controlled study on one GPU (one H200: ~7-8 min).

1. corpus     the running interpreter's standard library (.py sources, docs), topped up with
              site-packages text to --corpus-mb; 1 file in --held-out-every is held out (forgetting)
2. tokenizer  byte-level BPE trained at run time with `tokenizers` (deterministic)
3. base       a Llama-shaped LM (~100M parameters by default) pretrained from scratch (bf16 autocast,
              fused AdamW, SDPA); --pretrain-max-s and --time-budget-s stop it early if it runs long
4. tasks      three generated tasks with exact answers: multi-step arithmetic word problems,
              docstring -> one-line function, key=value lines -> JSON (loss on the completion only)
5. probe      aletheia_ds.probe.run.run_probe on the frozen base, then aletheia_ds.plan.make_plan
6. arms       same steps, data and seeds: uniform LoRA r16 on every layer; the paper's rule (top 50%,
              attention r16 / MLP r64); the budgeted plan (rule budget, cost model from aletheia_ds.cost,
              calibrated on this device by aletheia_ds.speed); random layers with the budgeted plan's
              layer count, modules and ranks; the upper half of the layers. Adapters attached and
              verified by aletheia_ds.adapters.attach.attach; layers below the lowest adapted one run under
              no_grad (aletheia_ds.execution.FrozenPrefix)
7. measure    held-out task loss, exact match (greedy decoding, the final answer compared), forgetting
              (rise of held-out corpus loss over the base model's), training and probe time; mean +- std
              over seeds; results.json, table.md and chart.png in --out

    python tools/quality_study.py --smoke --out /tmp/quality_smoke     # the whole pipeline on CPU, < 1 min
    python tools/quality_study.py --estimate                           # expected GPU time split of the sizes
    python tools/quality_study.py --render docs/quality/results.json   # table + chart again from results

Needs torch, transformers, peft, tokenizers, pyyaml, pydantic (aletheia_ds.config), matplotlib for the
chart; never deepspeed or ray (results.json records that neither was imported).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package from this checkout, installed or not (the GPU machine has no install)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aletheia_ds.arch import describe  # noqa: E402
from aletheia_ds.io import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from aletheia_ds.config import ConfigError, LoraSection, PlanSection  # noqa: E402
from aletheia_ds.cost import CostModel  # noqa: E402
from aletheia_ds.data import Example, StepSchedule, collate, fixed_batches, load_examples  # noqa: E402
from aletheia_ds.evaluate import held_out_loss, predicted_tokens  # noqa: E402
from aletheia_ds.adapters.attach import attach  # noqa: E402
from aletheia_ds.plan import Plan, captured, make_plan  # noqa: E402
from aletheia_ds.execution import FrozenPrefix  # noqa: E402
from aletheia_ds.probe.report import ProbeReport  # noqa: E402
from aletheia_ds.probe.run import run_probe  # noqa: E402

ARMS = ("uniform", "paper", "budget", "random", "upper")
ARM_LABELS = {
    "uniform": "uniform LoRA r16, every layer",
    "paper": "paper: top 50% by probe, r16/r64",
    "budget": "budgeted plan (cost model), r16/r64",
    "random": "random layers, budgeted plan's count and ranks",
    "upper": "upper half of the layers, r16/r64",
}
PROBE_GUIDED = ("paper", "budget", "random")  # arms whose plan needs the probe (random copies budget's shape)
ARM_COLORS = {"uniform": "tab:gray", "paper": "tab:blue", "budget": "tab:orange", "random": "tab:purple",
              "upper": "tab:green"}


# ====================================================================== settings
@dataclass
class Settings:
    out: str = field(default="docs/quality", metadata={"help": "results.json, table.md and chart.png land here"})
    seeds: int = field(default=3, metadata={"help": "seeds per arm (LoRA init, data order, random layers)"})
    data_seed: int = field(default=1234, metadata={"help": "task data and base model seed (same for every arm)"})
    time_budget_s: float = field(default=510.0, metadata={"help": "wall-clock budget of the whole command; "
                                                          "pretraining and later seed rounds are cut to fit"})
    reserve_s: float = field(default=200.0, metadata={"help": "seconds kept for probe, calibration and arms "
                                                      "when the budget cuts pretraining"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    # corpus and tokenizer
    corpus_mb: float = field(default=48.0, metadata={"help": "corpus size: stdlib first, then site-packages"})
    tokenizer_mb: float = field(default=16.0, metadata={"help": "text the BPE tokenizer is trained on"})
    vocab_size: int = 16384
    held_out_every: int = field(default=20, metadata={"help": "1 file in N is held out (forgetting)"})
    # base model
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    kv_heads: int = 4
    intermediate: int = 2048
    seq_len: int = field(default=512, metadata={"help": "pretraining window"})
    pretrain_steps: int = 2400
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 100
    pretrain_max_s: float = field(default=180.0, metadata={"help": "stop pretraining after this many seconds"})
    corpus_eval_windows: int = field(default=64, metadata={"help": "held-out corpus windows (forgetting)"})
    # tasks
    train_per_task: int = 8000
    eval_per_task: int = field(default=256, metadata={"help": "held-out examples per task for the loss"})
    em_per_task: int = field(default=128, metadata={"help": "held-out examples per task decoded for exact match"})
    task_seq_len: int = 160
    # arms
    arms: str = ",".join(ARMS)
    lora_steps: int = 400
    lora_batch: int = 64
    lora_lr: float = 1e-3
    lora_warmup: int = 20
    uniform_r: int = 16
    attention_r: int = 16
    mlp_r: int = 64
    top_pct: float = 50.0
    budget: float = 0.6
    cost: str = field(default="calibrated", metadata={"help": "calibrated (timed steps on this device) | analytic"})
    calibration_steps: int = field(default=6, metadata={"help": "timed steps per calibration plan (+2 warm-up)"})
    frozen_prefix: bool = field(default=True, metadata={"help": "layers below the lowest adapted one under no_grad"})
    probe_batches: int = 8
    probe_batch: int = 16
    eval_batch: int = 64
    em_batch: int = 128


# tiny sizes for CPU; one thread: tiny ops gain nothing from more, and a busy machine makes them slower
SMOKE = dict(corpus_mb=1.0, tokenizer_mb=1.0, vocab_size=1024, layers=4, hidden=64, heads=4, kv_heads=2,
             intermediate=160, seq_len=128, pretrain_steps=40, pretrain_batch=16, pretrain_lr=3e-3, pretrain_warmup=4,
             pretrain_max_s=90.0, corpus_eval_windows=8, train_per_task=200, eval_per_task=16, em_per_task=8,
             task_seq_len=128, lora_steps=20, lora_batch=8, lora_lr=3e-3, lora_warmup=2, calibration_steps=1,
             probe_batches=2, probe_batch=8, eval_batch=48, em_batch=48, seeds=2, time_budget_s=240.0, reserve_s=60.0,
             device="cpu", threads=1)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the whole pipeline in < 1 min")
    parser.add_argument("--estimate", action="store_true", help="print the expected GPU time split and exit")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="write table.md and chart.png from saved results")
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata.get("help"))
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=None, help=f.metadata.get("help", f"default {f.default}"))
    args = parser.parse_args(argv)
    settings = Settings(**(SMOKE if args.smoke else {}))
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name)
        if value is not None:
            setattr(settings, f.name, value)
    unknown = [a for a in settings.arms.split(",") if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {','.join(ARMS)}")
    if settings.cost not in ("calibrated", "analytic"):
        parser.error(f"--cost must be calibrated or analytic, got {settings.cost!r}")
    if "random" in settings.arms.split(",") and "budget" not in settings.arms.split(","):
        parser.error("--arms: random copies the budgeted plan's layer count and ranks; include budget")
    return settings, args


class Clock:
    """Wall time of named phases since the command started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype  # the frozen base's dtype for the LoRA arms

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        # bf16 matmuls on the GPU; CPU stays float32 (bf16 matmuls there are slow and only the smoke runs there)
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def log(message: str) -> None:
    print(message, flush=True)


# ====================================================================== corpus
TEXT_SUFFIXES = (".py", ".rst", ".md")
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


def _key_hash(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def _text_files(root: Path, prefix: str) -> list[tuple[str, Path, int]]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
        for name in files:
            if name.endswith(TEXT_SUFFIXES):
                path = Path(directory) / name
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if 0 < size <= 400_000:  # very large files are generated tables, not prose or code
                    found.append((f"{prefix}/{path.relative_to(root)}", path, size))
    # a hash order spreads a partial take over many packages instead of the alphabet's first few
    return sorted(found, key=lambda item: _key_hash(item[0]))


def _readable(text: str) -> bool:
    lines = text.count("\n") + 1
    return "\x00" not in text and len(text) / lines < 160  # minified or data-like files are not language


@dataclass
class Corpus:
    train: list[str]
    held_out: list[str]
    stats: dict


def load_corpus(target_mb: float, held_out_every: int) -> Corpus:
    """The interpreter's stdlib, then site-packages text until `target_mb`; held-out files chosen by path hash."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [("stdlib", stdlib)]
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key])
        if path.is_dir() and all(path != s for _, s in sources):
            sources.append(("site", path))
    target = int(target_mb * 1e6)
    train, held_out, taken, per_source = [], [], 0, {}
    for prefix, root in sources:
        if taken >= target:
            break
        for key, path, size in _text_files(root, prefix):
            if taken >= target:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not _readable(text):
                continue
            (held_out if _key_hash("held-out:" + key) % held_out_every == 0 else train).append(text)
            taken += len(text)
            per_source[prefix] = per_source.get(prefix, 0) + len(text)
    if not held_out or not train:
        raise SystemExit(f"corpus: too little text found under {[str(r) for _, r in sources]}; "
                         "raise --corpus-mb or lower --held-out-every")
    stats = {"sources": {p: str(r) for p, r in sources}, "chars_by_source": per_source, "train_files": len(train),
             "held_out_files": len(held_out), "train_chars": sum(map(len, train)),
             "held_out_chars": sum(map(len, held_out))}
    return Corpus(train, held_out, stats)


def train_tokenizer(texts: list[str], vocab_size: int, sample_chars: int):
    """Byte-level BPE on the first `sample_chars` of the training files (any text encodes: byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample, size = [], 0
    for text in texts:
        if size >= sample_chars:
            break
        sample.append(text)
        size += len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, EOS after each (int32: the stream is the corpus's biggest object)."""
    backend = tokenizer.backend_tokenizer
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    pieces = []
    for start in range(0, len(texts), 512):
        for encoding in backend.encode_batch(texts[start:start + 512], add_special_tokens=False):
            pieces += [torch.tensor(encoding.ids, dtype=torch.int32), eos]
    return torch.cat(pieces)


# ====================================================================== base model
def build_model(s: Settings, tokenizer, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=max(s.seq_len, s.task_seq_len + 64), rms_norm_eps=1e-5,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model


def cosine_lr(peak: float, progress: float, warmup_fraction: float, floor: float = 0.1) -> float:
    if progress < warmup_fraction:
        return peak * max(progress / warmup_fraction, 1e-3)
    done = min(1.0, (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))


def windows(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """`count` consecutive non-overlapping windows of `width` tokens (fewer if the stream is short)."""
    count = min(count, (len(stream) - 1) // width)
    return stream[:count * width].view(count, width)


@torch.no_grad()
def corpus_loss(model, rows: torch.Tensor, batch: int, env: Env) -> float:
    """Mean next-token loss over held-out corpus windows (the forgetting measure)."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch].to(env.device).long()
        with env.autocast():
            logits = model(input_ids=chunk[:, :-1]).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count


def pretrain(model, stream: torch.Tensor, s: Settings, env: Env, deadline_s: float, clock: Clock) -> dict:
    """Next-token pretraining on random windows of the stream; stops at the step count or the deadline.

    The learning-rate schedule follows the larger of step progress and time progress, so a run cut by
    the deadline still ends at the low end of its cosine.
    """
    model.to(env.device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=s.pretrain_lr, betas=(0.9, 0.95), fused=env.cuda)
    tokens = stream.to(env.device)
    offsets = torch.arange(s.seq_len + 1, device=env.device)
    generator = torch.Generator().manual_seed(s.data_seed)
    started = time.perf_counter()
    budget_s = max(1.0, min(s.pretrain_max_s, deadline_s - clock.elapsed()))
    warmup_fraction = s.pretrain_warmup / s.pretrain_steps
    losses, step, stopped_by = [], 0, "steps"
    report_every = max(1, s.pretrain_steps // 10)
    while step < s.pretrain_steps:
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s:
            stopped_by = "time"
            break
        progress = max(step / s.pretrain_steps, elapsed / budget_s)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(s.pretrain_lr, progress, warmup_fraction)
        starts = torch.randint(0, len(stream) - s.seq_len - 1, (s.pretrain_batch,), generator=generator)
        rows = tokens[starts.to(env.device)[:, None] + offsets].long()
        with env.autocast():
            logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == s.pretrain_steps:
            losses.append((step, float(loss.detach())))  # the sync here keeps the host within 10 steps of the device
            if not math.isfinite(losses[-1][1]):
                raise FloatingPointError(f"pretraining: non-finite loss at step {step}")
        if step % report_every == 0:
            log(f"  pretrain step {step}/{s.pretrain_steps}  loss {float(loss.detach()):.3f}  "
                f"{time.perf_counter() - started:.0f} s")
    env.sync()
    seconds = time.perf_counter() - started
    model.eval()
    return {"steps_planned": s.pretrain_steps, "steps_done": step, "stopped_by": stopped_by,
            "seconds": seconds, "time_cap_s": budget_s, "tokens_seen": step * s.pretrain_batch * s.seq_len,
            "epochs": step * s.pretrain_batch * s.seq_len / len(stream), "loss_curve": losses,
            "step_ms": 1000 * seconds / max(1, step)}


# ====================================================================== tasks
NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "tickets", "cards", "stickers"]
WORDS = ["red", "oslo", "lima", "blue", "delta", "maple", "river", "stone", "amber", "cedar", "pixel", "nova",
         "quartz", "tango", "ember", "fjord", "lotus", "orbit", "prism", "sable"]
KEYS = ["name", "age", "city", "color", "count", "size", "id", "level", "active", "score", "tag", "price", "year",
        "owner", "mode", "rank"]


def arithmetic_problem(rng: random.Random) -> dict:
    """Two- and three-step word problems; the completion shows the expression, then the answer."""
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12)
    kind = rng.randrange(5)
    if kind == 0:
        d = rng.randint(1, a)
        text = (f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} each, then gives away {d}. "
                f"How many {item} does {name} have now?")
        expr, value = f"{a} + {b} * {c} - {d}", a + b * c - d
    elif kind == 1:
        d = rng.randint(1, a)
        text = (f"{name} has {b} boxes of {c} {item} and finds {a} more, then loses {d}. "
                f"How many {item} are there?")
        expr, value = f"{b} * {c} + {a} - {d}", b * c + a - d
    elif kind == 2:
        d = rng.randint(1, 30)
        text = f"{name} starts with {a} {item}, doubles them, and then buys {d} more. How many {item} are there?"
        expr, value = f"{a} * 2 + {d}", a * 2 + d
    elif kind == 3:
        text = (f"{name} has {a} {item} and {other} has {b} times as many. "
                f"How many {item} do they have together?")
        expr, value = f"{a} + {a} * {b}", a + a * b
    else:
        per = rng.randint(2, 9)
        total = per * b
        text = (f"{name} shares {total} {item} equally among {b} friends and keeps {c} more. "
                f"How many {item} does each friend get plus {name}'s {c}?")
        expr, value = f"{total} / {b} + {c}", per + c
    return {"prompt": f"Question: {text}\nAnswer:", "completion": f" {expr} = {value}. The answer is {value}."}


# (argument, docstring, body); {k} and {c1}/{c2} are filled per example. Each has an oracle in the tests.
FUNCTIONS = [
    ("x", "Return x times {k} plus {m}.", "return x * {k} + {m}"),
    ("x", "Return x squared minus {k}.", "return x ** 2 - {k}"),
    ("x", "Return x divided by {k}, rounded down.", "return x // {k}"),
    ("n", "Return True if n is divisible by {k}.", "return n % {k} == 0"),
    ("s", "Return s repeated {k} times.", "return s * {k}"),
    ("s", "Return the first {k} characters of s in upper case.", "return s[:{k}].upper()"),
    ("s", "Return s reversed.", "return s[::-1]"),
    ("s", "Return s with every {c1!r} replaced by {c2!r}.", "return s.replace({c1!r}, {c2!r})"),
    ("xs", "Return the sum of the items of xs that are greater than {k}.", "return sum(v for v in xs if v > {k})"),
    ("xs", "Return the items of xs sorted from largest to smallest.", "return sorted(xs, reverse=True)"),
    ("xs", "Return how many items of xs are equal to {k}.", "return xs.count({k})"),
    ("xs", "Return the last {k} items of xs.", "return xs[-{k}:]"),
    ("words", "Return a dict that maps each word in words to its length.", "return {{w: len(w) for w in words}}"),
    ("words", "Return the words that start with {c1!r}.", "return [w for w in words if w.startswith({c1!r})]"),
]
VERBS = ["compute", "get", "make", "find", "build", "calc", "pick", "fetch"]
NOUNS = ["value", "total", "result", "item", "entry", "score", "answer", "output"]


def function_problem(rng: random.Random, template: int | None = None) -> dict:
    """Signature and docstring in, the one-line body out."""
    index = rng.randrange(len(FUNCTIONS)) if template is None else template
    arg, doc, body = FUNCTIONS[index]
    fill = {"k": rng.randint(2, 9), "m": rng.randint(1, 20), "c1": rng.choice("abcdefgh"), "c2": rng.choice("xyz")}
    name = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    prompt = f'def {name}({arg}):\n    """{doc.format(**fill)}"""\n'
    return {"prompt": prompt, "completion": f"    {body.format(**fill)}", "template": index, "fill": fill}


def json_problem(rng: random.Random) -> dict:
    """key=value lines in, one JSON object out (ints as numbers, true/false as booleans, words as strings)."""
    keys = rng.sample(KEYS, rng.randint(2, 5))
    pairs = []
    for key in keys:
        kind = rng.randrange(3)
        raw = (str(rng.randint(0, 999)), rng.choice(["true", "false"]), rng.choice(WORDS))[kind]
        pairs.append((key, raw))
    obj = {k: int(v) if v.isdigit() else (v == "true") if v in ("true", "false") else v for k, v in pairs}
    prompt = "Convert to JSON:\n" + "\n".join(f"{k}={v}" for k, v in pairs) + "\nJSON:"
    return {"prompt": prompt, "completion": " " + json.dumps(obj)}


def arithmetic_answer(text: str) -> Optional[str]:
    found = re.search(r"The answer is (-?\d+)", text)
    return found.group(1) if found else None


def function_answer(text: str) -> Optional[str]:
    for line in text.splitlines():
        if line.strip().startswith("return"):
            return " ".join(line.split())
    return None


def json_answer(text: str) -> Optional[str]:
    first = text.strip().split("\n", 1)[0]
    try:
        return json.dumps(json.loads(first), sort_keys=True)
    except (json.JSONDecodeError, ValueError):
        return None


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], dict]
    answer: Callable[[str], Optional[str]]  # completion text -> the final answer compared for exact match


TASKS = (Task("arithmetic", arithmetic_problem, arithmetic_answer),
         Task("function", function_problem, function_answer),
         Task("json", json_problem, json_answer))


def task_rows(task: Task, seed: int, count: int) -> list[dict]:
    rng = random.Random(f"{task.name}:{seed}")
    rows, seen = [], set()
    while len(rows) < count:
        row = task.make(rng)
        if row["prompt"] not in seen:  # held-out prompts never appear in training
            seen.add(row["prompt"])
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
        if len(seen) > 50 * count:
            raise SystemExit(f"task {task.name}: cannot draw {count} distinct problems")
    return rows


@dataclass
class TaskData:
    train: list[Example]
    eval: dict[str, list[Example]]  # per task, for the held-out loss
    decode: dict[str, list[dict]]  # per task, rows decoded for exact match
    counts: dict


def build_task_data(tokenizer, s: Settings) -> TaskData:
    """Rows -> JSONL -> aletheia_ds.data.load_examples: the package's prompt/completion path, loss on the completion."""
    held = s.eval_per_task + s.em_per_task
    train_rows, eval_examples, decode_rows = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            rows = task_rows(task, s.data_seed, s.train_per_task + held)
            train_rows.append(rows[:s.train_per_task])
            eval_path = Path(tmp) / f"{task.name}_eval.jsonl"
            held_rows = rows[s.train_per_task:s.train_per_task + s.eval_per_task]
            eval_path.write_text("".join(json.dumps(r) + "\n" for r in held_rows))
            eval_examples[task.name] = load_examples(eval_path, tokenizer, s.task_seq_len, log=log)
            decode_rows[task.name] = rows[s.train_per_task + s.eval_per_task:]
        mixed = [row for group in zip(*train_rows) for row in group]  # interleaved: every batch mixes the tasks
        train_path = Path(tmp) / "train.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
        train = load_examples(train_path, tokenizer, s.task_seq_len, log=log)
    lengths = [len(ex.input_ids) for ex in train]
    counts = {"train": len(train), "eval": {k: len(v) for k, v in eval_examples.items()},
              "decode": {k: len(v) for k, v in decode_rows.items()}, "mean_tokens": statistics.fmean(lengths),
              "max_tokens": max(lengths)}
    return TaskData(train, eval_examples, decode_rows, counts)


# ====================================================================== evaluation
def to_device(batch: dict, env: Env) -> dict:
    return {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}


def task_losses(model, data: TaskData, pad_id: int, s: Settings, env: Env) -> dict:
    def forward(batch):
        with env.autocast():
            return model(**to_device(batch, env)).loss

    by_task, weighted, tokens = {}, 0.0, 0
    for name, examples in data.eval.items():
        batches = fixed_batches(examples, s.eval_batch, math.ceil(len(examples) / s.eval_batch), pad_id)
        by_task[name] = held_out_loss(forward, batches)
        count = sum(predicted_tokens(b) for b in batches)
        weighted += by_task[name] * count
        tokens += count
    return {"task_loss": weighted / tokens, "task_loss_by_task": by_task}


@torch.no_grad()
def exact_match(model, tokenizer, data: TaskData, s: Settings, env: Env, samples: int = 2) -> dict:
    """Greedy decoding of each held-out prompt; the task's final answer compared with the reference's.

    All tasks share the decoding batches: on a small model every generate call costs the same per token
    whatever its batch, so fewer, fuller calls are faster.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [(task, row) for task in TASKS for row in data.decode[task.name]]
    longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for _, r in rows)
    correct = {task.name: 0 for task in TASKS}
    shown = {task.name: [] for task in TASKS}
    for start in range(0, len(rows), s.em_batch):
        chunk = rows[start:start + s.em_batch]
        prompts = [tokenizer(r["prompt"])["input_ids"] for _, r in chunk]  # as data.Tokenize encodes prompts
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where decoding starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with env.autocast():
            out = model.generate(input_ids=ids.to(env.device), attention_mask=mask.to(env.device),
                                 max_new_tokens=longest + 4, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                                 use_cache=True)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for (task, row), text in zip(chunk, texts):
            got, want = task.answer(text), task.answer(row["completion"])
            correct[task.name] += got is not None and got == want
            if len(shown[task.name]) < samples:
                shown[task.name].append({"prompt": row["prompt"], "expected": row["completion"], "generated": text})
    by_task = {name: hits / len(data.decode[name]) for name, hits in correct.items()}
    return {"exact_match": sum(correct.values()) / len(rows), "exact_match_by_task": by_task, "samples": shown}


def evaluate(model, tokenizer, data: TaskData, held_out_rows: torch.Tensor, s: Settings, env: Env) -> dict:
    started = time.perf_counter()
    model.eval()
    result = task_losses(model, data, tokenizer.pad_token_id, s, env)
    result.update(exact_match(model, tokenizer, data, s, env))
    result["corpus_loss"] = corpus_loss(model, held_out_rows, max(1, s.eval_batch // 4), env)
    env.sync()
    result["eval_seconds"] = time.perf_counter() - started
    return result


# ====================================================================== LoRA training
WARMUP_STEPS = 2  # steps left out of the median step time


def train_adapters(base, plan: Plan, seed: int, examples: list[Example], pad_id: int, steps: int, s: Settings,
                   env: Env):
    """Copy of the frozen base + the plan's adapters (attached and verified), trained `steps` steps."""
    model = attach(copy.deepcopy(base), plan, LoraSection(init_seed=seed))
    if s.frozen_prefix:
        FrozenPrefix(model, plan.layers_path, plan.lowest_adapted_layer).apply()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lora_lr, weight_decay=0.0, fused=env.cuda)
    schedule = StepSchedule(len(examples), s.lora_batch, 1, 1, seed)
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    step_seconds, losses = [], []
    env.sync()
    started = time.perf_counter()
    for step in range(steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(s.lora_lr, step / steps, s.lora_warmup / steps, floor=0.0)
        indices = next(schedule.micro_batches(step, 0))
        batch = to_device(collate([examples[i] for i in indices], pad_id), env)
        with env.autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # syncs the device, so each step's time is its own
        step_seconds.append(time.perf_counter() - began)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"LoRA training ({plan.rule}): non-finite loss at step {step + 1}")
    seconds = time.perf_counter() - started
    warm = step_seconds[min(len(step_seconds) - 1, WARMUP_STEPS):]  # first steps pay for allocator/kernel warm-up
    stats = {"train_seconds": seconds, "step_seconds_median": statistics.median(warm),
             "trainable_params": sum(p.numel() for p in params), "train_loss_first": losses[0],
             "train_loss_last": statistics.fmean(losses[-max(1, steps // 10):])}
    if env.cuda:
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return model, stats


# ====================================================================== plans and cost model
def calibrate(base, layout, examples: list[Example], pad_id: int, s: Settings, env: Env) -> CostModel:
    """aletheia_ds.speed.calibrate on a copy of the base, with one real task batch, executed as the arms are
    (float32 adapters under bf16 autocast on the GPU), so the cost model describes the arms' steps."""
    from aletheia_ds.speed import calibrate as time_and_fit

    batch = collate(examples[:s.lora_batch], pad_id)
    with env.autocast():
        return time_and_fit(copy.deepcopy(base), layout, batch, steps=s.calibration_steps, warmup=WARMUP_STEPS,
                            log=lambda line: log(f"  {line}"))


def lora_settings(s: Settings, **rule) -> PlanSection:
    return PlanSection(attention_r=s.attention_r, mlp_r=s.mlp_r, **rule)


def budget_plan(report: ProbeReport, cost: CostModel, s: Settings, notes: list[str]) -> Plan:
    """The budgeted plan; a budget below the cheapest possible plan is raised in steps of 0.05 and noted."""
    budget = s.budget
    while True:
        try:
            return make_plan(report, lora_settings(s, rule="budget", budget=budget), cost)
        except ConfigError as err:
            if budget >= 1.0:
                raise
            raised = round(min(1.0, budget + 0.05), 2)
            notes.append(f"budget {budget} infeasible on this device's cost model ({err}); raised to {raised}")
            log(f"  {notes[-1]}")
            budget = raised


def random_layers_like(report: ProbeReport, reference: Plan, seed: int, cost: CostModel) -> Plan:
    """The ablation: `reference`'s layer count, per-layer modules and ranks, on layers drawn at random."""
    drawn = sorted(random.Random(f"random-layers:{seed}").sample(range(report.num_layers), len(reference.layers)))
    moved = dict(zip(reference.layers, drawn))  # i-th lowest planned layer -> i-th lowest drawn layer
    modules = [dataclasses.replace(m, layer=moved[m.layer]) for m in reference.modules]
    plan = Plan(rule="random", num_layers=report.num_layers, layers_path=reference.layers_path, layers=drawn,
                modules=modules, score_captured=captured(report, modules), settings=dict(reference.settings),
                model=report.model).check()
    plan.predicted = cost.describe(plan)
    return plan


def plan_summary(plan: Plan) -> dict:
    return {"rule": plan.rule, "layers": plan.layers, "lowest_adapted_layer": plan.lowest_adapted_layer,
            "adapters": len(plan.modules), "modules": [[m.layer, m.key, m.r] for m in plan.modules],
            "score_captured": plan.score_captured,
            "predicted_fraction_of_uniform": plan.predicted.get("fraction_of_uniform"),
            "predicted_step_seconds": plan.predicted.get("step_seconds")}


# ====================================================================== summary, goals, outputs
SUMMARY_METRICS = ("task_loss", "exact_match", "forgetting", "corpus_loss", "train_seconds", "step_seconds_median",
                   "eval_seconds", "trainable_params", "score_captured")


def mean_std(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for metric in SUMMARY_METRICS:
        values = [r["plan"][metric] if metric == "score_captured" else r[metric] for r in runs]
        out[metric] = mean_std(values)
    for task in TASKS:
        out[f"exact_match_{task.name}"] = mean_std([r["exact_match_by_task"][task.name] for r in runs])
    return out


def goals(arms: dict) -> list[dict]:
    """The study's goals, evaluated on the seed means (met: True / False; None when an arm is missing)."""
    def m(arm, metric):
        return arms[arm]["summary"][metric]["mean"] if arm in arms else None

    def sd(arm, metric):
        return arms[arm]["summary"][metric]["std"]

    results = []
    if "budget" in arms and "uniform" in arms:
        b, u = m("budget", "task_loss"), m("uniform", "task_loss")
        results.append({"goal": "budgeted task loss within 1% of uniform", "met": b <= 1.01 * u,
                        "detail": f"budget {b:.4f} +- {sd('budget', 'task_loss'):.4f} vs uniform {u:.4f} +- "
                                  f"{sd('uniform', 'task_loss'):.4f} ({100 * (b / u - 1):+.2f}%)"})
        b, u = m("budget", "exact_match"), m("uniform", "exact_match")
        results.append({"goal": "budgeted exact match within 1 point of uniform", "met": b >= u - 0.01,
                        "detail": f"budget {100 * b:.1f}% +- {100 * sd('budget', 'exact_match'):.1f} vs uniform "
                                  f"{100 * u:.1f}% +- {100 * sd('uniform', 'exact_match'):.1f} "
                                  f"({100 * (b - u):+.1f} points)"})
        b, u = m("budget", "forgetting"), m("uniform", "forgetting")
        results.append({"goal": "budgeted forgetting <= uniform's", "met": b <= u,
                        "detail": f"budget {b:+.4f} +- {sd('budget', 'forgetting'):.4f} vs uniform {u:+.4f} +- "
                                  f"{sd('uniform', 'forgetting'):.4f} (rise of held-out corpus loss, nats/token)"})
        b, u = m("budget", "step_seconds_median"), m("uniform", "step_seconds_median")
        results.append({"goal": "(context) budgeted step time vs uniform", "met": None,
                        "detail": f"{b / u:.2f}x uniform's measured step time ({1000 * b:.1f} vs {1000 * u:.1f} ms)"})
    if "budget" in arms and "random" in arms:
        b, r = m("budget", "task_loss"), m("random", "task_loss")
        pairs = list(zip(arms["budget"]["summary"]["task_loss"]["values"],
                         arms["random"]["summary"]["task_loss"]["values"]))
        wins = sum(x < y for x, y in pairs)
        be, re_ = m("budget", "exact_match"), m("random", "exact_match")
        results.append({"goal": "gradient-guided beats random layers at the same budget", "met": b < r and be >= re_,
                        "detail": f"task loss {b:.4f} vs {r:.4f} (lower in {wins}/{len(pairs)} seeds); exact match "
                                  f"{100 * be:.1f}% vs {100 * re_:.1f}%"})
    return results


def fmt(summary: dict, metric: str, scale: float = 1.0, digits: int = 4, sign: bool = False) -> str:
    entry = summary[metric]
    mean = f"{scale * entry['mean']:+.{digits}f}" if sign else f"{scale * entry['mean']:.{digits}f}"
    return f"{mean} ± {scale * entry['std']:.{digits}f}"


def render_table(results: dict) -> str:
    arms, base = results["arms"], results["base"]
    uniform_step = arms["uniform"]["summary"]["step_seconds_median"]["mean"] if "uniform" in arms else None
    seeds = max((a["summary"]["task_loss"]["n"] for a in arms.values()), default=0)
    lines = [f"Command: `{results['command']}`  ",
             f"Device: {results['device']}; {seeds} seeds (mean ± std); base model "
             f"{results['base']['params'] / 1e6:.1f}M "
             f"parameters, {results['base']['pretrain']['steps_done']} pretraining steps "
             f"({results['base']['pretrain']['tokens_seen'] / 1e6:.1f}M tokens, stopped by "
             f"{results['base']['pretrain']['stopped_by']}); probe {results['probe']['seconds']:.2f} s "
             f"({results['probe']['batches']} batches); LoRA {results['settings']['lora_steps']} steps x "
             f"{results['settings']['lora_batch']} examples per arm and seed.", "",
             "| arm | layers | adapters | trainable params | task loss | exact match % | forgetting (Δ corpus loss) "
             "| step ms | step vs uniform (predicted / measured) | train s | probe s |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base model (no LoRA) | – | – | 0 | {base['task_loss']:.4f} | {100 * base['exact_match']:.1f} | 0 "
             "| – | – | – | – |"]
    probe_s = results["probe"]["seconds"]
    for name, arm in arms.items():
        summary, runs = arm["summary"], arm["runs"]
        layer_sets = sorted({tuple(r["plan"]["layers"]) for r in runs})
        layers = str(list(layer_sets[0])) if len(layer_sets) == 1 else \
            f"{len(runs[0]['plan']['layers'])} random per seed"
        predicted = runs[0]["plan"]["predicted_fraction_of_uniform"]
        measured = summary["step_seconds_median"]["mean"] / uniform_step if uniform_step else float("nan")
        lines.append(f"| {name} | {layers} | {runs[0]['plan']['adapters']} | "
                     f"{int(summary['trainable_params']['mean']):,} | "
                     f"{fmt(summary, 'task_loss')} | {fmt(summary, 'exact_match', 100, 1)} | "
                     f"{fmt(summary, 'forgetting', sign=True)} | {fmt(summary, 'step_seconds_median', 1000, 1)} | "
                     f"{predicted:.2f} / {measured:.2f} | {fmt(summary, 'train_seconds', 1, 1)} | "
                     f"{f'{probe_s:.2f}' if name in PROBE_GUIDED else '–'} |")
    lines += ["", "Exact match by task (%):", "", "| arm | " + " | ".join(t.name for t in TASKS) + " |",
              "|---|" + "---|" * len(TASKS),
              "| base model | " + " | ".join(f"{100 * base['exact_match_by_task'][t.name]:.1f}" for t in TASKS) + " |"]
    for name, arm in arms.items():
        cells = [fmt(arm["summary"], f"exact_match_{t.name}", 100, 1) for t in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Goals (on the seed means):", ""]
    for goal in results["goals"]:
        mark = {True: "met", False: "MISSED", None: "–"}[goal["met"]]
        lines.append(f"- **{goal['goal']}**: {mark} — {goal['detail']}")
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    timings = results["timings_s"]
    lines += ["", "Time split (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"


def render_chart(results: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("chart: matplotlib is not installed; run `python tools/quality_study.py --render results.json` elsewhere")
        return None
    arms = results["arms"]
    names = list(arms)
    colors = [ARM_COLORS[n] for n in names]
    panels = [("task_loss", 1.0, "held-out task loss"), ("exact_match", 100.0, "exact match %"),
              ("forgetting", 1.0, "forgetting: Δ held-out corpus loss"), ("step_seconds_median", 1000.0, "step ms")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, scale, title) in zip(axes.flat, panels):
        means = [scale * arms[n]["summary"][metric]["mean"] for n in names]
        stds = [scale * arms[n]["summary"][metric]["std"] for n in names]
        ax.bar(names, means, yerr=stds, color=colors, capsize=4)
        for n_index, name in enumerate(names):
            ax.scatter([n_index] * len(arms[name]["summary"][metric]["values"]),
                       [scale * v for v in arms[name]["summary"][metric]["values"]], color="black", s=8, zorder=3)
        if metric == "task_loss":
            ax.axhline(results["base"]["task_loss"], color="black", linestyle=":", label="base model")
            low = min(m - s for m, s in zip(means, stds))
            ax.set_ylim(low - 0.1 * abs(low), None)
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    ax = axes.flat[4]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [100 * arms[name]["summary"][f"exact_match_{t.name}"]["mean"] for t in TASKS]
        ax.bar([x + i * width for x in range(len(TASKS))], values, width, color=ARM_COLORS[name], label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(TASKS))], [t.name for t in TASKS])
    ax.set_title("exact match % by task")
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    scores = results["probe"]["layer_scores"]
    count = len(scores)
    per_layer = len(results["probe"]["report"]["layout"]["module_kinds"])
    for i, name in enumerate(names):
        for run_index, run in enumerate(arms[name]["runs"]):
            y = i + (run_index - (len(arms[name]["runs"]) - 1) / 2) * 0.12
            adapted = [layer for layer, _key, _r in run["plan"]["modules"]]
            layers = sorted(set(adapted))
            # marker area: the share of the layer's linears adapted (the budget rule may take part of a layer)
            sizes = [6 + 30 * adapted.count(layer) / per_layer for layer in layers]
            ax.scatter(layers, [y] * len(layers), color=ARM_COLORS[name], s=sizes)
    ax.set_xticks(range(count))
    twin = ax.twinx()
    twin.plot(range(count), scores, color="black", linewidth=1)
    twin.set_ylabel("probe score (black line)")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("decoder layer")
    ax.set_title("adapted layers per arm and seed")
    fig.suptitle(f"LoRA layer selection on a {results['base']['params'] / 1e6:.3g}M-parameter base model "
                 f"({results['device']}, mean ± std over seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_outputs(results: dict, out: Path) -> None:
    write_json_atomic(out / "results.json", results)
    if results["arms"]:
        write_text_atomic(out / "table.md", render_table(results))
        render_chart(results, out / "chart.png")


# ====================================================================== the study
def study(s: Settings, command: str) -> dict:
    import peft
    import transformers

    clock = Clock()
    if s.threads:
        torch.set_num_threads(s.threads)
    env = Env(torch.device("cuda" if (s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available()))
                           else "cpu"), torch.float32)
    if env.cuda:
        env.dtype = torch.bfloat16  # the frozen base of the arms; pretraining keeps float32 weights under autocast
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(env.device) if env.cuda else f"CPU ({os.cpu_count()} cores)"
    log(f"quality study on {device_name}: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}")
    notes: list[str] = []
    results = {"command": command, "settings": dataclasses.asdict(s), "device": device_name,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "python": sys.version.split()[0]},
               "notes": notes, "arms": {}, "goals": [], "timings_s": clock.phases}

    with clock.phase("corpus"):
        corpus = load_corpus(s.corpus_mb, s.held_out_every)
    log(f"corpus: {corpus.stats['train_files']} train / {corpus.stats['held_out_files']} held-out files, "
        f"{corpus.stats['train_chars'] / 1e6:.1f}M + {corpus.stats['held_out_chars'] / 1e6:.2f}M chars "
        f"({corpus.stats['chars_by_source']})")
    with clock.phase("tokenizer"):
        tokenizer = train_tokenizer(corpus.train, s.vocab_size, int(s.tokenizer_mb * 1e6))
        stream = encode_documents(tokenizer, corpus.train)
        held_out_rows = windows(encode_documents(tokenizer, corpus.held_out), s.seq_len + 1, s.corpus_eval_windows)
        data = build_task_data(tokenizer, s)
    corpus.stats.update(train_tokens=len(stream), held_out_windows=len(held_out_rows), vocab_size=len(tokenizer))
    results["corpus"] = corpus.stats
    results["tasks"] = data.counts
    log(f"tokens: {len(stream) / 1e6:.2f}M train, {len(held_out_rows)} held-out windows of {s.seq_len}; tasks: "
        f"{data.counts['train']} train examples (mean {data.counts['mean_tokens']:.0f} tokens)")

    # ------------------------------------------------------------ base model
    with clock.phase("pretrain"):
        model = build_model(s, tokenizer, s.data_seed)
        params = sum(p.numel() for p in model.parameters())
        log(f"base model: {params / 1e6:.1f}M parameters ({s.layers} layers, hidden {s.hidden}); pretraining "
            f"{s.pretrain_steps} steps x {s.pretrain_batch} x {s.seq_len} tokens")
        pretrain_stats = pretrain(model, stream, s, env, s.time_budget_s - s.reserve_s, clock)
        if pretrain_stats["stopped_by"] == "time":
            notes.append(f"pretraining stopped by time after {pretrain_stats['steps_done']}/{s.pretrain_steps} steps "
                         f"({pretrain_stats['seconds']:.0f} s)")
    base = model.to(env.dtype).eval()
    base.requires_grad_(False)
    with clock.phase("base_eval"):
        base_eval = evaluate(base, tokenizer, data, held_out_rows, s, env)
    results["base"] = {"params": params, "pretrain": pretrain_stats, **base_eval}
    log(f"base: held-out corpus loss {base_eval['corpus_loss']:.3f} (ln vocab {math.log(len(tokenizer)):.2f}); task "
        f"loss {base_eval['task_loss']:.3f}; exact match {100 * base_eval['exact_match']:.1f}%; "
        f"pretraining {pretrain_stats['steps_done']} steps in {pretrain_stats['seconds']:.0f} s "
        f"({pretrain_stats['step_ms']:.0f} ms/step, {pretrain_stats['epochs']:.2f} epochs)")

    # ------------------------------------------------------------ probe and plans
    layout = describe(base)
    pad_id = tokenizer.pad_token_id
    with clock.phase("probe"):
        started = time.perf_counter()
        probe_batches = fixed_batches(data.train, s.probe_batch, s.probe_batches, pad_id)
        report = run_probe(base, layout, probe_batches, lambda b: base(**to_device(b, env)).loss,
                           model_name=f"quality-study base ({params / 1e6:.0f}M)")
        env.sync()
        probe_wall = time.perf_counter() - started
    results["probe"] = {"seconds": report.seconds, "wall_seconds": probe_wall, "batches": report.batches,
                        "tokens": report.tokens, "layer_scores": report.layer_scores(), "report": report.to_json()}
    log(f"probe: {report.batches} batches, {report.tokens} tokens, {report.seconds:.2f} s; layer scores "
        + " ".join(f"{x:.3g}" for x in report.layer_scores()))
    arms_wanted = s.arms.split(",")
    with clock.phase("calibration"):
        if s.cost == "calibrated":
            cost = calibrate(base, layout, data.train, pad_id, s, env)
        else:
            cost = CostModel.analytic(report, checkpointing=False)
    results["cost_model"] = cost.to_json()
    fixed_plans = {}
    if "uniform" in arms_wanted:
        uniform = PlanSection(rule="all", attention_r=s.uniform_r, mlp_r=s.uniform_r)
        fixed_plans["uniform"] = make_plan(report, uniform, cost)
    if "paper" in arms_wanted:
        fixed_plans["paper"] = make_plan(report, lora_settings(s, rule="top_pct", top_pct=s.top_pct), cost)
    if "budget" in arms_wanted:
        fixed_plans["budget"] = budget_plan(report, cost, s, notes)
    if "upper" in arms_wanted:
        fixed_plans["upper"] = make_plan(report, lora_settings(s, rule="upper", top_pct=s.top_pct), cost)
    for name, plan in fixed_plans.items():
        log(f"plan {name}: layers {plan.layers}, {len(plan.modules)} adapters, captures {plan.score_captured:.1%} of "
            f"the probe's energy, predicted {plan.predicted['fraction_of_uniform']:.2f}x uniform's step time")

    # ------------------------------------------------------------ arms, seed by seed
    runs: dict[str, list[dict]] = {name: [] for name in arms_wanted}
    last_round_s = 0.0
    for round_index, seed in enumerate(range(s.seeds)):
        left = s.time_budget_s - clock.elapsed()
        if round_index and last_round_s * 1.05 > left:
            notes.append(f"stopped after {round_index} of {s.seeds} seeds: a round takes ~{last_round_s:.0f} s and "
                         f"{left:.0f} s of the {s.time_budget_s:.0f} s budget were left")
            log(f"  {notes[-1]}")
            break
        round_started = time.perf_counter()
        with clock.phase("arms"):
            for name in arms_wanted:
                plan = random_layers_like(report, fixed_plans["budget"], seed, cost) if name == "random" \
                    else fixed_plans[name]
                model, stats = train_adapters(base, plan, seed, data.train, pad_id, s.lora_steps, s, env)
                evaluation = evaluate(model, tokenizer, data, held_out_rows, s, env)
                del model
                run = {"arm": name, "seed": seed, "plan": plan_summary(plan), **stats, **evaluation,
                       "forgetting": evaluation["corpus_loss"] - base_eval["corpus_loss"]}
                if name == "random":
                    run["same_layers_as_budget"] = plan.layers == fixed_plans["budget"].layers
                runs[name].append(run)
                log(f"  seed {seed} {name:8s} task loss {run['task_loss']:.4f}  exact match "
                    f"{100 * run['exact_match']:5.1f}%  forgetting {run['forgetting']:+.4f}  step "
                    f"{1000 * run['step_seconds_median']:.1f} ms  train {run['train_seconds']:.1f} s  "
                    f"eval {run['eval_seconds']:.1f} s  layers {plan.layers}")
        last_round_s = time.perf_counter() - round_started
        results["arms"] = {name: {"label": ARM_LABELS[name], "runs": r, "summary": summarize(r)}
                           for name, r in runs.items() if r}
        results["goals"] = goals(results["arms"])
        results["seeds_completed"] = round_index + 1
        results["timings_s"] = dict(clock.phases, total=clock.elapsed())
        write_outputs(results, out)  # after every round: a run cut short still leaves complete seeds
    results["imported"] = sorted({m.split(".")[0] for m in sys.modules} & {"deepspeed", "ray"})  # must stay empty
    results["timings_s"] = dict(clock.phases, total=clock.elapsed())
    write_outputs(results, out)
    return results


# ====================================================================== the estimate
H200_BF16_FLOPS = 7.9e14  # bf16 8192^3 matmul rate measured on one H200
PRETRAIN_MFU = 0.35  # ~100M parameters at 32k tokens per step: large matmuls, roughly a third of the peak
SMALL_STEP_MFU = 0.15  # LoRA steps on short task rows: small matmuls
HOST_S_PER_OP = 8e-6  # eager PyTorch on a GPU: dispatch + launch + module Python per ATen op (a lead, not measured)
GENERATE_S_PER_TOKEN = 2e-3  # transformers' generate loop overhead per new token, beyond the model's ops


def count_ops(fn: Callable[[], object]) -> int:
    """ATen operators one call of `fn` dispatches; on a GPU each costs host time and most launch a kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.ops


def estimate(s: Settings) -> dict:
    """Expected GPU seconds per phase of `study(s)`, from a CPU run of the pieces.

    CPU phases (corpus, tokenizer, task data) are timed here at full size: the GPU host has 16 cores, so
    they are upper bounds. Device phases: a step costs max(FLOPs / (peak x efficiency), ops x host cost
    per op), with the ops counted here on the real model and plans (batch 1: the count does not depend
    on the batch) and the FLOPs from the sizes.
    """
    clock = Clock()
    with clock.phase("corpus"):
        corpus = load_corpus(s.corpus_mb, s.held_out_every)
    with clock.phase("tokenizer"):
        tokenizer = train_tokenizer(corpus.train, s.vocab_size, int(s.tokenizer_mb * 1e6))
        encode_documents(tokenizer, corpus.train + corpus.held_out)
        data = build_task_data(tokenizer, s)
    task_tokens = data.counts["mean_tokens"]
    model = build_model(s, tokenizer, 0)
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - model.get_input_embeddings().weight.numel()  # the embedding is a lookup
    ids = torch.randint(0, len(tokenizer), (1, s.seq_len + 1))
    optimizer_ops = 40  # fused AdamW + foreach clipping: a few multi-tensor kernels

    def pretrain_step():
        logits = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).backward()

    pretrain_ops = count_ops(pretrain_step) + optimizer_ops
    attention_flops = 6 * s.layers * s.hidden * s.seq_len  # per token: causal scores and values, fwd + bwd
    step_flops = (6 * matmul_params + attention_flops) * s.pretrain_batch * s.seq_len
    pretrain_step_s = max(step_flops / (H200_BF16_FLOPS * PRETRAIN_MFU), pretrain_ops * HOST_S_PER_OP)
    model.requires_grad_(False)
    report = ProbeReport(model="estimate", num_layers=s.layers, tokens=0, seconds=0.0, batches=1, layers=[],
                         layout=describe(model).to_json())
    from aletheia_ds.probe.report import LayerScore

    # probe scores do not change op counts; a falling profile makes the paper rule pick the lower half
    report.layers = [LayerScore(i, float(s.layers - i), {k: float(s.layers - i) for k in report.layout["module_kinds"]})
                     for i in range(s.layers)]
    plans = {"uniform": make_plan(report, PlanSection(rule="all", attention_r=s.uniform_r, mlp_r=s.uniform_r)),
             "paper": make_plan(report, lora_settings(s, rule="top_pct", top_pct=s.top_pct)),
             "upper": make_plan(report, lora_settings(s, rule="upper", top_pct=s.top_pct))}
    x = torch.randint(0, len(tokenizer), (1, max(2, round(task_tokens))))
    lora_step_s = {}
    for name, plan in plans.items():
        peft_model = attach(copy.deepcopy(model), plan)
        FrozenPrefix(peft_model, plan.layers_path, plan.lowest_adapted_layer).apply()
        ops = count_ops(lambda: peft_model(input_ids=x, labels=x).loss.backward()) + optimizer_ops
        depth = (s.layers - plan.lowest_adapted_layer) / s.layers
        flops = 2 * matmul_params * (1 + depth) * s.lora_batch * task_tokens  # forward + input grads of the span
        lora_step_s[name] = max(flops / (H200_BF16_FLOPS * SMALL_STEP_MFU), ops * HOST_S_PER_OP)
    # the budgeted plan and its random twin: assumed at the budget (the calibration makes it so on the GPU)
    lora_step_s["budget"] = lora_step_s["random"] = s.budget * lora_step_s["uniform"]
    forward_ops = count_ops(lambda: model(input_ids=x))
    decode_ops = count_ops(lambda: model(input_ids=x[:, :1]))
    decode_rows = 3 * s.em_per_task
    longest_completion = 40  # tokens; arithmetic answers are the longest
    decode_s = math.ceil(decode_rows / s.em_batch) * longest_completion * (decode_ops * HOST_S_PER_OP +
                                                                          GENERATE_S_PER_TOKEN)
    loss_batches = math.ceil(3 * s.eval_per_task / s.eval_batch) + math.ceil(s.corpus_eval_windows /
                                                                            max(1, s.eval_batch // 4))
    loss_s = loss_batches * forward_ops * HOST_S_PER_OP * 3
    eval_s = decode_s + loss_s
    attach_s = 0.5  # deepcopy of the base + PEFT wrapping + verification
    arms = [a for a in s.arms.split(",")]
    arms_s = s.seeds * sum(s.lora_steps * lora_step_s[a] + eval_s + attach_s for a in arms)
    calibration_s = 6 * ((s.calibration_steps + WARMUP_STEPS) * lora_step_s["uniform"] + attach_s)  # + a warm-up run
    split = {"start: imports, CUDA init (guess)": 20.0,
             f"corpus + tokenizer + task data (timed here: {os.cpu_count()} CPU cores)":
                 clock.phases["corpus"] + clock.phases["tokenizer"],
             "pretrain": min(s.pretrain_max_s, s.pretrain_steps * pretrain_step_s), "base eval": eval_s,
             "probe": 2.0, "calibration": calibration_s, f"arms: {len(arms)} x {s.seeds} seeds": arms_s}
    split["total"] = sum(split.values())
    return {"params": params, "task_tokens_mean": task_tokens, "pretrain_ops_per_step": pretrain_ops,
            "pretrain_step_s": pretrain_step_s, "pretrain_steps_in_cap": s.pretrain_max_s / pretrain_step_s,
            "lora_step_s": lora_step_s, "eval_s_per_run": eval_s, "split_s": split,
            "assumptions": {"bf16_flops": H200_BF16_FLOPS, "pretrain_mfu": PRETRAIN_MFU,
                            "small_step_mfu": SMALL_STEP_MFU, "host_s_per_op": HOST_S_PER_OP,
                            "generate_s_per_token": GENERATE_S_PER_TOKEN}}


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    command = "python tools/quality_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.render:
        path = Path(args.render)
        results = json.loads(path.read_text(encoding="utf-8"))
        out = Path(settings.out) if args.out else path.parent
        write_outputs(results, out)
        print(render_table(results))
        return 0
    if args.estimate:
        torch.manual_seed(0)
        result = estimate(settings)
        print(json.dumps(result, indent=2))
        print("\nexpected GPU time split (s):")
        for name, seconds in result["split_s"].items():
            print(f"  {name:62s} {seconds:7.1f}")
        return 0
    torch.manual_seed(settings.data_seed)
    results = study(settings, command)
    print()
    print(render_table(results), end="")
    print(f"\nwrote {Path(settings.out) / 'results.json'}, table.md, chart.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
