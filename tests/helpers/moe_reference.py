"""Independent references for the MoE probe: brute-force autograd on the fused banks and router weights."""

from __future__ import annotations

import math


def brute_force_moe(model, layout, batches) -> dict:
    """Unfreeze every expert bank and router weight, backprop each batch's loss, slice .grad per expert.

    Returns {"experts": {(layer, expert, bank): score}, "routers": {layer: score},
    "tokens": {(layer, expert): real tokens routed}} with scores per the probe's definition.
    """
    params = {}
    counts: dict[tuple[int, int], int] = {}
    handles = []
    state = {}
    for layer, block, module in layout.iter_moe(model):
        for bank in block.banks:
            params[(layer, bank.name)] = module.get_parameter(bank.path)
        router = module.get_submodule(block.router_path)
        params[(layer, "router")] = router.weight

        def count(_m, _inputs, output, layer=layer, n=block.num_experts):
            chosen = output[2]  # HF TopKRouter: (logits, weights, indices)
            real = state["mask"].reshape(-1).bool()
            for expert in range(n):
                counts[(layer, expert)] = counts.get((layer, expert), 0) + int((chosen[real] == expert).sum())

        if block.style == "hf":
            handles.append(router.register_forward_hook(count))
    for p in params.values():
        p.requires_grad_(True)
    sums: dict = {}
    for batch in batches:
        state["mask"] = batch["attention_mask"]
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        for (layer, name), p in params.items():
            grad = p.grad.double()
            if name == "router":
                sums[("router", layer)] = sums.get(("router", layer), 0.0) + float(grad.pow(2).sum())
                continue
            block = layout.moe[layer]
            per_expert = grad.reshape(block.num_experts, -1)  # hf (E, out, in); megablocks (E*F, H) rows
            for expert in range(block.num_experts):
                key = (layer, expert, name)
                sums[key] = sums.get(key, 0.0) + float(per_expert[expert].pow(2).sum())
    for handle in handles:
        handle.remove()
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    n = len(batches)
    return {
        "experts": {k: math.sqrt(v / n) for k, v in sums.items() if k[0] != "router"},
        "routers": {k[1]: math.sqrt(v / n) for k, v in sums.items() if k[0] == "router"},
        "tokens": counts,
    }


def assert_experts_match(report, reference: dict, rtol: float = 1e-4, check_tokens: bool = True) -> None:
    """Every bank score of every expert, every router score (and routing load) equal the reference."""
    assert report.experts, "the probe reported no experts"
    for e in report.experts:
        for bank, score in e.banks.items():
            ref = reference["experts"][(e.layer, e.expert, bank)]
            assert abs(score - ref) <= rtol * max(ref, 1e-30), (
                f"layer {e.layer} expert {e.expert} {bank}: {score} vs {ref}"
            )
        assert e.score == sum(s * s for s in e.banks.values()) ** 0.5
        if check_tokens:
            assert e.tokens == reference["tokens"][(e.layer, e.expert)], (e.layer, e.expert)
    assert set(report.routers) == set(reference["routers"])
    for layer, score in report.routers.items():
        ref = reference["routers"][layer]
        assert ref > 0 and abs(score - ref) <= rtol * ref, f"router of layer {layer}: {score} vs {ref}"
