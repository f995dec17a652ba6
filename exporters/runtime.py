"""Running exported causal LMs in onnxruntime: sessions, one forward step, greedy generation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hyperquant.errors import HyperquantError

DEVICES = ("cpu", "cuda")


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device not in DEVICES:
        raise HyperquantError(f"device={device!r} is not supported; use one of {list(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise HyperquantError(
            f"device=cuda needs onnxruntime's CUDAExecutionProvider, but this onnxruntime has only {available}; "
            f"install onnxruntime-gpu in its own environment (pip install hyperquant[gpu]) or use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def make_session(path: str | os.PathLike, device: str = "cpu", options=None):
    """A plain InferenceSession: hyperquant ops are model-local functions, nothing to register."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise HyperquantError(f"{path} does not exist; export a model first with `hyperquant export`")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers_for(device))


def _cache_dims(shape, path_or_session) -> tuple[int, int]:
    """(kv_heads, head_dim) of the cache inputs; onnxruntime-genai's builder leaves head_dim symbolic
    ('kv_cache_dim'), so it is then read from the genai_config.json beside the model."""
    if isinstance(shape[1], int) and isinstance(shape[3], int):
        return shape[1], shape[3]
    config = Path(str(path_or_session)).with_name("genai_config.json")
    if not config.is_file():
        raise HyperquantError(f"the cache inputs of this ONNX model have symbolic sizes {shape} and there is no "
                              f"genai_config.json beside it to read them from")
    import json

    decoder = json.loads(config.read_text())["model"]["decoder"]
    return int(decoder["num_key_value_heads"]), int(decoder["head_size"])


class OnnxCausalLM:
    """An exported causal LM (with or without KV cache) behind a small step API."""

    def __init__(self, path_or_session, device: str = "cpu", options=None) -> None:
        self.session = path_or_session if hasattr(path_or_session, "run") else make_session(
            path_or_session, device, options)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs or "attention_mask" not in inputs:
            raise HyperquantError("this ONNX model has no input_ids/attention_mask inputs; it is not an exported LM")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.with_cache = bool(self.past_names)
        self.num_layers = len(self.past_names) // 2
        if self.with_cache:
            shape = inputs["past_key_values.0.key"].shape  # (batch, kv_heads, past, head_dim)
            self.kv_heads, self.head_dim = _cache_dims(shape, path_or_session)
            self.past_dtype = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, self.past_dtype) for name in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict | None = None):
        """logits (batch, seq, vocab) and the next past (dict of presents renamed as past inputs, or None)."""
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        if self.with_cache:
            feeds.update(past if past is not None else self.empty_past(feeds["input_ids"].shape[0]))
        outputs = self.session.run(None, feeds)
        logits = outputs[0]
        if not self.with_cache:
            return logits, None
        by_name = dict(zip([o.name for o in self.session.get_outputs()], outputs))
        next_past = {p: by_name[p.replace("past_key_values.", "present.")] for p in self.past_names}
        return logits, next_past

    def __call__(self, input_ids, attention_mask=None, use_cache: bool = False):
        """transformers-style call on torch tensors (no cache): ``.logits``, so that the torch evaluators
        (evals.perplexity) run the exported model with the same protocol."""
        from types import SimpleNamespace

        import torch

        ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids, np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        logits, _ = self.step(ids, mask)
        return SimpleNamespace(logits=torch.from_numpy(logits))


def generate_ids(lm: OnnxCausalLM, input_ids, max_new_tokens: int = 32, eos_token_id=None) -> list[int]:
    """Greedy decoding of one prompt (1-D token ids); returns the new token ids (stops after EOS).

    With a KV cache the prompt is prefilled once and each new token is one decode step; without it
    the whole sequence is re-run per token.
    """
    ids = [int(t) for t in np.asarray(input_ids).reshape(-1)]
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
              ([] if eos_token_id is None else [eos_token_id]))
    new: list[int] = []
    past = None
    step_ids = ids
    for _ in range(max_new_tokens):
        total = len(ids) + len(new)
        mask = np.ones((1, total), np.int64)
        if lm.with_cache:
            logits, past = lm.step(np.array([step_ids]), mask, past)
        else:
            logits, _ = lm.step(np.array([ids + new]), mask)
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        step_ids = [token]
        if token in eos:
            break
    return new


def generate(onnx_model, tokenizer, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> str:
    """Greedy continuation of ``prompt`` by an exported LM (path or OnnxCausalLM): the decoded new text.

    Same tokens as transformers' ``model.generate(..., do_sample=False)`` on the torch model.
    """
    lm = onnx_model if isinstance(onnx_model, OnnxCausalLM) else OnnxCausalLM(onnx_model, device)
    prompt_ids = tokenizer(prompt, return_tensors="np")["input_ids"][0]
    new = generate_ids(lm, prompt_ids, max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True)


def genai_generate_ids(folder: str | os.PathLike, prompt_ids, max_new_tokens: int = 32) -> list[int]:
    """Greedy decoding of one prompt (token ids) by onnxruntime-genai's Generator on an exported folder
    (`hyperquant export DIR --out FOLDER`); returns the new token ids."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise HyperquantError("onnxruntime-genai is not installed: pip install 'hyperquant[genai]'") from e
    prompt = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt):]
