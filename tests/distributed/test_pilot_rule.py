"""plan.rule=pilot in the job, 2 CPU ranks, ZeRO-3: uniform r16 for the pilot's steps, then the cut placed from
what the adapters learned and the layers below it frozen. References: the same job with plan.rule=all at r16
(identical until the cut is placed), the pilot's own checkpoint at the cut (the frozen adapters never move
after it), and an uninterrupted run (a resume after the cut continues bit for bit)."""

import json

import pytest
import torch
from helpers.ranks import read_jsonl, run_train, save_tiny_llama, tiny_run_config
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

STEPS, PILOT = 6, 2


def job(model, out, **plan):
    return tiny_run_config(
        model,
        out,
        plan={"rule": "pilot", "pilot_fraction": PILOT / STEPS, "budget": 0.6, **plan},
        train={"max_steps": STEPS, "save_every": 1, "keep_last": STEPS},
    )


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def test_pilot_places_its_cut_freezes_below_it_and_resumes_exactly(tmp_path):
    model = save_tiny_llama(tmp_path / "model", layers=6)
    out = tmp_path / "pilot"
    proc = run_train(job(model, out), tmp_path)
    pilot = json.loads((out / "pilot.json").read_text())
    cut = pilot["cut"]
    assert pilot["step"] == PILOT and 0 < cut < 6, pilot
    assert f"pilot: after step {PILOT}, cut at layer {cut}" in proc.stdout
    assert len(pilot["layer_change"]) == 6 and all(c > 0 for c in pilot["layer_change"])

    # until the cut is placed the job is uniform LoRA r16 on every layer
    uniform = tmp_path / "uniform"
    cfg = tiny_run_config(
        model,
        uniform,
        plan={"rule": "all", "attention_r": 16, "mlp_r": 16},
        train={"max_steps": PILOT, "save_every": 1, "keep_last": STEPS},
    )
    run_train(cfg, tmp_path)
    rows, reference = read_jsonl(out / "metrics.jsonl"), read_jsonl(uniform / "metrics.jsonl")
    for got, want in zip(rows[:PILOT], reference[:PILOT]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    at_cut = adapter(out / "checkpoints" / f"step-{PILOT:08d}" / "adapter")
    uniform_at_cut = adapter(uniform / "adapter")
    assert at_cut.keys() == uniform_at_cut.keys()
    assert all(torch.allclose(at_cut[k], uniform_at_cut[k], rtol=1e-5, atol=1e-7) for k in at_cut)

    # after it, the adapters below the cut keep exactly what they had; those above go on learning
    final = adapter(out / "adapter")
    assert final.keys() == at_cut.keys()
    below = [k for k in final if layer_of(k) < cut]
    above = [k for k in final if layer_of(k) >= cut]
    assert below and above
    assert all(torch.equal(final[k], at_cut[k]) for k in below)
    assert any(not torch.equal(final[k], at_cut[k]) for k in above if "lora_B" in k)

    # a run resumed after the cut freezes the same layers again and ends bit for bit like the uninterrupted one
    resumed = tmp_path / "resumed"
    run_train(job(model, resumed), tmp_path, extra=["--resume", str(out / "checkpoints" / "step-00000004")])
    got_rows = read_jsonl(resumed / "metrics.jsonl")
    assert [r["loss"] for r in got_rows if r["step"] > 4] == [r["loss"] for r in rows if r["step"] > 4]
    again = adapter(resumed / "adapter")
    assert all(torch.equal(again[k], final[k]) for k in final)
