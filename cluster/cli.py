"""`pdserve` command line: generate offline, serve a topology, inspect a running cluster."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, unless the help already names it or there is
    none to name (None, or False for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every `pdserve` (sub)command shows its options' defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _generate(args: argparse.Namespace) -> int:
    # Imported here so `pdserve --help` does not pay for torch.
    from engine.config import EngineConfig, ModelConfig
    from engine.errors import ConfigError
    from engine.sampling_params import SamplingParams, SamplingParamsError
    from worker.llm import LLM

    if not args.prompt:
        raise ConfigError("the prompt is empty; give the text to continue")
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=args.stop or [],
        )
    except SamplingParamsError as exc:
        detail = str(exc).removeprefix(f"{exc.param}: ")
        raise ConfigError(f"--{exc.param.replace('_', '-')}: {detail}") from None
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
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: SmolLM2-135M-Instruct, converted once "
        "into ~/.cache/pdserve)",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: GPU if any"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on CPU, bfloat16 on GPU",
    )
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="ranks to split the model over"
    )
    p.set_defaults(func=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_generate(subparsers)
    from cluster.cli_serve import add_serve
    from cluster.cli_status import add_status
    from cluster.cli_switch import add_scale, add_switch

    add_serve(subparsers)
    add_status(subparsers)
    add_switch(subparsers)
    add_scale(subparsers)
    from cluster.bench.cli import add_bench

    add_bench(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.preflight import one_line

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A user's mistake, here or inside a Ray actor, is one line; anything else is a bug and
        # keeps its traceback.
        line = one_line(exc)
        if line is None:
            raise
        print(f"pdserve: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
