"""CPU latency of a torch model: prefill of a prompt and per-token decode with the KV cache."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def torch_latency(model: nn.Module, vocab_size: int, prompt_tokens: int = 128, decode_tokens: int = 16,
                  repeats: int = 3, seed: int = 0) -> dict:
    """Median milliseconds for a prefill of ``prompt_tokens`` and for one decode step (batch 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen)
    model(input_ids=ids[:, :8])  # warm-up (dequantization caches, allocator)
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill.append(time.perf_counter() - start)
        past = out.past_key_values
        next_id = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=next_id, past_key_values=past, use_cache=True)
            past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode.append((time.perf_counter() - start) / decode_tokens)
    return {
        "prefill_ms": 1000 * statistics.median(prefill),
        "decode_ms_per_token": 1000 * statistics.median(decode),
        "prompt_tokens": prompt_tokens,
        "threads": torch.get_num_threads(),
    }
