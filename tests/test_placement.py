"""GPU placement for `baton serve` (pure: no GPU needed)."""

from __future__ import annotations

import pytest

from cluster.launcher import physical_gpus
from cluster.placement import PlacementError, place_workers, shared_gpus


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
    assert shared_gpus(one_gpu) == {0}


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
