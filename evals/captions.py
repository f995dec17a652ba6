"""Image-conditioned caption evaluation of a vision-language model.

Caption perplexity: each image-caption pair is scored teacher-forced, prompt and image as context,
the caption tokens scored (`perplexity.scored_nll`, the rule text perplexity uses), pooled over all
pairs: exp(total NLL / caption tokens). Greedy agreement: the greedy caption of each evaluation image,
compared token by token with the uncompressed model's.
"""

from __future__ import annotations

import torch
from hyperquant.evals.perplexity import model_device, perplexity_from_nll, scored_nll
from torch import nn

MAX_CAPTION_TOKENS = 24


def _on(inputs: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def caption_perplexity(model: nn.Module, samples: list) -> dict:
    """{'perplexity', 'nll', 'predicted_tokens', 'pairs'} over `multimodal.inputs.CaptionSample`s."""
    device = model_device(model)
    nll_sum, count = 0.0, 0
    for sample in samples:
        inputs = {k: v for k, v in sample.inputs.items() if k != "labels"}
        nll, n = scored_nll(model, _on(inputs, device), sample.inputs["labels"])
        nll_sum, count = nll_sum + nll, count + n
    return {**perplexity_from_nll(nll_sum, count, "the evaluation captions"), "pairs": len(samples)}


@torch.no_grad()
def greedy_captions(model: nn.Module, samples: list, max_new_tokens: int = MAX_CAPTION_TOKENS) -> list[list[int]]:
    """The greedy caption (token ids, up to ``max_new_tokens``) of each distinct image (samples named
    "<image>#<caption index>" share their image's prompt)."""
    import inspect

    device = model_device(model)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    # a BERT-style tokenizer adds token_type_ids, which generate refuses unless the forward names them
    # (Gemma 3 does: they mark its image tokens)
    drop = set() if "token_type_ids" in inspect.signature(model.forward).parameters else {"token_type_ids"}
    captions, seen = [], set()
    for sample in samples:
        image = sample.name.rpartition("#")[0] or sample.name
        if image in seen:
            continue
        seen.add(image)
        prompt = {k: v for k, v in sample.prompt_inputs.items() if k not in drop}
        out = model.generate(**_on(prompt, device), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=0 if pad is None else pad)
        captions.append(out[0, prompt["input_ids"].shape[1]:].tolist())
    return captions


def caption_agreement(reference: list[list[int]], captions: list[list[int]]) -> dict:
    """{'token_agreement': the share of the reference's caption tokens reproduced at the same position,
    'exact_match': the share of captions identical to the reference's}."""
    if len(reference) != len(captions) or not reference:
        raise ValueError("one caption per reference caption is needed")
    same = sum(sum(a == b for a, b in zip(ref, cap)) for ref, cap in zip(reference, captions))
    total = sum(max(len(ref), len(cap)) for ref, cap in zip(reference, captions))
    return {"token_agreement": same / total if total else 1.0,
            "exact_match": sum(ref == cap for ref, cap in zip(reference, captions)) / len(reference)}
