"""Real weights from disk: tools/write_sharded_checkpoint.py writes the standard sharded layout shard by shard;
a missing or truncated shard is one clear error before loading; the ZeRO-3 job on 2 ranks loads the sharded
checkpoint (tools/bench_load.py) and sees the same base model as one process, with rank 0 never holding more
than its partition plus about one shard."""

import json
import subprocess
import sys

import pytest
import torch
from _common import SHAPES
from helpers.ranks import ROOT, run_train
from write_sharded_checkpoint import write_checkpoint

from aletheia_ds.config import ConfigError, ModelSection
from aletheia_ds.launchers.deepspeed import local_command, rank_env
from aletheia_ds.model import load_model


def _load(path):
    import contextlib

    return load_model(ModelSection(path=str(path)), torch.float32, torch.device("cpu"), contextlib.nullcontext)


def test_written_checkpoint_is_sharded_and_loads(tmp_path):
    result = write_checkpoint(SHAPES["tiny"], tmp_path, shard_bytes=100_000, dtype="float32")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert result["files"] >= 4
    assert len(set(index["weight_map"].values())) == result["files"]
    assert index["metadata"]["total_size"] == result["total_bytes"]
    model = _load(tmp_path)
    assert sum(p.numel() * 4 for p in model.parameters()) == result["total_bytes"]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules() if n.endswith("norm"))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_is_one_clear_error(tmp_path, damage):
    write_checkpoint(SHAPES["tiny"], tmp_path, shard_bytes=100_000, dtype="float32")
    shard = tmp_path / "model-00002-of-{:05d}.safetensors".format(len(list(tmp_path.glob("*.safetensors"))))
    if damage == "missing":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConfigError, match=rf"^model.path: .*{shard.name} is {damage}") as info:
        _load(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_two_ranks_load_the_sharded_checkpoint_like_one_process(tmp_path):
    # ~210 MB in 14 shards: rank 0 mapping every shard at once (transformers' own ZeRO-3 path) shows as ~13 shards.
    # Tied embeddings (the head is stored once, as the embedding), as the smaller Qwen2.5 models have: the head is
    # tied before the copy (model.tie_before_copy), and the loss must still be the one-process run's.
    shape = dict(SHAPES["tiny"], hidden_size=768, intermediate_size=2048, num_hidden_layers=8, tie_word_embeddings=True)
    written = write_checkpoint(shape, tmp_path / "model", shard_bytes=16 * 2**20, dtype="float32")
    out = tmp_path / "bench"
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    # tiny weights sit below DeepSpeed's default persistence threshold and would never be partitioned
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/bench_load.py"),
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(out),
            "--cpu",
            "--gpus",
            "2",
            "--steps",
            "1",
            "--seq-len",
            "64",
            "--micro-batch",
            "2",
            "--read-once",
            "--ds-config",
            str(tmp_path / "zero3.json"),
        ],
        cwd=ROOT,
        # glibc would otherwise keep freed tensors under 32 MB in its heap (its mmap threshold rises as tensors are
        # freed), and the anonymous peak would show the allocator's cache rather than what a rank holds
        env={**rank_env(cpu=True), "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    load = json.loads((out / "load.json").read_text())
    assert load["shards"] > 3 and len(load["held_fraction_by_rank"]) == 2
    assert all(share < 0.6 for share in load["held_fraction_by_rank"])  # partitioned, not whole on a rank
    shard = load["largest_shard_bytes"] / 2**30
    grew = {kind: [r["peak"] - r["before"] for r in load[f"host_{kind}_gib_by_rank"]] for kind in ("anon", "file")}
    model = written["total_bytes"] / 2**30
    # rank 0 maps one shard (group) at a time and copies from it; the other rank reads headers only
    assert grew["file"][0] < 2 * shard + 0.01, (grew, shard, model)
    # no rank holds more than its partition plus about a shard (and DeepSpeed's own bookkeeping); rank 0, the one
    # that reads the checkpoint, holds no more than the rank that does not
    assert all(g < model / 2 + 2 * shard + 0.15 for g in grew["anon"]), (grew, shard, model)
    assert grew["anon"][0] < grew["anon"][1] + shard, (grew, shard, model)
    assert (out / "run/adapter/adapter_model.safetensors").is_file()

    import yaml

    config = yaml.safe_load((out / "run.yaml").read_text())
    config["train"]["output_dir"] = str(tmp_path / "one")
    config["deepspeed"] = {"config": str(ROOT / "ds_configs/zero2.json")}
    run_train(config, tmp_path, nprocs=0, timeout=600)
    two = json.loads((out / "run/eval.json").read_text())
    one = json.loads((tmp_path / "one/eval.json").read_text())
    assert abs(two["eval_loss_before"] - one["eval_loss_before"]) < 1e-5


@pytest.mark.distributed
@pytest.mark.slow
def test_a_tied_head_holds_no_partition_of_its_own_during_the_load(tmp_path):
    """tools/trace_load.py on 2 CPU ranks, a checkpoint whose tied embedding is most of it: when the copy starts a
    rank holds its half of the model, not also half of an untied head (transformers ties only after the copy, and
    the dropped head's partition lingers in a reference cycle until a collection: model.tie_before_copy does both)."""
    shape = dict(SHAPES["tiny"], hidden_size=256, vocab_size=131072, tie_word_embeddings=True)
    written = write_checkpoint(shape, tmp_path / "model", shard_bytes=16 * 2**20, dtype="float32")
    ds_args = ["--model", str(tmp_path / "model"), "--dtype", "float32", "--out", str(tmp_path / "trace.json")]
    proc = subprocess.run(
        local_command(str(ROOT / "tools/trace_load.py"), ds_args, 2),
        cwd=ROOT,
        env={**rank_env(cpu=True), "MALLOC_MMAP_THRESHOLD_": "65536"},  # freed tensors go back to the system
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    half_model = written["total_bytes"] / 2 / 2**30
    half_head = 131072 * 256 * 4 / 2 / 2**30  # 64 MiB: what an untied head's partition would add
    for rank in json.loads((tmp_path / "trace.json").read_text())["ranks"]:
        held = rank["held_at_copy_start"] - rank["before"]
        assert half_model - 0.01 < held < half_model + half_head / 2, (rank, half_model, half_head)
        assert rank["held_after"] - rank["before"] < half_model + half_head / 2, (rank, half_model, half_head)
