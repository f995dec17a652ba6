"""onnxruntime CPU latency of exported causal LMs: prefill and per-token decode with the KV cache.

Several models are timed interleaved (round robin, one prefill + decode pass each per round, the
order reversed every other round) so that background load on a shared machine hits all of them alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def session_options(threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def run_pass(lm, prompt: np.ndarray, follow: np.ndarray) -> tuple[float, list[float]]:
    """One prefill of ``prompt`` (1, T) then one decode step per token of ``follow`` (teacher forced, so
    every model runs exactly the same shapes). Returns (prefill seconds, [decode seconds])."""
    mask = np.ones((1, prompt.shape[1]), np.int64)
    t0 = time.perf_counter()
    _, past = lm.step(prompt, mask)
    prefill = time.perf_counter() - t0
    steps = []
    for i, token in enumerate(follow):
        mask = np.ones((1, prompt.shape[1] + i + 1), np.int64)
        t0 = time.perf_counter()
        _, past = lm.step(np.array([[token]]), mask, past)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def interleaved_latency(models: dict[str, str | Path], tokens: np.ndarray, prompt_tokens: int, decode_tokens: int,
                        rounds: int, threads: int) -> dict[str, dict]:
    """Median prefill ms and median decode ms/token of each ONNX model (name -> path), timed in
    ``rounds`` interleaved rounds on the token ids ``tokens`` (at least prompt + decode of them)."""
    from hyperquant.exporters import OnnxCausalLM

    tokens = np.asarray(tokens).reshape(-1)
    if len(tokens) < prompt_tokens + decode_tokens:
        raise ValueError(f"need {prompt_tokens + decode_tokens} tokens, got {len(tokens)}")
    prompt, follow = tokens[None, :prompt_tokens], tokens[prompt_tokens:prompt_tokens + decode_tokens]
    sessions = {name: OnnxCausalLM(path, options=session_options(threads)) for name, path in models.items()}
    for lm in sessions.values():  # warm-up: allocations, weight prepacking
        run_pass(lm, prompt, follow[:4])
    prefill = {name: [] for name in sessions}
    decode = {name: [] for name in sessions}
    for r in range(rounds):
        for name in list(sessions) if r % 2 == 0 else list(reversed(sessions)):
            p, steps = run_pass(sessions[name], prompt, follow)
            prefill[name].append(p * 1e3)
            decode[name].append(statistics.median(steps) * 1e3)
    return {name: {"prefill_ms": statistics.median(prefill[name]), "decode_ms": statistics.median(decode[name]),
                   "prefill_rounds_ms": prefill[name], "decode_rounds_ms": decode[name],
                   "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, "rounds": rounds,
                   "threads": threads}
            for name in sessions}
