"""Tiny configs of every supported family (random weights, built locally: no hub)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

DENSE = {
    "llama": dict(),
    "qwen2": dict(),
    "qwen3": dict(head_dim=8),
    "mistral": dict(),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8),
    "phi3": dict(),
    "gpt_neox": dict(),
}

MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        head_dim=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_shared_experts=1,
        num_key_value_heads=4,
    ),
}

FAMILIES = list(DENSE)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    extra = {**DENSE.get(family, {}), **MOE.get(family, {})}
    return AutoConfig.for_model(family, **{**COMMON, **extra, **overrides})


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    # random init leaves some weights at exactly zero/one (norms, biases); perturb every parameter so that
    # no gradient is identically zero by construction and families differ from each other
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def random_batches(count: int, batch_size: int, seq_len: int, vocab: int = 96, seed: int = 0) -> list[dict]:
    """Right-padded batches with ragged lengths; pad labels -100 and a masked prompt span."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        for row in range(batch_size):
            length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
            ids[row, length:] = 0
            mask[row, length:] = 0
            labels[row, length:] = -100
            labels[row, : int(torch.randint(0, 3, (1,), generator=g))] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def split_routing_model(family: str = "qwen3_moe", seed: int = 0, strength: float = 3.0, **overrides):
    """A tiny MoE model whose routers send tokens 3..49 to experts {0, 1} and tokens 50..95 to {2, 3}.

    Hidden dimension 0 of each token's embedding carries +strength (low ids) or -strength (high ids), and
    every router weighs that dimension by +/-4 for the two expert pairs; the rest of the model is the usual
    small random init, too weak to flip that sign in four layers (`routed_experts` checks it).
    """
    model = tiny_model(family, seed=seed, **overrides)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0] = torch.where(torch.arange(embed.shape[0]) < 50, strength, -strength)
        for name, module in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(module, "weight"):
                n = module.weight.shape[0]
                module.weight[:, 0] = torch.tensor([4.0 if e < n // 2 else -4.0 for e in range(n)])
    return model


@torch.no_grad()
def routed_experts(model, batch) -> dict[int, set[int]]:
    """{MoE layer: experts that any real token of `batch` is routed to}, read from the routers' choices."""
    chosen: dict[int, set[int]] = {}
    handles = []
    mask = batch["attention_mask"].reshape(-1).bool()
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(module, "top_k"):
            layer = int(name.split(".")[2])

            def hook(_m, _i, out, layer=layer):
                chosen[layer] = set(out[2][mask].flatten().tolist())

            handles.append(module.register_forward_hook(hook))
    model(**batch, use_cache=False)
    for h in handles:
        h.remove()
    return chosen


def token_batches(count: int, batch_size: int, seq_len: int, low: int, high: int, seed: int) -> list[dict]:
    """Full rows (no padding: the pad id would route on its own) of token ids drawn from [low, high)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(low, high, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


class ListExpertsMoe(torch.nn.Module):
    """A transformers-4-style sparse MoE block: experts in a ModuleList, and only experts that receive tokens run.

    Which expert modules run depends on the routing, so under ZeRO-3 ranks with different tokens would gather
    different parameters -- the case the z3 leaf setting exists for. (Not a family the package adapts; it only
    drives the ZeRO-3 leaf test.)
    """

    def __init__(self, gate: torch.nn.Module, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.gate = gate
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(hidden, intermediate, bias=False),
                torch.nn.SiLU(),
                torch.nn.Linear(intermediate, hidden, bias=False),
            )
            for _ in range(num_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, chosen = self.gate(x)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            tokens, k = torch.where(chosen == expert)
            out.index_add_(0, tokens, self.experts[expert](x[tokens]) * weights[tokens, k, None])
        return out.reshape(shape)


def with_list_experts(model) -> "torch.nn.Module":
    """Replace every MoE block of a tiny qwen3_moe/mixtral model by a ListExpertsMoe keeping its router."""
    torch.manual_seed(0)
    for layer in model.model.layers:
        gate = layer.mlp.gate
        layer.mlp = ListExpertsMoe(gate, model.config.hidden_size, 16, gate.num_experts)
        with torch.no_grad():
            for p in layer.mlp.experts.parameters():
                p.mul_(0.1)  # as small as the rest of the tiny model, so the routing split survives every layer
    return model
