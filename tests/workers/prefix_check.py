"""PYTHONPATH=.:tests DS_ACCELERATOR=cpu deepspeed --num_gpus 2 \
    tests/workers/prefix_check.py OUT.json ZERO_CONFIG MODEL_DIR

Under a real DeepSpeed engine: one step's loss and full LoRA gradients with the frozen prefix on and
off, and which decoder layers autograd saved tensors in. Written by rank 0 as JSON for the test.
"""

import json
import sys
from pathlib import Path

import torch
from helpers.families import random_batches
from helpers.reports import fake_report

from aletheia_ds.adapters.attach import attach
from aletheia_ds.arch import describe
from aletheia_ds.config import PlanSection, load_config
from aletheia_ds.dist import distributed
from aletheia_ds.execution import FrozenPrefix, base_model
from aletheia_ds.model import load_model
from aletheia_ds.plan import make_plan


def main(out: str, ds_config: str, model_dir: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    cfg = load_config(
        [
            f"model.path={model_dir}",
            f"deepspeed.config={ds_config}",
            "train.micro_batch_size=2",
            "model.dtype=float32",
            "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0",
        ]
    )
    with distributed(cfg) as ctx:
        model = load_model(cfg.model, torch.float32, ctx.device, ctx.model_init, zero3=ctx.zero3)
        layout = describe(model)
        scores = [0.1] * layout.num_layers
        scores[2], scores[-1] = 5.0, 4.0
        plan = make_plan(fake_report(layout, scores), PlanSection(top_pct=40, attention_r=4, mlp_r=8))
        model = attach(model, plan)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(params, lr=0.0, weight_decay=0.0), config=ctx.ds_config
        )
        batch = random_batches(2, 2, 10, vocab=64, seed=ctx.rank)[0]
        layers = base_model(model).get_submodule(layout.layers_path)
        result = {"lowest": plan.lowest_adapted_layer}
        for mode in ("plain", "frozen_prefix"):
            handle = (
                FrozenPrefix(model, layout.layers_path, plan.lowest_adapted_layer).apply()
                if mode == "frozen_prefix"
                else None
            )
            saved, current = {}, [None]
            hooks = [
                layer.register_forward_pre_hook(lambda _m, _a, i=i: current.__setitem__(0, i))
                for i, layer in enumerate(layers)
            ]
            hooks += [layer.register_forward_hook(lambda *_a: current.__setitem__(0, None)) for layer in layers]

            def pack(t):
                if current[0] is not None:
                    saved[current[0]] = saved.get(current[0], 0) + 1
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if mode == "plain":
                    base_model(model).enable_input_require_grads()  # the usual recipe: backward through every layer
                loss = engine(**batch, use_cache=False).loss
                engine.backward(loss)
            grads = {n: safe_get_full_grad(p).tolist() for n, p in model.named_parameters() if p.requires_grad}
            engine.step()  # lr 0: weights unchanged, gradients released
            for h in hooks:
                h.remove()
            if handle is not None:
                handle.remove()
            base_model(model).disable_input_require_grads()
            loss_all = ctx.all_reduce_sum(loss.detach().reshape(1).to(torch.float64))
            result[mode] = {"loss": float(loss_all), "grads": grads, "saved": saved}
        if ctx.is_main:
            Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
