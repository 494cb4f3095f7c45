"""Offline generation on one engine instance: what `pdserve generate` and the benchmarks use."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from worker.engine_core import EngineCore


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


class LLM:
    """Tokenize, run the engine to completion, detokenize (stop strings included)."""

    def __init__(self, model: ModelConfig | None = None, engine: EngineConfig | None = None):
        self.core = EngineCore(model or ModelConfig(), engine or EngineConfig())
        self.tokenizer = Tokenizer.from_folder(self.core.model_path)
        self._ids = itertools.count()

    def encode_chat(self, user_message: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}])
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
    ) -> list[Completion]:
        """Run every prompt (text or token ids) through continuous batching."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        requests: dict[str, tuple[Request, IncrementalDetokenizer]] = {}
        order: list[str] = []
        texts: dict[str, list[str]] = {}
        for prompt, sp in zip(prompts, params_list, strict=True):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request = Request(f"gen-{next(self._ids)}", token_ids, sp)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, sp.stop)
            requests[request.request_id] = (request, detok)
            order.append(request.request_id)
            texts[request.request_id] = []
            self.core.add_request(request)
        while self.core.has_work():
            for delta in self.core.step():
                request, detok = requests[delta.request_id]
                piece = detok.push(delta.new_token_ids)
                texts[delta.request_id].append(piece.text)
                if piece.stopped and not delta.finished:
                    self.core.abort_request(delta.request_id, RequestStatus.FINISHED_STOPPED)
                    request.status = RequestStatus.FINISHED_STOPPED
        return [self._completion(*requests[rid], texts[rid]) for rid in order]

    @staticmethod
    def _completion(
        request: Request, detok: IncrementalDetokenizer, pieces: list[str]
    ) -> Completion:
        pieces.append(detok.flush())
        return Completion(
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text="".join(pieces),
            finish_reason=request.status.finish_reason(),
        )
