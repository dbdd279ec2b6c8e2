"""`baton` command line. Each subcommand parses flags, then calls into the packages;
errors Baton raises on purpose are printed as one line naming the problem."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kernels.errors import BatonError
from router.policy import PolicyWeights

Handler = Callable[[argparse.Namespace], int]


def _make_model(args: argparse.Namespace) -> int:
    from kernels.checkpoint_writer import write_checkpoint
    from kernels.presets import PRESETS

    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:20s} {preset.description}")
        return 0
    if not args.preset or not args.out:
        if args.preset:
            from kernels.presets import get_preset

            get_preset(args.preset)  # an unknown preset is the more useful error
        raise BatonError("make-model needs --preset NAME and --out DIR (or --list)")
    out = write_checkpoint(args.preset, args.out, seed=args.seed,
                           shard_size_bytes=int(args.shard_size_gb * 2**30),
                           progress=not args.quiet)
    print(f"wrote {args.preset} to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(args.model, device=args.device, load_format=args.load_format)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    for out in llm.generate(args.prompt, params):
        print(repr(out.text), f"[{out.finish_reason}, {len(out.token_ids)} tokens]")
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="baton", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}

    p = sub.add_parser("make-model", help="write a random-weight HF checkpoint of a preset")
    p.add_argument("--preset", help="preset name (see --list)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size-gb", type=float, default=2.0,
                   help="split weights into shards of about this size (default 2)")
    p.add_argument("--list", action="store_true", help="list presets and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    handlers["make-model"] = _make_model

    p = sub.add_parser("generate", help="run prompts through the offline engine")
    p.add_argument("--model", required=True, help="checkpoint dir (or preset with dummy)")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    handlers["generate"] = _generate

    from cluster.worker_main import add_worker_parser, main_worker

    add_worker_parser(sub)
    handlers["worker"] = main_worker

    p = sub.add_parser("serve", help="router + workers on this machine (the embedded default)")
    add_serve_args(p)
    p.add_argument("--restart-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="start a worker that fails (exits with a nonzero status or a "
                        "signal) again on its address, backing off while it keeps failing")
    handlers["serve"] = _serve

    p = sub.add_parser("router", help="run the router against running workers")
    p.add_argument("--model", required=True, help="checkpoint dir or preset (tokenizer)")
    p.add_argument("--prefill-workers", default="", help="comma-separated host:port list")
    p.add_argument("--decode-workers", default="", help="comma-separated host:port list")
    p.add_argument("--discover", metavar="redis://HOST:PORT",
                   help="also serve the workers started with --register against this Redis "
                        "(joined and dropped as their leases come and go)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_routing_args(p)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="seconds to wait at start for every worker to answer (they load "
                        "their model first), then exit with the ones that did not")
    handlers["router"] = _router
    return parser, handlers


def add_serve_args(p: argparse.ArgumentParser, gpu_lists: bool = True) -> None:
    """`baton serve`'s flags; the Ray job (cluster/ray_job.py) takes them too, without the
    GPU lists (Ray places its workers)."""
    from cluster.worker_main import add_engine_args

    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0: aggregated)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    if gpu_lists:
        p.add_argument("--prefill-gpus", default="",
                       help="GPUs for the prefill pool, e.g. 0 or 0,1 (each worker takes --tp)")
        p.add_argument("--decode-gpus", default="",
                       help="GPUs for the decode (or aggregated) pool, e.g. 1 or 2,3")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_routing_args(p)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    add_engine_args(p)


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", default="kv",
                   choices=["kv", "round-robin", "random", "least-loaded"],
                   help="worker choice: kv = prefix overlap minus load (default)")
    p.add_argument("--local-prefill-threshold", type=int, default=0,
                   help="prefill on the decode worker when at most this many prompt tokens "
                        "are not cached there (0: always use a prefill worker)")
    p.add_argument("--prefill-overflow-wait", type=_seconds, default=0.0, metavar="SECONDS",
                   help="prefill on the decode worker too while every prefill worker would "
                        "keep a prompt waiting longer than this (at its measured speed): "
                        "bursts cost inter-token latency instead of queueing "
                        "(0: never, the default)")
    p.add_argument("--route-weights", default=PolicyWeights(), type=_route_weights,
                   metavar="NAME=X,...",
                   help="KV routing score weights, e.g. active_decode=0.05,host=0.5 "
                        "(router/policy.py PolicyWeights; default: its defaults)")
    p.add_argument("--index", default="memory",
                   help="prefix index: memory (this router only) or redis://HOST:PORT "
                        "(shared by router replicas)")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="the tool-call format the model replies in (router/tools.py; "
                        "default: the one its chat template speaks)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def _route_weights(spec: str) -> PolicyWeights:
    try:
        return PolicyWeights.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _serve(args: argparse.Namespace) -> int:
    from cluster.launcher import serve

    return serve(args)


def _router(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from cluster.launcher import router_config
    from router.app import create_app

    decode = [a for a in args.decode_workers.split(",") if a]
    if not decode and not args.discover:
        raise ValueError("--decode-workers: give at least one decode worker, or --discover "
                         "redis://HOST:PORT to serve the workers registered there")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = router_config(args, args.model,
                        prefill=[a for a in args.prefill_workers.split(",") if a],
                        decode=decode, ready_timeout_s=args.ready_timeout,
                        discover=args.discover)
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except (BatonError, ValueError) as e:
        print(f"baton {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
