"""Continuous-batching scheduler with roles (mixed, prefill, decode). Pure Python, no torch.

One turn: `schedule()` says what to compute (plain data), the model runner computes it, and
`update_from_output()` appends sampled tokens, finishes requests and frees their blocks.
`num_computed_tokens` advances when a chunk is scheduled, so a step can be scheduled before the
previous step's tokens are known. That is the overlap schedule: when `schedule()` runs before
`update_from_output()` of the step in flight, a decoding request gets a chunk whose token is
PLACEHOLDER_TOKEN (the runner takes it from the previous step's sampled ids on the device), and
a request that finished in the step in flight computes one extra token that is dropped.

Roles only change where a request enters and leaves:
- mixed: `add_request` -> prefill (chunked) -> decode -> finished.
- prefill: `add_request` with blocks already reserved by the prepare pool -> prefill -> the first
  token moves the request to SENDING_KV with its blocks held -> `release_sent(...)` frees them.
- decode: `reserve_remote(...)` allocates blocks (WAITING_FOR_KV) -> `start_remote(...)` once the
  KV and the first token are in -> decode -> finished.
"""

from __future__ import annotations

import itertools
from collections import deque

from engine.batch import PLACEHOLDER_TOKEN, ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from engine.block_manager import BlockManager
from engine.config import Role, SchedulerConfig
from engine.outputs import TokenDelta, TokenLogprobs
from engine.request import Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        role: Role = Role.MIXED,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.role = role
        self.requests: dict[str, Request] = {}  # every request holding state here
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._released: list[str] = []
        self._step_ids = itertools.count()
        self._step_id = -1  # of the schedule() call in progress or last made
        # Request id -> step that preempted it: a token from an earlier step is stale (overlap
        # schedule: it may arrive after the request was re-admitted in that very step).
        self._preempted_at: dict[str, int] = {}
        self.num_preemptions = 0

    # ------------------------------------------------------------------ entry points
    def add_request(self, request: Request) -> None:
        """Queue a request for prefill. In the prefill role it must hold a reservation."""
        assert self.role is not Role.DECODE, "decode instances take requests via reserve_remote"
        if self.role is Role.PREFILL:
            reserved = self.requests.get(request.request_id)
            assert reserved is request, "prefill role: reserve_prefill() first"
            assert request.status is RequestStatus.WAITING_FOR_ALLOCATION
        else:
            self._check_new(request)
            self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def reserve_prefill(self, request: Request) -> bool:
        """Prefill role: take blocks for the whole prompt now (prefix cache consulted), while the
        prepare pool finds a decode instance. False when the blocks are not there."""
        assert self.role is Role.PREFILL
        self._check_new(request)
        if not self.block_manager.can_allocate(request, request.num_prompt_tokens):
            return False
        self.block_manager.allocate(request, request.num_prompt_tokens)
        request.status = RequestStatus.WAITING_FOR_ALLOCATION
        self.requests[request.request_id] = request
        return True

    def _check_new(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id}")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens; the context is {self.max_model_len}"
            )

    def release_sent(self, request_id: str, status: RequestStatus) -> Request | None:
        """Prefill role: the KV of a SENDING_KV request is on its D (or failed); free blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, status)
        return request

    def reserve_remote(self, request: Request, reuse_prefix: bool = False) -> bool:
        """Decode role: blocks for the prompt plus the first token. With `reuse_prefix`, first
        the cached blocks that hold a prefix of the prompt (`request.num_cached_tokens`: their
        KV need not be sent), then fresh ones for the KV that P writes."""
        assert self.role is Role.DECODE
        self._check_new(request)
        if (
            len(self.running) + self.num_with_status(RequestStatus.WAITING_FOR_KV)
            >= self.config.max_num_seqs
        ):
            return False
        prefix = request.prompt_token_ids if reuse_prefix else []
        allocation = self.block_manager.allocate_remote(
            prefix, request.num_prompt_tokens + 1, cache_salt=request.sampling_params.cache_salt
        )
        if allocation is None:
            return False
        request.block_ids, cached_blocks = allocation
        request.num_cached_tokens = cached_blocks * self.block_manager.block_size
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        return True

    def start_remote(self, request_id: str, first_token_id: int) -> TokenDelta | None:
        """Decode role: KV and the first token arrived; the request joins the decode batch."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.WAITING_FOR_KV:
            return None
        request.num_computed_tokens = request.num_prompt_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return self._append_token(request, first_token_id)

    def abort_request(self, request_id: str, status=RequestStatus.FINISHED_ABORTED) -> bool:
        """Finish a request wherever it is; its blocks are freed. False if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._finish(request, status)
        return True

    def switch_role(self, role: Role, config: SchedulerConfig) -> None:
        """Serve as `role`, with that role's batching, from the next step on (elastic
        prefill/decode). Only an empty scheduler switches: the old role's requests have
        finished or moved, so no request ever sees two roles. The KV blocks stay (free)."""
        if self.requests:
            raise RuntimeError(
                f"cannot switch to {role.value}: {len(self.requests)} requests are still here"
            )
        if config.block_size != self.block_manager.block_size:
            raise ValueError(
                f"block size {config.block_size} differs from the KV cache's "
                f"{self.block_manager.block_size}"
            )
        self.role = role
        self.config = config

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(step_id=next(self._step_ids))
        self._step_id = out.step_id
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        self._schedule_waiting(out, budget)
        # Decode chunks first: the runner batches them together.
        out.chunks.sort(key=lambda c: not c.is_decode)
        out.released_request_ids, self._released = self._released, []
        return out

    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        logprobs = result.logprobs
        for index, (chunk, token_id) in enumerate(
            zip(sched.chunks, result.sampled_token_ids, strict=True)
        ):
            request = self.requests.get(chunk.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran; its token is dropped
            if self._preempted_at.get(chunk.request_id, -1) > sched.step_id:
                continue  # preempted after this step was launched; recomputed since
            self.block_manager.commit_full_blocks(request)
            if token_id is not None:
                token_logprobs = logprobs[index] if logprobs is not None else None
                deltas.append(self._append_token(request, token_id, token_logprobs))
        return deltas

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ internals
    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                index += 1
                continue
            if not self._make_room(request, num_new):
                break  # the request preempted itself
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            remaining = request.num_tokens - request.num_computed_tokens
            if not self.config.enable_chunked_prefill and remaining > budget and out.chunks:
                return  # whole prompts only: wait for a step with room
            if not request.block_ids and not self.block_manager.can_allocate(
                request, request.num_tokens
            ):
                return  # no preemption for admissions: running requests keep priority
            if not request.block_ids:
                self.block_manager.allocate(request, request.num_tokens)
            num_new = self._num_new_tokens(request, budget)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens_with_pending - request.num_computed_tokens
        if remaining <= 0:
            return 0  # nothing to compute (e.g. a prefill-role request awaiting its transfer)
        if request.pending_samples and not request.may_sample_more(self.max_model_len):
            return 0  # the token in flight is its last one
        if not self.config.enable_chunked_prefill:
            return remaining
        return min(remaining, budget)

    def _make_room(self, request: Request, num_new: int) -> bool:
        """Ensure blocks for the request's next tokens, preempting from the tail if needed."""
        target = request.num_computed_tokens + num_new
        if len(request.block_ids) * self.block_manager.block_size >= target:
            return True  # the last block has room: most decode steps
        while not self.block_manager.can_allocate(request, target):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        self.block_manager.allocate(request, target)
        return True

    def _preempt(self, request: Request) -> None:
        """Recompute later: free the blocks, keep the tokens, requeue at the front."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.pending_samples = 0  # a token in flight is dropped and sampled again
        request.output_counted = False  # released: the runner forgets its counts
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self._released.append(request.request_id)
        self.num_preemptions += 1
        self._preempted_at[request.request_id] = self._step_id

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        # A migrated request's prompt ends with output of its earlier run (SamplingParams).
        prior = request.sampling_params.prior_output_tokens
        start = request.num_computed_tokens
        tokens = request.token_slice(start, start + num_new)
        tokens += [PLACEHOLDER_TOKEN] * (num_new - len(tokens))  # sampled, not read back yet
        request.num_computed_tokens += num_new
        sample = request.num_computed_tokens == request.num_tokens_with_pending
        chunk = ScheduledChunk(
            request_id=request.request_id,
            token_ids=tokens,
            start_pos=start,
            block_ids=request.block_ids,  # the table itself: no copy per step (see batch.py)
            sample=sample,
            sampling_params=request.sampling_params,
            num_generated=prior + request.num_output_tokens + request.pending_samples,
        )
        if sample and request.sampling_params.has_penalties and not request.output_counted:
            # The runner keeps penalty counts on the device and adds each token it samples;
            # it needs the output once, when the request is (re)admitted (nothing in flight).
            # A migrated request's earlier output ends its prompt and counts too.
            assert request.pending_samples == 0
            earlier = request.prompt_token_ids[request.num_prompt_tokens - prior :] if prior else []
            chunk.output_token_ids = earlier + list(request.output_token_ids)
            request.output_counted = True
        request.pending_samples += sample
        return chunk

    def _append_token(
        self, request: Request, token_id: int, logprobs: TokenLogprobs | None = None
    ) -> TokenDelta:
        request.output_token_ids.append(token_id)
        request.pending_samples = max(0, request.pending_samples - 1)
        stop = request.check_stop(self.max_model_len)
        if stop is not None:
            self._finish(request, stop)
        elif self.role is Role.PREFILL:
            # The first token ends P's part; the blocks stay until the KV is on its D.
            self.running.remove(request)
            request.status = RequestStatus.SENDING_KV
        return TokenDelta(
            request_id=request.request_id,
            new_token_ids=[token_id],
            status=request.status,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
            logprobs=None if logprobs is None else [logprobs],
        )

    def _finish(self, request: Request, status: RequestStatus) -> None:
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        if request.block_ids:
            self.block_manager.commit_full_blocks(request)
            self.block_manager.free(request)
        request.status = status
        self.requests.pop(request.request_id, None)
        self._preempted_at.pop(request.request_id, None)
        self._released.append(request.request_id)

    def num_with_status(self, status: RequestStatus) -> int:
        return sum(r.status is status for r in self.requests.values())

    def check_invariants(self) -> None:
        """Every live request's blocks are accounted for; queues hold only their statuses."""
        assert all(r.status is RequestStatus.RUNNING for r in self.running)
        assert all(r.status is RequestStatus.WAITING for r in self.waiting)
        assert len({id(r) for r in self.running} | {id(r) for r in self.waiting}) == len(
            self.running
        ) + len(self.waiting)
        for request in self.requests.values():
            assert not request.finished, request.request_id
        self.block_manager.check_invariants(list(self.requests.values()))
