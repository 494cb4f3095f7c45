"""`pdserve bench`: a load generator for any OpenAI-compatible server.

One module per stage, each usable on its own:

- datasets: the workload (random lengths or a JSONL file) as a list of BenchRequest
- client: one streamed request -> one RequestRecord (TTFT, inter-token gaps, usage)
- runner: arrival process (Poisson or all at once), concurrency limit, progress bar
- report: summary statistics, goodput against SLOs, the printed table and the JSON file
- plots: latency CDFs and throughput over time (matplotlib, Agg backend)
- cli: the `bench` subcommand wiring them together
"""

from __future__ import annotations

from engine.errors import PdserveError


class BenchError(PdserveError):
    """A benchmark setting or input file is invalid; the message says which."""
