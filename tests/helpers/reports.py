"""Probe reports and a cost model made up for planning tests: scores are chosen, nothing is measured."""

from __future__ import annotations

import math

from aletheia_ds.cost import CostModel
from aletheia_ds.probe.report import LayerScore, ProbeReport


def fake_report(layout, layer_scores, model="m") -> ProbeReport:
    """A report on a real model's `layout` whose layer scores are `layer_scores`, spread evenly over each layer's
    modules."""
    layers = []
    for index, score in enumerate(layer_scores):
        keys = [t.key for t in layout.layer_targets[index]]
        per = score / math.sqrt(len(keys))
        layers.append(LayerScore(index, score, {k: per for k in keys}))
    return ProbeReport(
        model=model, num_layers=len(layers), tokens=10, seconds=0.1, batches=1, layers=layers, layout=layout.to_json()
    )


SHAPES = {
    "q_proj": [64, 64],
    "k_proj": [64, 32],
    "v_proj": [64, 32],
    "o_proj": [64, 64],
    "gate_proj": [64, 128],
    "up_proj": [64, 128],
    "down_proj": [128, 64],
}
KINDS = {k: ("attention" if k[0] in "qkvo" else "mlp") for k in SHAPES}


def report_with(layer_scores, layers=None) -> ProbeReport:
    """A report on no model at all: every layer has the seven linears of SHAPES, scored `layer_scores`."""
    layers = layers or len(layer_scores)
    out = []
    for i, score in enumerate(layer_scores):
        per = score / math.sqrt(len(SHAPES))
        out.append(LayerScore(i, score, {k: per for k in SHAPES}))
    layout = {
        "layers_path": "model.layers",
        "module_kinds": KINDS,
        "module_paths": {k: f"x.{k}" for k in SHAPES},
        "module_shapes": SHAPES,
        "layer_params": [1000] * layers,
        "hidden_size": 64,
        "vocab_size": 256,
    }
    return ProbeReport(
        model="m",
        num_layers=layers,
        tokens=512,
        seconds=0.1,
        batches=2,
        layers=out,
        layout=layout,
        batch_size=4,
        seq_len=64,
    )


def known_model(**kw) -> CostModel:
    """A cost model with known coefficients (fits must recover them), over the layers of `report_with`."""
    args = dict(
        base_s=0.05,
        depth_s=0.004,
        adapter_fixed_s=0.0003,
        adapter_width_s=1e-7,
        layer_weights=[1.0] * 8,
        module_shapes=SHAPES,
    )
    args.update(kw)
    return CostModel(**args)
