"""Start real DeepSpeed ranks (CPU, gloo, loopback; or GPUs, NCCL) for the distributed tests, through the package's
own command and environment builders (aletheia_ds/launchers/deepspeed.py), and compare two runs of one job."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from aletheia_ds.launchers.deepspeed import local_command, rank_env

ROOT = Path(__file__).resolve().parents[2]
# NVLink multicast stays off on shared GPU hosts (one program using it can take the host's GPUs out of service)
NCCL_ENV = {
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def devices(gpus: int) -> list:
    """Parametrize a test by device: `cpu`, and `gpu` marked `gpu` and skipped on a host with fewer than `gpus`."""
    import pytest
    import torch

    few = torch.cuda.device_count() < gpus
    return ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(few, reason=f"needs {gpus} GPUs")])]


def device_env(device: str, **extra: str) -> dict:
    """rank_env for ranks on `device` (cpu: gloo and no visible GPU; gpu: CUDA and NCCL_ENV)."""
    return rank_env(cpu=device == "cpu", **({} if device == "cpu" else NCCL_ENV), **extra)


def train_cmd(
    config: dict, tmp: Path, nprocs: int = 2, extra: list[str] | None = None, script: str = "launch/train.py"
) -> list[str]:
    """Write `config` as YAML; the command that runs `script` on `nprocs` ranks (one plain process when 0)."""
    import yaml

    path = tmp / f"config-{len(list(tmp.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["--config", str(path), *(extra or [])]
    if nprocs == 0:
        return [sys.executable, str(ROOT / script), *args]
    return local_command(str(ROOT / script), args, nprocs)


def run_train(
    config: dict,
    tmp: Path,
    nprocs: int = 2,
    timeout: int = 300,
    extra: list[str] | None = None,
    check: bool = True,
    env: dict | None = None,
    script: str = "launch/train.py",
) -> subprocess.CompletedProcess:
    """Run launch/train.py (or a wrapper `script`) with `config` on `nprocs` ranks; fail loudly if `check`."""
    cmd = train_cmd(config, tmp, nprocs, extra, script)
    proc = subprocess.run(cmd, cwd=ROOT, env=env or rank_env(cpu=True), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_run_config(model_dir: Path, out: Path, **sections) -> dict:
    """A small, fast job on the shipped tokenizer/data and a tiny saved model."""
    config = {
        "model": {"path": str(model_dir), "tokenizer": str(ROOT / "examples/tiny/tokenizer")},
        "data": {
            "train": str(ROOT / "examples/tiny/train.jsonl"),
            "eval": str(ROOT / "examples/tiny/eval.jsonl"),
            "seq_len": 48,
            "max_examples": 400,
            "eval_batches": 3,
        },
        "probe": {"batches": 3, "batch_size": 4},
        "plan": {"top_pct": 50, "attention_r": 4, "mlp_r": 8},
        "train": {
            "output_dir": str(out),
            "max_steps": 6,
            "micro_batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 1,
            "seed": 3,
        },
        # tiny weights sit below DeepSpeed's default persistence threshold and would never be partitioned
        "deepspeed": {
            "config": str(ROOT / "ds_configs/zero3.json"),
            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def tiny_causal_lm(seed: int = 0, layers: int = 4, family: str = "llama", **overrides):
    """The tests' tiny float32 model of `family` (seeded random weights): 512 tokens, width 32, 4 heads / 2 KV."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family,
        **{
            **dict(
                vocab_size=512,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                tie_word_embeddings=False,
            ),
            **overrides,
        },
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_llama(path: Path, seed: int = 0, layers: int = 4, family: str = "llama", **overrides) -> Path:
    tiny_causal_lm(seed, layers, family, **overrides).save_pretrained(str(path))
    return path


def single_process_probe(model_dir: Path, cfg: dict):
    """The probe of `cfg` on one process with plain transformers: the reference for sharded probes."""
    import torch
    from transformers import AutoModelForCausalLM

    from aletheia_ds.arch import describe
    from aletheia_ds.config import ProbeSection
    from aletheia_ds.data import fixed_batches, load_examples, load_tokenizer
    from aletheia_ds.probe.run import run_probe

    tok = load_tokenizer(cfg["model"]["tokenizer"])
    examples = load_examples(cfg["data"]["train"], tok, cfg["data"]["seq_len"], cfg["data"]["max_examples"])
    batches = fixed_batches(examples, cfg["probe"]["batch_size"], cfg["probe"]["batches"], tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.requires_grad_(False)
    sketch_dim = cfg.get("probe", {}).get("sketch_dim", ProbeSection().sketch_dim)
    return run_probe(model, describe(model), batches, lambda b: model(**b, use_cache=False).loss, sketch_dim=sketch_dim)


def evaluate_tiny_run(model_dir: Path, out: Path, config: dict) -> dict:
    """aletheia_ds.evaluate.evaluate_adapter on a finished tiny_run_config job: the exported adapter reloaded on the
    original base, its held-out loss against the base's, and the run's sample logits reproduced."""
    from aletheia_ds.evaluate import evaluate_adapter

    return evaluate_adapter(
        model=str(model_dir),
        adapter=str(out / "adapter"),
        data=config["data"]["eval"],
        tokenizer=config["model"]["tokenizer"],
        seq_len=config["data"]["seq_len"],
        batches=config["data"]["eval_batches"],
        batch_size=config["train"]["micro_batch_size"],
        verify_logits=str(out / "sample_logits.safetensors"),
    )


@dataclass(frozen=True)
class Tolerance:
    score: float  # relative, each layer's probe score
    loss: float  # relative, each step's loss
    adapter_rtol: float  # each adapter element: torch.allclose(rtol, atol)
    adapter_atol: float


TOLERANCE = {
    # float32 and gloo: both runs do the same sums in the same order
    "cpu": Tolerance(score=1e-6, loss=1e-6, adapter_rtol=1e-4, adapter_atol=1e-6),
    # bf16 and NCCL on the same GPUs: the same kernels, but some (attention's backward, atomic reductions) add in
    # whatever order their threads finish, and one bf16 step is 2**-8 of a value: the adapter may differ by a
    # bf16 rounding (0.8%) or, near zero, a tenth of one learning-rate step (1e-2); a different batch, plan or
    # world size moves every loss by percents
    "gpu": Tolerance(score=1e-3, loss=1e-3, adapter_rtol=2e-2, adapter_atol=1e-3),
}


def assert_same_job(run: Path, reference: Path, device: str) -> list[dict]:
    """The finished job in `run` has the probe, plan, every step's loss and the adapter of `reference` (the same
    job launched another way) within TOLERANCE[device]; returns `run`'s metrics rows."""
    import pytest
    import torch
    from safetensors.torch import load_file

    tol = TOLERANCE[device]
    probe, want = (json.loads((out / "probe.json").read_text()) for out in (run, reference))
    assert probe["world_size"] == want["world_size"] and probe["tokens"] == want["tokens"]
    assert len(probe["layers"]) == len(want["layers"])
    scores = [[layer["score"] for layer in p["layers"]] for p in (probe, want)]
    assert scores[0] == pytest.approx(scores[1], rel=tol.score, abs=0)
    plan, want_plan = (json.loads((out / "plan.json").read_text()) for out in (run, reference))
    # the share of the probe's score the plan keeps follows the scores' tolerance; everything else is exact
    assert plan.pop("score_captured") == pytest.approx(
        want_plan.pop("score_captured"), rel=tol.score, abs=0, nan_ok=True
    )
    assert plan == want_plan
    rows, want_rows = read_jsonl(run / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in want_rows], rel=tol.loss, abs=0)
    adapter, want_adapter = (load_file(str(out / "adapter/adapter_model.safetensors")) for out in (run, reference))
    assert adapter.keys() == want_adapter.keys()
    for name, tensor in adapter.items():
        diff = (tensor.float() - want_adapter[name].float()).abs().max().item()
        assert torch.allclose(tensor, want_adapter[name], rtol=tol.adapter_rtol, atol=tol.adapter_atol), (name, diff)
    return rows
