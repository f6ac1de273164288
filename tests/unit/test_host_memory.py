"""The host-memory sampler tells anonymous memory (what the process holds) from mapped file pages, against
allocations of known size; shard groups keep every fused MoE bank's experts in one group; a head the checkpoint
stores only as the tied embedding is tied before the copy, one stored on its own is not."""

import json
import mmap

import pytest
import torch
from _common import SHAPES
from write_sharded_checkpoint import write_checkpoint

from aletheia_ds.host_memory import HostMemoryPeaks
from aletheia_ds.model import shard_groups, tie_before_copy


def test_anonymous_and_mapped_pages_are_told_apart(tmp_path):
    size = 96 * 2**20
    with HostMemoryPeaks(interval_s=0.005) as held:
        block = torch.ones(size // 4)  # written: anonymous pages
        held.sample()  # the thread could miss a block this short-lived
        del block
    (tmp_path / "blob").write_bytes(b"\1" * size)
    with HostMemoryPeaks(interval_s=0.005) as mapped, open(tmp_path / "blob", "rb") as handle:
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            assert sum(view[i] for i in range(0, size, mmap.PAGESIZE)) == size // mmap.PAGESIZE
            mapped.sample()
    grew = {
        name: {kind: (peaks.summary(kind)["peak"] - peaks.summary(kind)["before"]) * 2**30 for kind in ("anon", "file")}
        for name, peaks in (("held", held), ("mapped", mapped))
    }
    assert grew["held"]["anon"] > 0.9 * size and grew["held"]["file"] < 0.1 * size, grew
    assert grew["mapped"]["file"] > 0.9 * size and grew["mapped"]["anon"] < 0.1 * size, grew


def _bank(disk_name: str) -> str:
    """The in-memory bank of a per-expert tensor on disk: one gate_up_proj (gate and up of every expert) and one
    down_proj per layer."""
    return disk_name.split(".experts.")[0] + (".down_proj" if ".down_proj" in disk_name else ".gate_up_proj")


def test_shard_groups_keep_a_fused_bank_together(tmp_path):
    """tiny-moe stores experts one tensor each; in memory they are one (E, 2F, H) bank per layer. Small shards
    split a layer's experts across files: those files must load together, every other file alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_checkpoint(SHAPES["tiny-moe"], tmp_path, shard_bytes=20_000, dtype="float32")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tmp_path)))
    groups = shard_groups(model, weight_map)
    assert sorted(f for group in groups for f in group) == sorted(set(weight_map.values()))
    group_of = {f: i for i, group in enumerate(groups) for f in group}
    banks = {}
    for name, file in weight_map.items():
        if ".experts." in name:
            banks.setdefault(_bank(name), set()).add(group_of[file])
    assert banks and all(len(found) == 1 for found in banks.values()), banks
    files_of = {}
    for name, file in weight_map.items():
        if ".experts." in name:
            files_of.setdefault(_bank(name), set()).add(file)
    assert any(len(files) > 1 for files in files_of.values())  # some bank straddles shards: grouping exercised
    assert any(len(group) == 1 for group in groups)


@pytest.mark.parametrize("stored", [(), ("lm_head.weight",)], ids=["head-not-stored", "head-stored"])
def test_tie_before_copy_ties_only_a_head_the_checkpoint_lacks(tmp_path, stored):
    """transformers builds the model untied and ties after the copy; until then a tied head is a partition of its
    own under ZeRO-3. Tied early only when the checkpoint lacks it (else the stored head is loaded, untied)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers import initialization as init

    write_checkpoint(dict(SHAPES["tiny"], tie_word_embeddings=True), tmp_path, shard_bytes=100_000, dtype="float32")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map  # written once, as the embedding
    weight_map.update({name: "model-00001-of-00001.safetensors" for name in stored})
    with torch.device("meta"), init.no_tie_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tmp_path)))
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # as transformers builds it for the copy
    tied = tie_before_copy(model, weight_map)
    assert tied == ([] if stored else ["lm_head.weight"])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (not stored)


def test_tie_before_copy_leaves_an_untied_model_alone(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    write_checkpoint(SHAPES["tiny"], tmp_path, shard_bytes=100_000, dtype="float32")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tmp_path)))
    assert tie_before_copy(model, weight_map) == []
    assert model.lm_head.weight is not model.model.embed_tokens.weight
