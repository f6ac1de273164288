"""On one real run (2 DeepSpeed ranks started by `aletheia-ds train --num-gpus 2`): the report's files and numbers,
TensorBoard events, eval (perplexity, exact match against model.generate, forgetting) and the merged export."""

import json
import math
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.ranks import ROOT, read_jsonl, save_tiny_llama, tiny_run_config

from aletheia_ds.launchers.deepspeed import free_port, rank_env

pytestmark = pytest.mark.distributed

TOKENIZER = ROOT / "examples/tiny/tokenizer"


def cli(args, cwd=ROOT, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "aletheia_ds.cli", *args],
        cwd=cwd,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import importlib.util

    import yaml

    tmp = tmp_path_factory.mktemp("run")
    model_dir = save_tiny_llama(tmp / "model")
    out = tmp / "run"
    report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    cfg = tiny_run_config(model_dir, out, train={"max_steps": 8, "eval_every": 4, "report_to": report_to})
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli(
        [
            "train",
            "--config",
            str(tmp / "config.yaml"),
            "--num-gpus",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "--quiet",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch/train.py --config" in proc.stdout.splitlines()[0]  # the launcher command, printed first
    assert re.search(r"^train 8/8  loss \d", proc.stdout, re.M) and "tokens/s" in proc.stdout  # quiet: plain lines
    return {"dir": out, "model": model_dir, "cfg": cfg, "tmp": tmp, "stdout": proc.stdout}


def test_report_files_and_numbers(run):
    out = run["dir"]
    shutil.copy(ROOT / "docs/bench/run2/bench_speed.json", out / "bench_speed.json")
    proc = cli(["report", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()
    for png in ("probe_heatmap.png", "probe.png", "plan.png", "loss.png", "speed.png"):
        assert (out / png).stat().st_size > 10_000, png
        assert f"]({png})" in md, png
    probe = json.loads((out / "probe.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    results = json.loads((out / "eval.json").read_text())
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [4, 8]
    assert eval_rows[-1]["eval_loss"] == results["eval_loss_after"]
    # probe: the ranking table holds probe.json's scores
    best = max(probe["layers"], key=lambda layer: layer["score"])
    assert f"| 1 | {best['index']} | {best['score']:.6g} |" in md
    assert f"({probe['tokens']} tokens)" in md
    # plan: layers, lowest adapted layer, captured energy, ranks
    lowest = min(plan["layers"])
    assert f"{len(plan['layers'])} of {plan['num_layers']} layers" in md
    assert f"Lowest adapted layer {lowest}" in md and f"{plan['score_captured']:.1%}" in md
    for layer in plan["layers"]:
        assert f"| {layer} | 7 | attention r4, mlp r8 |" in md
    # training: first and last loss, held-out losses before / during / after
    assert f"loss {train_rows[0]['loss']:.4f} at step 1 -> {train_rows[-1]['loss']:.4f} at step 8" in md
    assert (
        f"step 0: {results['eval_loss_before']:.4f}, step 4: {eval_rows[0]['eval_loss']:.4f}, "
        f"step 8: {results['eval_loss_after']:.4f}"
    ) in md
    assert (
        f"| {results['eval_loss_before']:.4f} | {results['eval_loss_after']:.4f} | "
        f"{math.exp(results['eval_loss_before']):.3f} | {math.exp(results['eval_loss_after']):.3f} | 8 | 0 |" in md
    )
    # speed: the bench rows as measured
    assert "| qwen2.5-7b | off | budget | 9 (19) | 185.4 | 22,088 | 29.9 | 1.65x |" in md


def test_report_refuses_a_broken_probe_and_writes_nothing(tmp_path):
    (tmp_path / "probe.json").write_text("{not json")
    proc = cli(["report", str(tmp_path)])
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "probe.json" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json"]


def test_tensorboard_events_equal_metrics(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["dir"] / "tensorboard"))
    acc.Reload()
    rows = read_jsonl(run["dir"] / "metrics.jsonl")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows if "loss" in r
    ]
    assert [e.step for e in acc.Scalars("eval/loss")] == [4, 8]


def greedy(model, tok, prompt, max_new_tokens):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_eval_exact_match_perplexity_forgetting(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(run["model"])).eval(), str(run["dir"] / "adapter")
    ).eval()
    rows = [json.loads(line) for line in (ROOT / "examples/tiny/eval.jsonl").read_text().splitlines()[:8]]
    # half the references are what the adapted model writes, so exact match is not trivially 0
    for row in rows[:4]:
        row["completion"] = greedy(tuned, tok, row["prompt"], 12)
        assert row["completion"].strip()
    data = tmp_path / "em.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {}
    for name, model in (("adapter", tuned), ("base", AutoModelForCausalLM.from_pretrained(str(run["model"])).eval())):
        expected[name] = sum(greedy(model, tok, r["prompt"], 12).strip() == r["completion"].strip() for r in rows)
    assert expected["adapter"] >= 4

    out = tmp_path / "eval.json"
    proc = cli(
        [
            "eval",
            "--model",
            str(run["model"]),
            "--tokenizer",
            str(TOKENIZER),
            "--adapter",
            str(run["dir"] / "adapter"),
            "--data",
            str(data),
            "--forgetting-data",
            str(ROOT / "examples/tiny/train.jsonl"),
            "--seq-len",
            "48",
            "--batches",
            "2",
            "--batch-size",
            "4",
            "--exact-match-rows",
            "8",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["adapter_exact_match"]["matches"] == expected["adapter"]
    assert result["adapter_exact_match"]["exact_match"] == expected["adapter"] / 8
    assert result["base_exact_match"]["matches"] == expected["base"]
    for name in ("base", "adapter"):
        assert result[f"{name}_perplexity"] == pytest.approx(math.exp(result[f"{name}_loss"]), rel=1e-12)
    assert result["forgetting"] == pytest.approx(result["adapter_forgetting_loss"] - result["base_forgetting_loss"])
    assert result["adapter_forgetting_loss"] != result["base_forgetting_loss"]


def test_export_merged_equals_base_plus_adapter(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    proc = cli(
        [
            "export",
            "--model",
            str(run["model"]),
            "--tokenizer",
            str(TOKENIZER),
            "--adapter",
            str(run["dir"] / "adapter"),
            "--out",
            str(out),
            "--merge",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".merged.*"))  # no temporary directory left
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(run["model"])), str(run["dir"] / "adapter")
    ).eval()
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(run["model"])).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert not torch.allclose(base, want, atol=1e-4)  # the adapter changes the logits: the check has teeth

    # a second export into the same non-empty directory is refused and leaves it as it was
    before = sorted(p.name for p in out.iterdir())
    proc = cli(
        ["export", "--model", str(run["model"]), "--adapter", str(run["dir"] / "adapter"), "--out", str(out), "--merge"]
    )
    assert proc.returncode == 2 and "--out:" in proc.stderr and "not empty" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before
