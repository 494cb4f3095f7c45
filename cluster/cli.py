"""`pdserve` command line: generate offline, serve a topology, inspect a running cluster."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> int:
    # Imported here so `pdserve --help` does not pay for torch.
    from engine.config import EngineConfig, ModelConfig
    from engine.sampling_params import SamplingParams
    from worker.llm import LLM

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop or [],
    )
    engine = EngineConfig(tensor_parallel_size=args.tensor_parallel_size)
    llm = LLM(ModelConfig(path=args.model, device=args.device, dtype=args.dtype), engine)
    prompt = llm.encode_chat(args.prompt) if args.chat else args.prompt
    (completion,) = llm.generate([prompt], params)
    print(completion.text)
    return 0


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="run the engine offline on one prompt")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--model", default=None, help="local Hugging Face model folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks to split over")
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Prefill/decode-disaggregated LLM serving on Ray."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    from cluster.cli_serve import add_serve
    from cluster.cli_status import add_status

    add_serve(subparsers)
    add_status(subparsers)
    from cluster.bench.cli import add_bench

    add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.errors import PdserveError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
