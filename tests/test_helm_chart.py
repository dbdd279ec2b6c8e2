"""The Helm chart (helm/baton): linted and rendered by Helm itself (its Go SDK through
helm-python-sdk, as `helm lint --strict` and `helm template` do), every rendered object
validated against Kubernetes 1.30's schemas, and the rendered command lines parsed by
Baton's own CLI parsers, so a flag the chart passes must exist. No cluster here: what a
deployment then does is not tested."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (test extras)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test extras")

CHART = str(Path(__file__).resolve().parents[1] / "helm" / "baton")
KUBE = "1.30.0"


def render(values: dict | None = None, name: str = "demo") -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        files = chart.render(values or {}, name=name, namespace="llm", is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in files.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE, strict=True)
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def parse(command: list[str], args: list[str]):
    from cluster.cli import build_parser

    parser, _ = build_parser()
    assert command[0] == "baton"
    return parser.parse_args([*command[1:], *args])


def test_lints_clean_in_strict_mode() -> None:
    result = helm.lint(CHART, strict=True, kube_version=KUBE)
    assert result["errors"] == []
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def test_default_is_one_prefill_and_one_decode_worker_behind_the_router() -> None:
    docs = render()
    router = container(find(docs, "Deployment", "demo-baton-router"))
    args = parse(router["command"], router["args"])
    assert args.prefill_workers == "demo-baton-prefill-0.demo-baton-prefill.llm.svc:50051"
    assert args.decode_workers == "demo-baton-decode-0.demo-baton-decode.llm.svc:50051"
    assert (args.routing, args.index, args.host) == ("kv", "memory", "0.0.0.0")
    assert args.ready_timeout == 1800
    for pool in ("prefill", "decode"):
        sts = find(docs, "StatefulSet", f"demo-baton-{pool}")
        svc = find(docs, "Service", f"demo-baton-{pool}")
        assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
        assert svc["spec"]["clusterIP"] == "None"
        worker = container(sts)
        wargs = parse(worker["command"], worker["args"])
        assert (wargs.role, wargs.device, wargs.tp, wargs.host) == (pool, "cuda", 1, "$(POD_IP)")
        assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
        env = {e["name"]: e.get("value") for e in worker["env"]}
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["NVSHMEM_DISABLE_NVLS"] == "1"
        assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and "POD_IP" in env
        # SIGTERM drains for drainSeconds; Kubernetes waits longer than that to kill.
        assert wargs.drain_seconds == 30
        assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]


def test_pools_scale_with_tp_and_the_router_lists_every_worker() -> None:
    docs = render({"prefill": {"replicas": 2, "tp": 4, "maxNumBatchedTokens": 16384},
                   "decode": {"replicas": 3, "tp": 2, "port": 6000,
                              "extraArgs": ["--host-kv-gb", "64"],
                              "resources": {"limits": {"memory": "200Gi"}}},
                   "kvTransfer": "nixl", "blockSize": 64,
                   "router": {"replicas": 2, "routing": "round-robin",
                              "localPrefillThreshold": 64, "prefillOverflowWait": 1.5}})
    router = container(find(docs, "Deployment", "demo-baton-router"))
    args = parse(router["command"], router["args"])
    assert (args.local_prefill_threshold, args.prefill_overflow_wait) == (64, 1.5)
    assert args.prefill_workers.split(",") == [
        f"demo-baton-prefill-{i}.demo-baton-prefill.llm.svc:50051" for i in range(2)]
    assert args.decode_workers.split(",") == [
        f"demo-baton-decode-{i}.demo-baton-decode.llm.svc:6000" for i in range(3)]
    assert args.routing == "round-robin"
    decode = container(find(docs, "StatefulSet", "demo-baton-decode"))
    wargs = parse(decode["command"], decode["args"])
    assert (wargs.tp, wargs.kv_transfer, wargs.port, wargs.host_kv_gb) == (2, "nixl", 6000, 64)
    assert wargs.block_size == 64
    assert decode["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "200Gi"}
    prefill = container(find(docs, "StatefulSet", "demo-baton-prefill"))
    pargs = parse(prefill["command"], prefill["args"])
    assert (pargs.max_num_batched_tokens, pargs.block_size) == (16384, 64)  # pools agree
    assert find(docs, "StatefulSet", "demo-baton-prefill")["spec"]["replicas"] == 2


def test_aggregated_mode_runs_one_pool_of_workers_doing_both() -> None:
    docs = render({"mode": "aggregated", "decode": {"replicas": 2}})
    assert not [d for d in docs if "prefill" in d["metadata"]["name"]]
    router = container(find(docs, "Deployment", "demo-baton-router"))
    args = parse(router["command"], router["args"])
    assert args.prefill_workers == "" and len(args.decode_workers.split(",")) == 2
    worker = container(find(docs, "StatefulSet", "demo-baton-decode"))
    assert parse(worker["command"], worker["args"]).role == "both"


def test_redis_index_in_the_release_or_outside_it() -> None:
    docs = render({"router": {"index": "redis"}, "redis": {"enabled": True}})
    find(docs, "Deployment", "demo-baton-redis")
    find(docs, "Service", "demo-baton-redis")
    router = container(find(docs, "Deployment", "demo-baton-router"))
    assert parse(router["command"], router["args"]).index == "redis://demo-baton-redis:6379"
    docs = render({"router": {"index": "redis"}, "redis": {"url": "redis://cache:6379"}})
    router = container(find(docs, "Deployment", "demo-baton-router"))
    assert parse(router["command"], router["args"]).index == "redis://cache:6379"
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]


def test_with_discovery_workers_register_and_the_router_lists_none() -> None:
    docs = render({"discovery": {"enabled": True, "leaseSeconds": 5}, "redis": {"enabled": True},
                   "decode": {"replicas": 2}})
    router = container(find(docs, "Deployment", "demo-baton-router"))
    args = parse(router["command"], router["args"])
    assert args.discover == "redis://demo-baton-redis:6379"
    assert (args.prefill_workers, args.decode_workers) == ("", "")
    for pool in ("prefill", "decode"):
        worker = container(find(docs, "StatefulSet", f"demo-baton-{pool}"))
        wargs = parse(worker["command"], worker["args"])
        assert (wargs.register, wargs.lease_seconds) == ("redis://demo-baton-redis:6379", 5)
        assert wargs.host == "$(POD_IP)"  # what routers are told to dial
    docs = render({"discovery": {"enabled": True}, "redis": {"url": "redis://cache:6379"}})
    router = container(find(docs, "Deployment", "demo-baton-router"))
    assert parse(router["command"], router["args"]).discover == "redis://cache:6379"


def test_model_volume_is_mounted_in_the_router_and_every_worker() -> None:
    volume = {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    docs = render({"model": {"name": "/models/llama-3.1-70b", "volume": volume}})
    for kind, name in [("Deployment", "demo-baton-router"),
                       ("StatefulSet", "demo-baton-prefill"),
                       ("StatefulSet", "demo-baton-decode")]:
        pod = find(docs, kind, name)["spec"]["template"]["spec"]
        assert {"name": "models", **volume} in pod["volumes"]
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "models", "mountPath": "/models", "readOnly": True} in mounts


def test_long_release_names_leave_room_for_kubernetes_labels() -> None:
    docs = render(name="production-llama-70b-instruct-east-us-2-canary")
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63
        if doc["kind"] == "StatefulSet":  # + "-" + a 10-character revision hash <= 63
            assert len(doc["metadata"]["name"]) <= 52, doc["metadata"]["name"]


def test_router_waits_for_loading_workers_without_being_restarted() -> None:
    docs = render({"startupSeconds": 3600})
    router = container(find(docs, "Deployment", "demo-baton-router"))
    probe = router["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > 3600
    assert parse(router["command"], router["args"]).ready_timeout == 3600


@pytest.mark.parametrize("values,message", [
    ({"kvTransfer": "nccl", "decode": {"tp": 2}}, "kvTransfer nccl works between single-GPU"),
    ({"mode": "split"}, "mode"),
    ({"kvTransfer": "rdma"}, "kvTransfer"),
    ({"blockSize": 48}, "blockSize"),
    ({"decode": {"tp": 0}}, "tp"),
    ({"router": {"routing": "best"}}, "routing"),
    ({"router": {"index": "redis"}}, "router.index redis needs redis.enabled"),
    ({"decode": {"replicas": 0}}, "decode.replicas must be at least 1"),
    ({"discovery": {"enabled": True}}, "discovery.enabled needs redis.enabled"),
    ({"discovery": {"leaseSeconds": 0}}, "leaseSeconds"),
    ({"router": {"prefillOverflowWait": -1}}, "prefillOverflowWait"),
    ({"prefill": {"replicas": 0}}, "mode disaggregated needs prefill.replicas >= 1"),
])
def test_bad_values_fail_naming_what_is_wrong(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)
