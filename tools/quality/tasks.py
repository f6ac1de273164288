"""Tasks with exact answers, graded in difficulty; each is a parameter of the study (`--tasks`).

  arithmetic    two- and three-step word problems (the completion shows the expression, then the answer)
  json          key=value lines -> one JSON object: a pure format shift, the control (no knowledge needed)
  stdlib_body   a real standard-library function's signature and docstring -> its (short) body; split by
                module (train / validation / test modules never share one), so the test bodies come from
                modules only the pretraining saw: the task needs what the base learned there
  function      docstring -> one-line body from 14 templates (easy; kept for re-runs)
Every task yields train / validation (learning-rate choice) / test (loss, learning curves) / decode
(exact match) rows that never share a prompt.
"""

from __future__ import annotations

import ast
import json
import random
import re
import statistics
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from aletheia_ds.data import Example, load_examples
from tools.quality.corpus import is_held_out, key_hash, stdlib_root

# ---------------------------------------------------------------- generated tasks
NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "tickets", "cards", "stickers"]
WORDS = [
    "red",
    "oslo",
    "lima",
    "blue",
    "delta",
    "maple",
    "river",
    "stone",
    "amber",
    "cedar",
    "pixel",
    "nova",
    "quartz",
    "tango",
    "ember",
    "fjord",
    "lotus",
    "orbit",
    "prism",
    "sable",
]
KEYS = [
    "name",
    "age",
    "city",
    "color",
    "count",
    "size",
    "id",
    "level",
    "active",
    "score",
    "tag",
    "price",
    "year",
    "owner",
    "mode",
    "rank",
]


def arithmetic_problem(rng: random.Random) -> dict:
    """Two- and three-step word problems; the completion shows the expression, then the answer."""
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    # small operands (times-table products, sums under ~100): the old 5..60 x 2..12 range left exact match near 3%
    a, b, c = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 9)
    kind = rng.randrange(5)
    if kind == 0:
        d = rng.randint(1, a)
        text = (
            f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} each, then gives away {d}. "
            f"How many {item} does {name} have now?"
        )
        expr, value = f"{a} + {b} * {c} - {d}", a + b * c - d
    elif kind == 1:
        d = rng.randint(1, a)
        text = f"{name} has {b} boxes of {c} {item} and finds {a} more, then loses {d}. How many {item} are there?"
        expr, value = f"{b} * {c} + {a} - {d}", b * c + a - d
    elif kind == 2:
        d = rng.randint(1, 30)
        text = f"{name} starts with {a} {item}, doubles them, and then buys {d} more. How many {item} are there?"
        expr, value = f"{a} * 2 + {d}", a * 2 + d
    elif kind == 3:
        text = f"{name} has {a} {item} and {other} has {b} times as many. How many {item} do they have together?"
        expr, value = f"{a} + {a} * {b}", a + a * b
    else:
        per = rng.randint(2, 9)
        total = per * b
        text = (
            f"{name} shares {total} {item} equally among {b} friends and keeps {c} more. "
            f"How many {item} does each friend get plus {name}'s {c}?"
        )
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


# ---------------------------------------------------------------- stdlib_body: knowledge from pretraining
MAX_BODY_CHARS = 160
MAX_DOC_CHARS = 240


def _docstring_line(doc: str) -> str:
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return first[:MAX_DOC_CHARS].replace('"""', "'''").replace("\\", "\\\\")


def stdlib_functions(held_out_every: int) -> list[dict]:
    """Short documented functions of the stdlib files the pretraining trained on (not its held-out files)."""
    root = stdlib_root()
    found, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"} & set(relative.parts):
            continue
        key = f"stdlib/{relative}"
        if is_held_out(key, held_out_every):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node)
            body = node.body[1:]
            if (
                not doc
                or len(body) > 3
                or any(
                    isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                    for b in body
                    for n in ast.walk(b)
                )
            ):
                continue
            text = textwrap.dedent("\n".join(lines[body[0].lineno - 1 : body[-1].end_lineno]))
            if len(text) > MAX_BODY_CHARS or not text.strip() or "\t" in text:
                continue
            prompt = (
                f'# module: {module}\ndef {node.name}({ast.unparse(node.args)}):\n    """{_docstring_line(doc)}"""\n'
            )
            if prompt in seen:
                continue
            seen.add(prompt)
            found.append({"module": module, "prompt": prompt, "completion": textwrap.indent(text, "    ")})
    return found


def module_split(module: str) -> str:
    """Whole modules go to one split: 3 in 5 train, 1 validation, 1 test."""
    bucket = key_hash("module:" + module.split(".")[0]) % 5
    return {0: "test", 1: "validation"}.get(bucket, "train")


def body_answer(text: str) -> Optional[str]:
    """The indented block the completion starts with, whitespace-normalized."""
    kept = []
    for line in text.split("\n"):
        if not line.strip() or not line[:1].isspace():
            if kept:
                break
            continue
        kept.append(line)
    return " ".join(" ".join(kept).split()) or None


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Task:
    name: str
    make: Optional[Callable[[random.Random], dict]]  # generated tasks; None: rows come from `fixed_rows`
    answer: Callable[[str], Optional[str]]  # completion text -> the final answer compared for exact match
    kind: str  # what it measures: reasoning, format (control), knowledge, copy


TASKS = (
    Task("arithmetic", arithmetic_problem, arithmetic_answer, "reasoning"),
    Task("json", json_problem, json_answer, "format"),
    Task("stdlib_body", None, body_answer, "knowledge"),
    Task("function", function_problem, function_answer, "copy"),
)
TASKS_BY_NAME = {t.name: t for t in TASKS}
DEFAULT_TASKS = "arithmetic,json,stdlib_body"


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


def split_rows(task: Task, seed: int, counts: dict[str, int], held_out_every: int) -> dict[str, list[dict]]:
    """Rows of every split (train, validation, test, decode) for one task."""
    if task.make is not None:
        rows = task_rows(task, seed, sum(counts.values()))
        out, start = {}, 0
        for split, count in counts.items():
            out[split] = rows[start : start + count]
            start += count
        return out
    functions = stdlib_functions(held_out_every)
    random.Random(f"{task.name}:{seed}").shuffle(functions)
    by_split = {"train": [], "validation": [], "test": []}
    for row in functions:
        by_split[module_split(row["module"])].append({"prompt": row["prompt"], "completion": row["completion"]})
    test = by_split["test"]
    decode = test[: counts["decode"]]
    loss_rows = test[counts["decode"] :] or test  # a thin test split shares rows between loss and decoding
    train = by_split["train"]
    return {
        "train": [train[i % len(train)] for i in range(counts["train"])],  # cycled: a finite corpus
        "validation": by_split["validation"][: counts["validation"]],
        "test": loss_rows[: counts["test"]],
        "decode": decode,
    }


@dataclass
class TaskData:
    tasks: list[str]
    train: list[Example]  # every task, interleaved: each batch mixes them
    validation: dict[str, list[Example]]  # per task: the learning-rate choice
    test: dict[str, list[Example]]  # per task: task loss and learning curves
    decode: dict[str, list[dict]]  # per task: rows decoded for exact match
    counts: dict


def build_task_data(
    tokenizer, names: list[str], seed: int, counts: dict[str, int], seq_len: int, held_out_every: int, log=print
) -> TaskData:
    """Rows -> JSONL -> aletheia_ds.data.load_examples: the package's prompt/completion path, loss on the completion."""

    def examples(rows: list[dict], path: Path) -> list[Example]:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_examples(path, tokenizer, seq_len, log=log)

    per_task = {name: split_rows(TASKS_BY_NAME[name], seed, counts, held_out_every) for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        mixed = [row for group in zip(*(per_task[n]["train"] for n in names)) for row in group]
        train = examples(mixed, Path(tmp) / "train.jsonl")
        validation = {n: examples(per_task[n]["validation"], Path(tmp) / f"{n}_val.jsonl") for n in names}
        test = {n: examples(per_task[n]["test"], Path(tmp) / f"{n}_test.jsonl") for n in names}
    decode = {n: per_task[n]["decode"] for n in names}
    lengths = [len(ex.input_ids) for ex in train]
    summary = {
        "train": len(train),
        "validation": {k: len(v) for k, v in validation.items()},
        "test": {k: len(v) for k, v in test.items()},
        "decode": {k: len(v) for k, v in decode.items()},
        "mean_tokens": statistics.fmean(lengths),
        "max_tokens": max(lengths),
        "distinct_train_rows": {n: len({r["prompt"] for r in per_task[n]["train"]}) for n in names},
    }
    for name in names:
        if not validation[name] or not test[name] or not decode[name]:
            raise SystemExit(f"task {name}: an empty split ({summary}); lower --eval-per-task or --em-per-task")
    return TaskData(list(names), train, validation, test, decode, summary)
