"""tools/profile_step.py's trace analysis on a hand-made trace: phases from the annotation around each kernel's
launch, exposed communication = NCCL time with no compute kernel running, host gaps = no kernel at all."""

import pytest
from profile_step import breakdown, collective_kind


def annotation(name, ts, dur):
    return {"cat": "user_annotation", "name": name, "ts": ts, "dur": dur}


def kernel(name, ts, dur, correlation, launched_at):
    return [
        {
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "ts": launched_at,
            "dur": 1,
            "args": {"correlation": correlation},
        },
        {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}},
    ]


def test_breakdown_of_a_hand_made_step():
    events = [
        annotation("train_step", 0, 100),
        annotation("forward", 0, 40),
        annotation("backward", 40, 50),
        annotation("recompute", 50, 10),  # inside backward: the innermost annotation wins
        annotation("optimizer", 90, 10),
        *kernel("ampere_bf16_gemm", 10, 20, 1, launched_at=5),  # forward, [10, 30]
        *kernel("ampere_bf16_gemm", 55, 10, 2, launched_at=52),  # recompute, [55, 65]
        *kernel("elementwise_kernel", 70, 10, 3, launched_at=69),  # backward, [70, 80]
        *kernel("multi_tensor_apply_kernel", 92, 4, 4, launched_at=91),  # optimizer, [92, 96]
        *kernel("ncclDevKernel_AllGather_RING_LL", 20, 20, 5, launched_at=4),  # [20, 40]: 10 under compute
        *kernel("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL", 80, 5, 6, launched_at=75),  # [80, 85]: none
    ]
    b = breakdown(events)
    us = 1e-6
    assert b["steps"] == 1 and b["step_s"] == pytest.approx(100 * us)
    assert b["compute_s"] == pytest.approx(
        {"forward": 20 * us, "recompute": 10 * us, "backward": 10 * us, "optimizer": 4 * us, "other": 0.0}
    )
    assert b["collectives_s"] == pytest.approx({"all_gather": 20 * us, "reduce_scatter": 5 * us})
    assert b["exposed_s"] == pytest.approx({"all_gather": 10 * us, "reduce_scatter": 5 * us})
    # kernels cover [10, 40], [55, 65], [70, 85], [92, 96]: 59 of 100 us
    assert b["gpu_idle_s"] == pytest.approx(41 * us)


def test_collective_kinds():
    assert collective_kind("ncclDevKernel_AllGather_RING_LL") == "all_gather"
    assert collective_kind("ncclKernel_ReduceScatter_RING_LL_Sum_bfloat16") == "reduce_scatter"
    assert collective_kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "all_reduce"
    assert collective_kind("ncclDevKernel_Broadcast_RING_LL") == "other_collective"
    assert collective_kind("sm90_xmma_gemm_bf16bf16") is None
