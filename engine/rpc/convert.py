"""Conversions between the wire messages and engine types, shared by router and workers
(torch-free)."""

from __future__ import annotations

from engine.rpc import worker_pb2 as pb
from engine.sampling_params import SamplingParams

# Trailing metadata of a call a worker refused before it began (it is draining): the call
# touched nothing, so a KV handle it carried is still the prefill worker's to serve.
REFUSED_KEY = "baton-refused"


def refused_before_start(e) -> bool:
    """Whether a failed call (a grpc.aio.AioRpcError) was refused before it began."""
    return any(key == REFUSED_KEY for key, _ in (e.trailing_metadata() or ()))


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                            top_k=p.top_k, ignore_eos=p.ignore_eos, min_tokens=p.min_tokens,
                            stop_token_ids=p.stop_token_ids,
                            presence_penalty=p.presence_penalty,
                            frequency_penalty=p.frequency_penalty,
                            logit_bias=p.logit_bias, grammar=p.grammar,
                            priority=p.priority, min_p=p.min_p)
    if p.repetition_penalty != 1.0:
        msg.repetition_penalty = p.repetition_penalty
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Stop strings stay with the router, which detokenizes; workers see token-level stops."""
    return SamplingParams(
        max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p or 1.0,
        top_k=msg.top_k, seed=msg.seed if msg.HasField("seed") else None,
        ignore_eos=msg.ignore_eos, min_tokens=msg.min_tokens,
        stop_token_ids=list(msg.stop_token_ids),
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        logit_bias=dict(msg.logit_bias), grammar=msg.grammar, priority=msg.priority,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty")
        else 1.0, min_p=msg.min_p)


def top_to_proto(top: list[tuple[int, float]]) -> pb.TopLogprobList:
    return pb.TopLogprobList(items=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top])


def top_from_proto(msg: pb.TopLogprobList) -> list[tuple[int, float]]:
    return [(i.token_id, i.logprob) for i in msg.items]
