"""Single-instance engine vs transformers `generate`, same model, same machine, same run.

(a) one request, 128 new tokens; (b) 16 requests with prompt lengths 16-512 and output lengths
32-256: transformers as one padded static batch (it must run to the longest output, so only the
tokens each request asked for are counted), the engine with continuous batching.
Greedy, EOS ignored, fp32 on CPU by default. Prints one table of output tokens/s.

    python benchmarks/engine_vs_transformers.py [--model PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams
from worker.engine_core import resolve_model_path
from worker.llm import LLM


def workload(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompt_lens = [rng.randint(16, 512) for _ in range(16)]
    output_lens = [rng.randint(32, 256) for _ in range(16)]
    prompts = [[rng.randint(100, 20000) for _ in range(n)] for n in prompt_lens]
    return prompts, output_lens


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Seconds for one left-padded static batch running `new_tokens` steps."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - start


def engine_generate(llm: LLM, prompts: list[list[int]], outputs: list[int]) -> float:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    completions = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(c.token_ids) for c in completions] == outputs
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model_cfg = ModelConfig(path=args.model, device=args.device, dtype="float32")
    path = resolve_model_path(model_cfg)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    hf.generation_config.eos_token_id = None  # every row runs its full length, as ignore_eos
    engine_cfg = EngineConfig.model_validate(
        {
            "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 512},
            "cache": {"memory_mb": 1024},
        }
    )
    llm = LLM(model_cfg, engine_cfg)
    single = [[random.Random(1).randint(100, 20000) for _ in range(16)]]
    prompts, outputs = workload()
    # Warm-up both sides (allocator, threads, lazy init) on a short run.
    hf_generate(hf, single, 4, 0)
    engine_generate(llm, single, [4])

    rows = []
    hf_s = hf_generate(hf, single, 128, 0)
    eng_s = engine_generate(llm, single, [128])
    rows.append(("(a) 1 request x 128 tokens", 128, hf_s, eng_s))
    hf_s = hf_generate(hf, prompts, max(outputs), 0)
    eng_s = engine_generate(llm, prompts, outputs)
    rows.append(("(b) 16 requests, prompts 16-512, outputs 32-256", sum(outputs), hf_s, eng_s))

    print(f"\nmodel {path.name}, {args.device}, fp32, torch threads {torch.get_num_threads()}")
    print("| workload | output tokens | transformers tok/s | pdserve tok/s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, tokens, hf_s, eng_s in rows:
        print(
            f"| {name} | {tokens} | {tokens / hf_s:.1f} | {tokens / eng_s:.1f} "
            f"| {hf_s / eng_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
