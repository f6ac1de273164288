"""PYTHONPATH=.:tests DS_ACCELERATOR=cpu deepspeed --num_gpus 2 \
    tests/workers/preference_zero3.py OUT.json MODEL_DIR OBJECTIVE

One preference step (OBJECTIVE dpo or simpo) under a real ZeRO-3 engine, through the training path's
PreparedModel.objective_loss with the frozen prefix shared by the reference and policy passes: each rank takes its
own 3 pairs of the shipped preference data. Rank 0 writes every rank's loss and reward means and the full LoRA
gradients (gathered from the partitions, averaged over the ranks as DeepSpeed reduces them) for the test to
compare with TRL's numbers on the same batches.
"""

import json
import sys

import torch
from helpers.trl_reference import cut_plan, preference_batch, set_adapter_weights, tokenizer

from aletheia_ds.config import load_config
from aletheia_ds.dist import distributed
from aletheia_ds.execution import ExecutionOptions, PreparedModel
from aletheia_ds.model import load_model
from aletheia_ds.objectives import Objective, reward_metrics

KNOBS = {"dpo": ["train.beta=0.3"], "simpo": ["train.beta=2.0", "train.simpo_gamma=0.4", "train.cpo_alpha=0.5"]}


def main(out: str, model_dir: str, objective_name: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    cfg = load_config(
        [
            f"model.path={model_dir}",
            "deepspeed.config=ds_configs/zero3.json",
            "train.micro_batch_size=3",
            "model.dtype=float32",
            "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0",
            f"train.objective={objective_name}",
            *KNOBS[objective_name],
        ]
    )
    objective = Objective.from_train(cfg.train)
    with distributed(cfg) as ctx:
        model = load_model(cfg.model, torch.float32, ctx.device, ctx.model_init, zero3=ctx.zero3)
        layout, plan = cut_plan(model, 2)
        run = PreparedModel.apply(model, plan, layout, ExecutionOptions(shared_prefix=True))
        assert run.shared_prefix is not None
        set_adapter_weights(run.peft_model)  # before initialize partitions the adapters
        params = [p for p in run.peft_model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(
            model=run.peft_model, optimizer=torch.optim.AdamW(params, lr=0.0), config=ctx.ds_config
        )
        batch = {k: v.to(ctx.device) for k, v in preference_batch(tokenizer(), 3 * ctx.rank, 3).items()}
        loss, preference = run.objective_loss(lambda inputs: engine(**inputs, use_cache=False), batch, objective)
        engine.backward(loss)
        grads = {
            name: safe_get_full_grad(p).tolist() for name, p in engine.module.named_parameters() if p.requires_grad
        }
        mine = {"loss": float(loss.detach()), **reward_metrics(preference.sums())}
        by_rank = ctx.all_gather_object(mine)
        if ctx.is_main:
            with open(out, "w") as handle:
                json.dump({"ranks": by_rank, "grads": grads, "zero_stage": ctx.zero_stage}, handle)


if __name__ == "__main__":
    main(*[arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")])
