"""Tiny configs of every supported family (random weights, built locally: no hub)."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)

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
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, first_k_dense_replace=1,
                        n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1, num_key_value_heads=4),
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
