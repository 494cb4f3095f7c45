"""Host overhead per decode step, and the router's streaming rate (CPU; no model forward).

Part 1, engine + runner host work of one decode step at batch 256, 1k and 8k contexts: the
scheduler (schedule + update_from_output), the step's input preparation (the Triton metadata the
GPU path builds, and the torch backend's) and sampling (rows and sampler, on tiny logits, with
seeded + penalized requests). Goal: 8k <= 1.2x 1k. The baseline row prepares the Triton inputs
without the runner's device-side block tables (every sequence's whole table each step, as before
they existed).

Part 2, the router on one core: stand-in instances (real zmq senders, one TokenBatch per step for
all their requests, as a decode instance sends) stream to stand-in clients (real HTTP SSE
clients, aiohttp) through a real router (FastAPI under uvicorn, dispatcher, detokenizer) pinned
to one core. Goal: >= 20,000 tokens/s.

    python benchmarks/host_overhead.py [--steps 30] [--router-requests 128] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH, BLOCK, OUTPUT = 256, 16, 512


# ----------------------------------------------------------------------------- part 1: engine
def build_scheduler(context: int, seeded_penalized: bool):
    """256 requests whose KV holds `context` tokens (the last OUTPUT of them generated)."""
    from engine.batch import ModelRunnerOutput
    from engine.block_manager import BlockManager
    from engine.config import SchedulerConfig
    from engine.request import Request
    from engine.sampling_params import SamplingParams
    from engine.scheduler import Scheduler

    config = SchedulerConfig(
        block_size=BLOCK,
        max_num_seqs=BATCH,
        max_num_batched_tokens=BATCH * (context + 1),
        enable_prefix_caching=True,
    )
    blocks = BlockManager(BATCH * (context // BLOCK + 8), BLOCK, True)
    sched = Scheduler(config, blocks, max_model_len=context + 4096)
    for i in range(BATCH):
        params = SamplingParams(
            temperature=0.8 if seeded_penalized else 0.0,
            seed=i if seeded_penalized else None,
            frequency_penalty=0.5 if seeded_penalized else 0.0,
            max_tokens=10**6,
            ignore_eos=True,
        )
        prompt = [(i * 7 + j) % 1000 + 3 for j in range(context - OUTPUT)]
        request = Request(f"r{i}", prompt, params)
        request.output_token_ids = [(i + j) % 1000 + 3 for j in range(OUTPUT)]  # a long answer
        sched.add_request(request)
    prefill = sched.schedule()  # the whole context in one step: not timed
    ids = [c.request_id for c in prefill.chunks]
    sched.update_from_output(prefill, ModelRunnerOutput(prefill.step_id, ids, [5] * len(ids)))
    return sched


def time_steps(context: int, seeded_penalized: bool, steps: int, warmup: int = 5) -> dict:
    """Median ms per decode step of each host part."""
    import torch

    from engine.batch import ModelRunnerOutput
    from worker.attention.block_tables import BlockTables
    from worker.attention.metadata import prepare_step_inputs
    from worker.attention.triton_metadata import prepare_triton_inputs
    from worker.sampler import Sampler, SamplingRow

    cpu = torch.device("cpu")
    # The inputs go to the meta device: tensors without data, so the device's work (on a GPU
    # asynchronous, here it would run on this CPU) is left out and the host's work remains.
    meta = torch.device("meta")
    sched = build_scheduler(context, seeded_penalized)
    width = -(-(context + 4096) // BLOCK)
    triton_tables = BlockTables(BLOCK, width, meta)
    torch_tables = BlockTables(BLOCK, width, meta)
    sampler = Sampler(cpu)
    logits = torch.randn(BATCH, 256)
    parts: dict[str, list[float]] = {k: [] for k in _PARTS}
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        triton_tables.release(out.released_request_ids)
        prepare_triton_inputs(out.chunks, BLOCK, meta, None, triton_tables)
        t2 = time.perf_counter()
        torch_tables.release(out.released_request_ids)
        prepare_step_inputs(out.chunks, BLOCK, meta, None, torch_tables)
        t3 = time.perf_counter()
        rows = [
            SamplingRow(c.sampling_params, c.num_generated, c.output_token_ids, c.request_id)
            for c in out.chunks
        ]
        sampler(logits, rows)
        t4 = time.perf_counter()
        prepare_triton_inputs(out.chunks, BLOCK, meta, None)  # baseline: whole tables
        t5 = time.perf_counter()
        ids = [c.request_id for c in out.chunks]
        sched.update_from_output(out, ModelRunnerOutput(out.step_id, ids, [5] * len(ids)))
        t6 = time.perf_counter()
        if step >= warmup:
            parts["scheduler"].append((t1 - t0) + (t6 - t5))
            parts["triton inputs"].append(t2 - t1)
            parts["torch inputs"].append(t3 - t2)
            parts["sampling"].append(t4 - t3)
            parts["baseline: whole tables"].append(t5 - t4)
    result = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    result["scheduler + inputs (goal)"] = result["scheduler"] + result["triton inputs"]
    return result


_PARTS = ("scheduler", "triton inputs", "torch inputs", "sampling", "baseline: whole tables")


def engine_table(steps: int) -> list[str]:
    import torch

    torch.set_num_threads(1)
    lines = [
        "| requests | part | 1k ctx ms/step | 8k ctx ms/step | 8k / 1k |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for seeded_penalized in (False, True):
        label = "seeded+penalties" if seeded_penalized else "greedy"
        short = time_steps(1024, seeded_penalized, steps)
        long = time_steps(8192, seeded_penalized, steps)
        for part in ("scheduler + inputs (goal)", *_PARTS):
            a, b = short[part], long[part]
            lines.append(f"| {label} | {part} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    return lines


# ----------------------------------------------------------------------------- part 2: router
def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and core < os.cpu_count():
        os.sched_setaffinity(0, {core})


def _stand_in_instances(count: int, step_s: float, ready: mp.Queue, stop: mp.Event) -> None:
    """Mixed-role stand-ins: take GenerateRequests, stream one token per request per step."""
    _pin(1)
    from engine.config import Role
    from engine.protocol.channels import Inbox, Sender
    from engine.protocol.identity import InstanceId
    from engine.protocol.requests import AbortRequest, GenerateRequest
    from engine.protocol.tokens import TokenBatch, TokenItem

    def serve(name: InstanceId, inbox: Inbox) -> None:
        active: dict[str, list] = {}  # request id -> [reply_to, next index, max tokens, prompt]
        senders: dict[str, Sender] = {}
        next_step = time.monotonic()
        while not stop.is_set():
            msg = inbox.recv(timeout_s=max(0.0, next_step - time.monotonic()))
            if isinstance(msg, GenerateRequest):
                active[msg.request_id] = [
                    msg.reply_to,
                    0,
                    msg.sampling.max_tokens,
                    len(msg.prompt_token_ids),
                ]
            elif isinstance(msg, AbortRequest):
                active.pop(msg.request_id, None)
            if time.monotonic() < next_step:
                continue
            next_step += step_s
            by_router: dict[str, list[TokenItem]] = {}
            for rid, state in list(active.items()):
                reply_to, index, max_tokens, prompt_len = state
                done = index + 1 >= max_tokens
                item = TokenItem(
                    rid,
                    index,
                    [40 + index % 60],  # valid in any vocabulary (a byte tokenizer's too)
                    finish_reason="length" if done else None,
                    num_prompt_tokens=prompt_len,
                )
                by_router.setdefault(reply_to, []).append(item)
                state[1] = index + 1
                if done:
                    del active[rid]
            for address, items in by_router.items():
                if address not in senders:
                    senders[address] = Sender(address)
                senders[address].send(TokenBatch(name, items))

    names = [InstanceId(Role.MIXED, i) for i in range(count)]
    inboxes = []
    for name in names:
        inbox = Inbox("127.0.0.1", accept=(GenerateRequest, AbortRequest), name=str(name))
        inboxes.append(inbox)
        threading.Thread(target=serve, args=(name, inbox), daemon=True).start()
    pairs = zip(names, inboxes, strict=True)
    ready.put([{"name": n, "role": "mixed", "inbox": b.address} for n, b in pairs])
    stop.wait()


def _router(endpoints: list[dict], tokenizer_folder: str, ready: mp.Queue, stop: mp.Event) -> None:
    """A real router pinned to one core."""
    _pin(0)
    from cluster.config import RouterConfig
    from cluster.router.app import create_app
    from cluster.router.dispatcher import Dispatcher, InstanceEndpoint
    from cluster.router.drain import DrainState
    from cluster.router.server import RouterServer
    from engine.config import ModelConfig
    from engine.tokenizer import Tokenizer
    from worker.engine_core import resolve_model_path

    if not tokenizer_folder:
        try:
            tokenizer_folder = str(resolve_model_path(ModelConfig()))
        except Exception:  # no default model here (a bare GPU host): a byte-level one
            tokenizer_folder = _byte_tokenizer_folder()
    tokenizer = Tokenizer.from_folder(tokenizer_folder)
    config = RouterConfig(host="127.0.0.1", port=0, max_inflight_requests=4096)
    dispatcher = Dispatcher([InstanceEndpoint.from_dict(e) for e in endpoints], "127.0.0.1", config)
    drain = DrainState()
    app = create_app(
        dispatcher,
        tokenizer,
        max_model_len=8192,
        model_name="m",
        config=config,
        health=None,
        drain=drain,
    )
    server = RouterServer(app, dispatcher, config.host, config.port, drain)
    ready.put(server.start(timeout_s=30))
    stop.wait()
    server.stop()


def _byte_tokenizer_folder() -> str:
    """A byte-level tokenizer (one token per byte), saved as a folder."""
    import tempfile

    from benchmarks.model_folders import write_byte_tokenizer

    return str(write_byte_tokenizer(Path(tempfile.mkdtemp(prefix="bytetok"))))


async def _clients(url: str, requests: int, max_tokens: int) -> tuple[int, float]:
    """`requests` concurrent streaming completions; returns (tokens, seconds)."""
    import json

    import aiohttp

    body = {
        "prompt": "Tell me a story.",
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one() -> int:
            tokens = 0
            async with session.post(f"{url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
            return tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(requests)))
        return sum(counts), time.perf_counter() - start


def router_rate(
    requests: int, max_tokens: int, step_s: float, tokenizer: str, rounds: int = 2
) -> list[str]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready = ctx.Queue()
    instances = ctx.Process(target=_stand_in_instances, args=(2, step_s, ready, stop))
    instances.start()
    endpoints = ready.get(timeout=60)
    router = ctx.Process(target=_router, args=(endpoints, tokenizer, ready, stop))
    router.start()
    url = ready.get(timeout=120)
    print(f"(router pid {router.pid})", file=sys.stderr, flush=True)
    _pin(1)
    offered = requests / step_s
    lines = [
        "| round | streams | tokens | seconds | router tokens/s | offered tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    try:
        asyncio.run(_clients(url, 16, 16))  # warm-up
        for r in range(rounds):
            tokens, seconds = asyncio.run(_clients(url, requests, max_tokens))
            lines.append(
                f"| {r + 1} | {requests} | {tokens} | {seconds:.2f} | {tokens / seconds:,.0f} "
                f"| {offered:,.0f} |"
            )
    finally:
        stop.set()
        router.join(30)
        instances.join(10)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per setting")
    parser.add_argument("--router-requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=2.0, help="stand-in instance step")
    parser.add_argument(
        "--tokenizer", default="", help="model folder with the tokenizer (default: default model)"
    )
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-router", action="store_true")
    args = parser.parse_args()
    if not args.skip_engine:
        print(f"Decode step host work, batch {BATCH}, block {BLOCK}, one thread:")
        print("\n".join(engine_table(args.steps)))
    if not args.skip_router:
        print("\nRouter streaming on one core (2 stand-in instances, SSE clients):")
        print(
            "\n".join(
                router_rate(
                    args.router_requests, args.max_tokens, args.step_ms / 1e3, args.tokenizer
                )
            )
        )


if __name__ == "__main__":
    main()
