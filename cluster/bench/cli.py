"""`pdserve bench`: load-test any OpenAI-compatible server and report latency and throughput.

Exit codes: 0 when at least one request succeeded, 1 when none did (the reason is printed),
2 for invalid options (raised as BenchError, printed by cluster.cli.main).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.bench import BenchError

if TYPE_CHECKING:
    from cluster.bench.client import RequestRecord
    from cluster.bench.datasets import BenchRequest
    from cluster.bench.multiturn import MultiturnSpec
    from cluster.bench.runner import RunResult
    from engine.tokenizer import Tokenizer


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (TTFT, TPOT, ITL, throughput)",
        description=__doc__.splitlines()[0],
    )
    target = p.add_argument_group("server")
    target.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server URL, with or without /v1"
    )
    target.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions or /v1/chat/completions",
    )
    target.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    target.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    target.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    data = p.add_argument_group("workload")
    data.add_argument(
        "--dataset",
        choices=["random", "jsonl", "multiturn"],
        default="random",
        help="random: random prompts of --input-len tokens; jsonl: prompts from --dataset-path; "
        "multiturn: chats that share a system prompt",
    )
    data.add_argument("--dataset-path", default=None, help="JSONL file for --dataset jsonl")
    data.add_argument("--num-prompts", type=int, default=None, help="default: 100, or the file")
    data.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens")
    data.add_argument(
        "--output-len",
        type=int,
        default=128,
        help="max_tokens (jsonl: for lines without one)",
    )
    data.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random: lengths uniform in len*(1±r)",
    )
    chat = p.add_argument_group("multiturn: conversations that share a system prompt")
    chat.add_argument("--users", type=int, default=8, help="conversations")
    chat.add_argument("--turns", type=int, default=4, help="turns per conversation")
    chat.add_argument("--system-prompt-len", type=int, default=1024, help="shared, in words")
    chat.add_argument("--turn-len", type=int, default=128, help="words per user message")
    data.add_argument("--tokenizer", default=None, help="local HF folder: exact token-id prompts")
    data.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    load = p.add_argument_group("load and sampling")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests/s with Poisson arrivals (inf: all at once)",
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="requests in flight (default: no limit)"
    )
    load.add_argument("--ignore-eos", action="store_true", help="extension: always max_tokens")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    out = p.add_argument_group("output")
    out.add_argument(
        "--slo", default=None, help="e.g. ttft=500,tpot=50 (ms; also e2e; default: none)"
    )
    out.add_argument("--json", default=None, metavar="FILE", help="config, summary, requests")
    out.add_argument("--plot", default=None, metavar="DIR", help="latency_cdf.png, throughput.png")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from cluster.bench.datasets import DatasetSpec, load_requests
    from cluster.bench.multiturn import spec_from_args
    from cluster.bench.report import format_summary, parse_slo, summarize, write_json

    _check_options(args)
    slo = parse_slo(args.slo) if args.slo else None
    spec = DatasetSpec(
        kind=args.dataset,
        endpoint=args.endpoint,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        path=args.dataset_path,
        seed=args.seed,
    )
    multiturn = spec_from_args(args)
    requests = None if multiturn else load_requests(spec, _load_tokenizer(args.tokenizer))
    try:
        model, server, result = asyncio.run(_run(args, requests, multiturn))
    except _Unreachable as exc:
        print(f"pdserve bench: no request was sent: {exc}", file=sys.stderr)
        return 1
    summary = summarize(result.records, result.duration_s, slo)
    print(format_summary(summary, _header(args, model, server)), flush=True)
    if multiturn:
        from cluster.bench.multiturn import format_turns

        print(format_turns(result, multiturn), flush=True)
    if args.json:
        write_json(args.json, {**_config(args, model), "server": server}, summary, result.records)
    if args.plot:
        from cluster.bench.plots import write_plots

        title = f"{model}, {args.endpoint}, {_load_label(args)}"
        write_plots(result.records, result.duration_s, args.plot, title, slo)
    if summary.completed == 0:
        first_error = next(iter(summary.errors), "no requests")
        print(
            f"pdserve bench: all {summary.failed} requests failed: {first_error}", file=sys.stderr
        )
        return 1
    return 0


def _check_options(args: argparse.Namespace) -> None:
    # Checked before any network traffic, so a typo does not cost a model lookup.
    if not args.request_rate > 0:
        raise BenchError(f"--request-rate must be positive (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if not args.timeout > 0:
        raise BenchError(f"--timeout must be positive, got {args.timeout}")
    if args.output_len < 1:
        raise BenchError(f"--output-len must be at least 1, got {args.output_len}")
    if args.temperature < 0:
        raise BenchError(f"--temperature must be >= 0, got {args.temperature}")
    _check_installed(args)


def _check_installed(args: argparse.Namespace) -> None:
    """Optional packages the chosen options need, before anything runs (a missing matplotlib
    must not surface only after a long run)."""
    needed = {"matplotlib": "--plot" if args.plot else None}
    needed["tqdm"] = None if args.no_progress else "the progress bar (--no-progress: none)"
    for package, what in needed.items():
        if what and importlib.util.find_spec(package) is None:
            raise BenchError(f"{what} needs {package}: pip install 'pdserve[bench]'")


class _Unreachable(Exception):
    """Model discovery failed: the server is down or not OpenAI-compatible."""


async def _run(
    args: argparse.Namespace, requests: list[BenchRequest] | None, multiturn: MultiturnSpec | None
) -> tuple[str, dict[str, Any], RunResult]:
    """(model, what the server says it is, the run)."""
    from cluster.bench.client import OpenAIClient, build_payload
    from cluster.bench.runner import LoadSpec, run_load

    client = OpenAIClient(
        args.base_url,
        api_key=args.api_key,
        timeout=args.timeout,
        max_connections=args.max_concurrency,
    )
    async with client:
        try:
            model = args.model or await client.first_model()
        except BenchError as exc:
            raise _Unreachable(str(exc)) from exc
        server = await client.server_info()

        async def send(index: int, request: BenchRequest, origin: float) -> RequestRecord:
            payload = build_payload(
                request, args.endpoint, model, args.temperature, args.ignore_eos
            )
            return await client.send(index, args.endpoint, payload, origin)

        load = LoadSpec(
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
            progress=not args.no_progress,
        )
        if multiturn is not None:  # each turn's request depends on the last answer
            from cluster.bench.multiturn import run_conversations

            return model, server, await run_conversations(multiturn, send, load)
        assert requests is not None
        return model, server, await run_load(requests, send, load)


def _load_tokenizer(path: str | None) -> Tokenizer | None:
    if path is None:
        return None
    from engine.tokenizer import Tokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise BenchError(f"--tokenizer {path}: no tokenizer.json in that folder")
    return Tokenizer.from_folder(path)


def _load_label(args: argparse.Namespace) -> str:
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    concurrency = args.max_concurrency if args.max_concurrency else "unlimited"
    return f"rate {rate} req/s, concurrency {concurrency}"


def _header(args: argparse.Namespace, model: str, server: dict[str, Any]) -> dict[str, str]:
    return {
        **_server_rows(server),
        "Model": model,
        "Endpoint": f"/v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'}",
        "Request rate (req/s)": "inf"
        if math.isinf(args.request_rate)
        else f"{args.request_rate:g}",
        "Max concurrency": str(args.max_concurrency or "unlimited"),
    }


def _server_rows(server: dict[str, Any]) -> dict[str, str]:
    """What a pdserve server runs (its /version), so a table says what it measured."""
    deployment = server.get("deployment")
    if not isinstance(deployment, dict):
        return {"Server version": str(server["version"])} if "version" in server else {}
    settings = f"{deployment.get('device')}, {deployment.get('dtype')}"
    if deployment.get("load_format") == "random":
        settings += ", random weights"
    return {
        "Server": f"pdserve {server.get('version', '?')}",
        "Instances": f"{deployment.get('topology')}, KV over {deployment.get('transfer')}",
        "Model path": f"{deployment.get('model_path')} ({settings})",
    }


def _config(args: argparse.Namespace, model: str) -> dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "api_key")}
    config["model"] = model
    # JSON has no infinity; "inf" is also what --request-rate accepts back.
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    config["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return config
