"""Bad input: one line naming the file/field, exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest
from helpers.ranks import ROOT, save_tiny_llama

from aletheia_ds.launchers.deepspeed import rank_env

pytestmark = pytest.mark.distributed


def run(args, cwd):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=rank_env(cpu=True), capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "model")


def base_args(model_dir, out, data=None):
    return [
        str(ROOT / "launch/train.py"),
        f"model.path={model_dir}",
        f"model.tokenizer={ROOT / 'examples/tiny/tokenizer'}",
        f"data.train={data or ROOT / 'examples/tiny/train.jsonl'}",
        f"train.output_dir={out}",
        "train.max_steps=1",
        "data.seq_len=32",
        "data.max_examples=40",
        "probe.batches=1",
        f"deepspeed.config={ROOT / 'ds_configs/zero2.json'}",
    ]


CASES = {
    "missing model dir": (
        ["model.path=/nonexistent/model"],
        r"model.path: directory '/nonexistent/model' does not exist",
    ),
    "malformed jsonl": (["@bad.jsonl"], r"bad.jsonl:2: malformed JSON"),
    "empty dataset": (["@empty.jsonl"], r"empty.jsonl: the dataset is empty"),
    "no such target": (
        ["lora.target_modules=[nope]"],
        r"lora.target_modules: \['nope'\] not found; modules of this model: \[",
    ),
    "top_pct": (["plan.top_pct=0"], r"plan.top_pct: must be in \(0, 100\], got 0"),
    "rank": (["plan.attention_r=0"], r"plan.attention_r: rank must be > 0"),
    "unknown key": (["train.learning_rate=1"], r"unknown config key 'train.learning_rate'; did you mean 'train.lr"),
    "liger on CPU": (
        ["train.liger=true"],
        r"train.liger=true: its kernels are Triton GPU kernels and this run is on cpu; set train.liger=auto or false",
    ),
    "seq_len past the model": (
        ["data.seq_len=4096"],
        r"data.seq_len=4096 exceeds the model's max_position_embeddings=128",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, model_dir, case):
    extra, pattern = CASES[case]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    data = None
    overrides = []
    for item in extra:
        if item.startswith("@"):
            data = tmp_path / item[1:]
        else:
            overrides.append(item)
    proc = run(base_args(model_dir, out, data) + overrides, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    import re

    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_plan_cli_refuses_all_zero_probe(tmp_path):
    probe = {
        "model": "m",
        "num_layers": 2,
        "tokens": 4,
        "seconds": 0.1,
        "batches": 1,
        "layers": [{"index": i, "score": 0.0, "modules": {"q_proj": 0.0}} for i in range(2)],
        "layout": {
            "layers_path": "model.layers",
            "module_kinds": {"q_proj": "attention"},
            "module_paths": {"q_proj": "self_attn.q_proj"},
        },
    }
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    proc = run(["-m", "aletheia_ds.cli", "plan", "--probe", "probe.json", "--out", "plan.json"], tmp_path)
    assert proc.returncode == 2 and "every probe score is zero" in proc.stderr
    assert not (tmp_path / "plan.json").exists()


def test_probe_and_plan_cli(tmp_path, model_dir):
    proc = run(
        [
            "-m",
            "aletheia_ds.cli",
            "probe",
            "--model",
            str(model_dir),
            "--data",
            str(ROOT / "examples/tiny/train.jsonl"),
            "--tokenizer",
            str(ROOT / "examples/tiny/tokenizer"),
            "--out",
            "probe.json",
            "--probe-batches",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert set(probe) >= {"model", "num_layers", "tokens", "seconds", "layers"}
    assert set(probe["layers"][0]) == {"index", "score", "modules", "signal", "lowrank", "weight_norm"}
    for kind in ("modules", "signal", "lowrank", "weight_norm"):  # every target scored in every kind
        assert set(probe["layers"][0][kind]) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    proc = run(
        [
            "-m",
            "aletheia_ds.cli",
            "plan",
            "--probe",
            "probe.json",
            "--out",
            "plan.json",
            "--top-pct",
            "25",
            "--attention-r",
            "8",
            "--mlp-r",
            "32",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["layers"]) == 1
    assert {m["r"] for m in plan["modules"]} == {8, 32}
    assert {m["alpha"] for m in plan["modules"]} == {16.0, 64.0}
    assert set(plan["lora_config"]) >= {"layers_to_transform", "rank_pattern", "alpha_pattern", "target_modules"}
    proc = run(["-m", "aletheia_ds.cli", "plan", "--probe", "probe.json", "--top-pct", "150"], tmp_path)
    assert proc.returncode == 2 and "plan.top_pct: must be in (0, 100], got 150" in proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--config", "launch/configs/tiny_cpu.yaml", "--hostfile", "nope.txt", "--dry-run"],
            "error: --hostfile: 'nope.txt' does not exist",
        ),
        (
            ["train", "--config", "launch/configs/tiny_cpu.yaml", "--num-gpus", "2", "--dry-run", "train.lrr=1"],
            "unknown config key 'train.lrr'; did you mean 'train.lr'?",
        ),
        (
            ["train", "--config", "launch/configs/tiny_cpu.yaml", "--dry-run", "train.report_to=[nope]"],
            "train.report_to.0: Input should be 'tensorboard', 'wandb' or 'mlflow'",
        ),
        (["report", "no/such/run"], "error: report: run directory 'no/such/run' does not exist"),
        (
            ["eval", "--model", "examples/tiny/model", "--data", "missing.jsonl"],
            "error: --data: 'missing.jsonl' does not exist",
        ),
        (
            ["export", "--model", "examples/tiny/model", "--adapter", "no/adapter", "--out", "x", "--merge"],
            "error: --adapter: 'no/adapter' has no adapter_config.json",
        ),
    ],
)
def test_bad_input_is_one_error_line(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "aletheia_ds.cli", *args],
        cwd=ROOT,
        env=rank_env(cpu=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (ROOT / "x").exists()
