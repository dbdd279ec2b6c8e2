"""GPU placement for `baton serve` (pure: no GPU needed)."""

from __future__ import annotations

import pytest

from cluster.launcher import physical_gpus
from cluster.placement import PlacementError, check_memory_shares, place_workers, shared_gpus
from engine.kv_sizing import FREE_MARGIN_BYTES, kv_budget_bytes


def gpus(placements):
    return [(p.role, p.gpus) for p in placements]


def test_explicit_pools_with_tensor_parallel_workers() -> None:
    got = place_workers(["prefill", "decode", "decode"], "cuda", 2, 8,
                        prefill_gpus="0,1", decode_gpus="4,5,6,7")
    assert gpus(got) == [("prefill", (0, 1)), ("decode", (4, 5)), ("decode", (6, 7))]
    assert got[1].visible_devices == "4,5" and not shared_gpus(got)


def test_default_order_and_sharing_when_gpus_run_out() -> None:
    assert gpus(place_workers(["prefill", "decode"], "cuda", 1, 2)) == \
        [("prefill", (0,)), ("decode", (1,))]
    one_gpu = place_workers(["prefill", "decode"], "cuda", 1, 1)
    assert gpus(one_gpu) == [("prefill", (0,)), ("decode", (0,))]
    assert shared_gpus(one_gpu) == {0: 2}


def test_workers_sharing_a_gpu_must_fit_their_shares_on_it() -> None:
    two_on_one = place_workers(["both", "both"], "cuda", 1, 1)
    check_memory_shares(two_on_one, 0.45, None)
    with pytest.raises(ValueError, match=r"--gpu-memory-utilization 0.90 .* 1.80 of a card; "
                                         r"give each at most 0.45"):
        check_memory_shares(two_on_one, 0.9, None)
    check_memory_shares(two_on_one, 0.9, 4096)  # sized by --kv-blocks: shares unused
    check_memory_shares(place_workers(["both", "both"], "cuda", 1, 2), 0.9, None)


GIB = 2**30


@pytest.mark.parametrize("case, util, free, own, reserve, expected", [
    # One worker on an empty 100 GiB card: its share less its weights and reserve.
    ("alone", 0.9, 99 * GIB, 16 * GIB, 2 * GIB, 72 * GIB),
    # The second of two workers at 0.45 each, after the first took its 45 GiB: its own
    # share, where the old ceiling (0.45 of the card minus everything used) left nothing.
    ("second of two", 0.45, 38 * GIB, 16 * GIB, 2 * GIB, 27 * GIB),
    # Less free than the share (another process holds memory): what is free, less margin.
    ("crowded", 0.9, 20 * GIB, 16 * GIB, 2 * GIB, 18 * GIB - FREE_MARGIN_BYTES),
    ("nothing left", 0.2, 50 * GIB, 19 * GIB, 2 * GIB, 0),
])
def test_kv_budget_is_the_workers_share_within_free_memory(case, util, free, own, reserve,
                                                            expected) -> None:
    assert kv_budget_bytes(util, 100 * GIB, free, own, reserve) == expected, case


def test_aggregated_workers_use_the_decode_pool() -> None:
    assert gpus(place_workers(["both", "both"], "cuda:0", 1, 4, decode_gpus="2,3")) == \
        [("both", (2,)), ("both", (3,))]


def test_cpu_has_no_gpus_and_rejects_gpu_flags() -> None:
    assert gpus(place_workers(["both"], "cpu", 1, 0)) == [("both", ())]
    with pytest.raises(PlacementError, match="need --device cuda"):
        place_workers(["both"], "cpu", 1, 0, decode_gpus="0")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prefill_gpus": "0", "decode_gpus": "1,2"}, "--prefill-gpus: 1 prefill worker"),
    ({"decode_gpus": "1,9"}, "--decode-gpus: this machine has GPUs 0..3"),
    ({"decode_gpus": "1,x"}, "--decode-gpus: expected comma-separated"),
    ({"decode_gpus": "1,1"}, "distinct"),
])
def test_bad_placements_name_the_flag(kwargs, message) -> None:
    with pytest.raises(PlacementError, match=message):
        place_workers(["prefill", "decode"], "cuda", 2, 4, **kwargs)


def test_tp_larger_than_the_machine() -> None:
    with pytest.raises(PlacementError, match="--tp 4: this machine has 2"):
        place_workers(["both"], "cuda", 4, 2)


def test_gpu_indices_follow_the_launchers_visible_devices() -> None:
    # `CUDA_VISIBLE_DEVICES=2,3 baton serve --decode-gpus 1` must land on physical GPU 3.
    assert physical_gpus((0,), None) == "0"
    assert physical_gpus((1,), "2,3") == "3"
    assert physical_gpus((0, 1), "GPU-a, GPU-b") == "GPU-a,GPU-b"


def test_nccl_transfer_refuses_a_gpu_shared_by_prefill_and_decode() -> None:
    from cluster.placement import check_kv_transfer

    one_gpu = place_workers(["prefill", "decode"], "cuda", 1, 1)  # both wrap onto GPU 0
    with pytest.raises(PlacementError, match=r"--kv-transfer nccl: GPU\(s\) \[0\]"):
        check_kv_transfer(one_gpu, "nccl")
    check_kv_transfer(one_gpu, "nixl")  # NIXL over cuda_ipc works within one GPU
    two = place_workers(["prefill", "decode", "decode"], "cuda", 1, 3)
    check_kv_transfer(two, "nccl")  # decode workers may share with each other
