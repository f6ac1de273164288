"""tools/quality/: generated tasks checked by independent oracles, the stdlib task's module split, the ablation's
plans, plan transfer and projection, the estimate, and the whole study end to end on CPU (--smoke)."""

import ast
import copy
import gzip
import json
import operator
import os
import random
import re
import subprocess
import sys
from fractions import Fraction

import pytest
from helpers.ranks import ROOT
from helpers.reports import known_model, report_with

from aletheia_ds.config import PlanSection
from aletheia_ds.plan import make_plan
from tools.quality import arms, corpus, estimate, speed, tasks
from tools.quality.settings import SMOKE, Settings

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_arithmetic(expression: str) -> Fraction:
    """The completion's expression, evaluated exactly (only + - * / on integers)."""

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            return BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        raise ValueError(f"unexpected expression {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


def test_arithmetic_answers_equal_their_expressions_and_use_the_question_numbers():
    rng = random.Random(0)
    for _ in range(300):
        row = tasks.arithmetic_problem(rng)
        expression, _, rest = row["completion"].strip().partition(" = ")
        answer = tasks.arithmetic_answer(row["completion"])
        assert evaluate_arithmetic(expression) == int(answer) >= 0
        assert rest.startswith(f"{answer}. ")
        numbers = [int(n) for n in re.findall(r"\d+", expression)]
        assert all(str(n) in row["prompt"] or n == 2 for n in numbers)  # "doubles" is the only unwritten number


# oracles written from the docstrings, independent of the body templates
ORACLES = {
    0: (lambda f, x: x * f["k"] + f["m"], [0, 3, -7]),
    1: (lambda f, x: x * x - f["k"], [0, 4, -5]),
    2: (lambda f, x: x // f["k"], [0, 17, -9]),
    3: (lambda f, n: n % f["k"] == 0, [0, 12, 35, 7]),
    4: (lambda f, s: "".join([s] * f["k"]), ["", "ab"]),
    5: (lambda f, s: s[: f["k"]].upper(), ["hello world", "ab"]),
    6: (lambda f, s: "".join(reversed(s)), ["", "abc"]),
    7: (lambda f, s: "".join(f["c2"] if ch == f["c1"] else ch for ch in s), ["abcabc", "hgfe"]),
    8: (lambda f, xs: sum(v for v in xs if v > f["k"]), [[1, 5, 9, 12], []]),
    9: (lambda f, xs: sorted(xs)[::-1], [[3, 1, 2], []]),
    10: (lambda f, xs: sum(1 for v in xs if v == f["k"]), [[2, 3, 3, 9], []]),
    11: (lambda f, xs: xs[len(xs) - min(f["k"], len(xs)) :], [list(range(12)), [1, 2]]),
    12: (lambda f, words: {w: len(w) for w in words}, [["ab", "cde"], []]),
    13: (lambda f, words: [w for w in words if w[:1] == f["c1"]], [["apple", "bee", "abc", ""], []]),
}


def test_function_bodies_do_what_their_docstrings_say():
    assert set(ORACLES) == set(range(len(tasks.FUNCTIONS)))
    rng = random.Random(1)
    for template, (oracle, inputs) in ORACLES.items():
        for _ in range(5):
            row = tasks.function_problem(rng, template)
            namespace = {}
            exec(row["prompt"] + row["completion"] + "\n", namespace)
            function = next(v for k, v in namespace.items() if callable(v) and not k.startswith("__"))
            for value in inputs:
                assert function(value) == oracle(row["fill"], value), (row["prompt"], row["completion"], value)
            assert tasks.function_answer(row["completion"]) == " ".join(row["completion"].split())


def test_json_completions_parse_to_the_key_value_lines():
    rng = random.Random(2)
    for _ in range(300):
        row = tasks.json_problem(rng)
        lines = row["prompt"].split("\n")[1:-1]
        expected = {}
        for line in lines:
            key, raw = line.split("=", 1)
            expected[key] = {"true": True, "false": False}.get(raw, int(raw) if raw.isdigit() else raw)
        assert json.loads(row["completion"]) == expected
        assert list(json.loads(row["completion"])) == [line.split("=")[0] for line in lines]


def test_answer_extraction_reads_the_final_answer_only():
    assert tasks.arithmetic_answer(" 3 + 4 = 7. The answer is 7. Then more") == "7"
    assert tasks.arithmetic_answer(" 3 + 4 = 7.") is None
    assert tasks.function_answer("    return  x * 2\n\ndef other():\n    return 1") == "return x * 2"
    assert tasks.json_answer(' {"b": 1, "a": true}\nmore') == tasks.json_answer('{"a": true, "b": 1}')
    assert tasks.json_answer(' {"a": 1') is None


def test_task_rows_are_deterministic_and_distinct():
    for task in [t for t in tasks.TASKS if t.make is not None]:
        rows = tasks.task_rows(task, 7, 400)
        assert rows == tasks.task_rows(task, 7, 400)
        assert rows != tasks.task_rows(task, 8, 400)
        assert len({r["prompt"] for r in rows}) == 400  # held-out rows are never training rows


def test_random_layers_keep_the_budget_plans_count_modules_and_ranks():
    report = report_with([8, 7, 6, 5, 4, 3, 2, 1])
    cost = known_model(depth_s=0.002)
    budget = make_plan(
        report, PlanSection(rule="budget", budget=0.6, attention_r=16, mlp_r=64, granularity="module"), cost
    )
    per_layer = sorted(
        tuple(sorted((m.key, m.r, m.alpha) for m in budget.modules if m.layer == layer)) for layer in budget.layers
    )
    drawn = set()
    for seed in range(12):
        plan = arms.random_layers_like(report, budget, seed, cost)
        assert plan == arms.random_layers_like(report, budget, seed, cost)  # seeded
        assert len(plan.layers) == len(budget.layers) and len(plan.modules) == len(budget.modules)
        assert (
            sorted(
                tuple(sorted((m.key, m.r, m.alpha) for m in plan.modules if m.layer == layer)) for layer in plan.layers
            )
            == per_layer
        )
        assert plan.predicted["fraction_of_uniform"] > 0
        drawn.add(tuple(plan.layers))
    assert len(drawn) > 3  # really drawn, not the budgeted layers again


def test_stdlib_task_splits_by_module_and_reads_the_body_block():
    assert {tasks.module_split(m) for m in ("json.decoder", "json.encoder", "json")} == {tasks.module_split("json")}
    rows = tasks.split_rows(
        tasks.TASKS_BY_NAME["stdlib_body"], 0, {"train": 50, "validation": 5, "test": 5, "decode": 5}, 20
    )
    modules = {split: {r["prompt"].split("\n")[0] for r in rows[split]} for split in rows}
    assert not modules["train"] & (modules["test"] | modules["decode"] | modules["validation"])
    for row in rows["test"]:
        assert row["prompt"].startswith("# module: ") and '"""' in row["prompt"]
        ast.parse(row["prompt"] + row["completion"])  # a real function, body included
    assert tasks.body_answer("    x = 1\n    return  x\n\ndef other():\n    pass") == "x = 1 return x"
    assert tasks.body_answer("no indent") is None


def test_man_pages_are_read_through_gzip_and_stripped(tmp_path):
    page = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\nMore text.\n'
    (tmp_path / "ls.1.gz").write_bytes(gzip.compress(page.encode()))
    text = corpus._read(tmp_path / "ls.1.gz", "man")
    assert text.splitlines() == ["NAME", "ls  list directory contents", "More text."]


def test_projection_is_linear_in_depth():
    assert speed.project({12: 1.0, 20: 1.8}, 80) == pytest.approx(7.8)
    assert speed.project({10: 1.0}, 80) == pytest.approx(8.0)
    assert speed.pilot_ratio(0.5, 0.1) == pytest.approx(0.55)  # 1 / (p + (1 - p) / S) as a time ratio


def test_estimate_fits_the_device_calls():
    result = estimate.estimate(Settings())
    assert result["stages_s"]["pretrain"] <= 540  # one 9-minute call for both bases
    assert result["arms_calls_of_540_s"] <= 2.0  # two 9-minute calls with 8 workers
    assert result["runs"] == 2 * 11 * (3 + 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_smoke_study_end_to_end(tmp_path):
    """Every stage on CPU: bases, runs (tuned and final), speed of transferred plans, statistics and outputs."""
    out, cache = tmp_path / "quality", tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.quality", "--smoke", "--out", str(out), "--cache", str(cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    context = f"\nnotes: {results['notes']}\n{(out / 'table.md').read_text()}\n{proc.stdout[-2000:]}"
    smoke = Settings(**SMOKE)
    assert set(results["bases"]) == set(smoke.names("bases"))
    runs = json.loads((out / "runs.json").read_text())
    per_base = len(smoke.names("arms")) * (len(smoke.lr_list()) + len(smoke.seed_list()) - 1)
    assert len(runs) == 2 * per_base, context  # every tuning and final run, nothing skipped
    for base, result in results["bases"].items():
        assert result["pretrain"]["steps_done"] > 0
        assert set(result["arms"]) == set(smoke.names("arms")), context
        for name, arm in result["arms"].items():
            assert arm["seeds"] == smoke.seed_list(), (base, name)
            assert arm["lr"] in smoke.lr_list()
            assert arm["task_loss"]["mean"] < result["base_eval"]["task_loss"], (base, name, context)
            assert len(arm["curve_mean"]) == smoke.curve_points
            if name != "matched":
                tost = arm["vs_matched"]["task_loss"]["tost"]
                assert tost["equivalent"] in (True, False) and 0 <= tost["p"] <= 1
                assert arm["vs_matched"]["equal_wall_clock"]["seeds"] == smoke.seed_list()
            assert arm["speed_ratio_at_scale"]["tiny"] > 0
        assert result["arms"]["random"]["vs_reference"]["reference"] == smoke.random_like
    for run in runs:
        assert 0.0 <= run["exact_match"] <= 1.0
        if run["arm"] == "pilot":
            assert run["pilot_step"] >= 1 and "pilot_plan_json" in run
    assert any(g["arm"] == "cut" for g in results["goals"]) and any(g["arm"] == "random" for g in results["goals"])
    assert results["pareto"] and any(p["pareto"] for p in results["pareto"])
    for chart in ("pareto.png", "curves.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second call resumes: nothing is run again, the report comes back the same from the records
    table = (out / "table.md").read_text()
    again = subprocess.run(
        [sys.executable, "-m", "tools.quality", "--smoke", "--stage", "arms", "--cache", str(cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "0 tuning runs" in again.stdout and "all runs done" in again.stdout, again.stdout
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.quality",
            "--smoke",
            "--stage",
            "report",
            "--out",
            str(out),
            "--cache",
            str(cache),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert (out / "table.md").read_text().split("\n", 1)[1] == table.split("\n", 1)[1]  # all but the command line

    # a cache restored from the published folder alone gives the same report, and the speed stage runs on it
    restored, out2 = tmp_path / "restored", tmp_path / "quality2"

    def stage(*args):
        return subprocess.run(
            [sys.executable, "-m", "tools.quality", "--smoke", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = stage("--stage", "restore", "--out", str(out), "--cache", str(restored))
    assert done.returncode == 0 and f"{len(runs)} runs" in done.stdout, done.stdout + done.stderr[-2000:]
    done = stage("--stage", "report", "--out", str(out2), "--cache", str(restored))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out2 / "table.md").read_text().split("\n", 1)[1] == table.split("\n", 1)[1]
    done = stage("--stage", "speed", "--cache", str(restored))
    assert done.returncode == 0, done.stderr[-2000:]
    speed_after = json.loads(next(restored.glob("speed-*.json")).read_text())
    assert set(speed_after["shapes"]["tiny"]["arms"]) == set(results["speed"]["shapes"]["tiny"]["arms"])


def test_production_cost_gives_the_base_the_step_time_shares_of_the_production_shape():
    """A cut at the same share of layers with the same ranks costs the base what it costs the 80-layer shape."""
    from aletheia_ds.cost import CostModel

    base = speed.uniform_report(
        speed.meta_layout(
            dict(
                model_type="llama",
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=8,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=512,
                max_position_embeddings=256,
            )
        )
    )
    cost = speed.production_cost(base, "qwen2-72b")
    big = speed.uniform_report(speed.meta_layout("qwen2-72b"))
    big.batch_size, big.seq_len = 8, 1024
    big_cost = CostModel.analytic(big, checkpointing=True)
    assert cost.uniform_seconds() == pytest.approx(big_cost.uniform_seconds(), rel=1e-9)
    for cut in (0, 4, 6):  # the same share of 8 and of 80 layers, r16 everywhere above it
        small = cost.predict([(layer, 16, *shape) for layer in range(cut, 8) for shape in cost.module_shapes.values()])
        large = big_cost.predict(
            [(layer, 16, *shape) for layer in range(cut * 10, 80) for shape in big_cost.module_shapes.values()]
        )
        assert small / cost.uniform_seconds() == pytest.approx(large / big_cost.uniform_seconds(), rel=1e-6)


def test_rank_scaling_arms_give_the_scales_their_docs_state(tiny_frozen):
    """cut, cut_standard and cut_rslora: the same layers and ranks, and the LoRA scale PEFT applies in each adapter
    (LoraLayer.scaling, as attached by the study) is the one docs/QUALITY.md gives for that arm."""
    import dataclasses
    import math

    from peft.tuners.lora import LoraLayer

    from aletheia_ds.adapters.attach import attach
    from aletheia_ds.config import LoraSection
    from aletheia_ds.cost import CostModel
    from aletheia_ds.probe.run import run_probe

    tiny = tiny_frozen("llama", batches=(2, 2, 12), num_hidden_layers=6)
    model = tiny.model
    report = run_probe(model, tiny.layout, tiny.batches, lambda b: model(**b, use_cache=False).loss, sketch_dim=8)
    settings = Settings(min_r=4, max_r=16, budget=0.9)
    built, notes = {}, []
    plans = {
        name: arms.ARMS[name].build(report, CostModel.analytic(report), settings, built, notes)
        for name in arms.ARMS
        if name.startswith("cut")
    }
    shape = lambda plan: [(m.layer, m.key, m.r) for m in plan.modules]  # noqa: E731
    assert shape(plans["cut_rslora"]) == shape(plans["cut_standard"]) == shape(plans["cut"])
    assert len({m.r for m in plans["cut"].modules}) > 1, plans["cut"].modules  # ranks of one plan differ
    min_r = settings.min_r
    expected = {
        "cut": lambda r: 2 * math.sqrt(min_r / r),
        "cut_standard": lambda r: 2.0,
        "cut_rslora": lambda r: 2 * min_r / math.sqrt(r),
    }
    # the docs' reason `cut` needs no PEFT-rsLoRA twin: use_rslora at one alpha 2 sqrt(min_r) is cut's scale
    plans["rslora_twin"] = dataclasses.replace(
        plans["cut_standard"],
        modules=[dataclasses.replace(m, alpha=2 * math.sqrt(min_r)) for m in plans["cut_standard"].modules],
    )
    expected["rslora_twin"] = expected["cut"]
    for name, scale in expected.items():
        lora = {"use_rslora": True} if name == "rslora_twin" else arms.ARMS[name].lora
        model = attach(copy.deepcopy(tiny.model), plans[name], LoraSection(**lora))
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        assert len(layers) == len(plans[name].modules)
        for layer in layers.values():
            r = layer.r["default"]
            assert layer.scaling["default"] == pytest.approx(scale(r), rel=1e-9), (name, r)
