"""The probe's independent reference: weights unfrozen and their .grad read, one batch at a time."""

from __future__ import annotations

import math

from aletheia_ds.probe.report import ProbeReport


def brute_force_scores(model, layout, batches) -> dict[tuple[int, str], float]:
    """Reference: unfreeze every target weight, backprop each batch's mean token loss, read .grad."""
    modules = {(layer, t.key): m for layer, t, m in layout.iter_modules(model)}
    for m in modules.values():
        m.weight.requires_grad_(True)
    sums = {key: 0.0 for key in modules}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        for key, m in modules.items():
            sums[key] += float(m.weight.grad.double().pow(2).sum())
    for m in modules.values():
        m.weight.requires_grad_(False)
        m.weight.grad = None
    return {key: math.sqrt(total / len(batches)) for key, total in sums.items()}


def assert_scores_equal(report: ProbeReport, reference: dict, rtol: float = 1e-4) -> None:
    for layer in report.layers:
        for key, score in layer.modules.items():
            ref = reference[(layer.index, key)]
            assert ref > 0, f"reference gradient of {layer.index}:{key} is zero"
            assert abs(score - ref) <= rtol * ref, f"layer {layer.index} {key}: hook {score} vs autograd {ref}"
        expected_layer = math.sqrt(sum(reference[(layer.index, k)] ** 2 for k in layer.modules))
        assert abs(layer.score - expected_layer) <= rtol * expected_layer
