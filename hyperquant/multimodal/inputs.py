"""Model inputs of image-caption pairs, built by the model's own processor (so the image tokens, pixel
values and grids are exactly what the model expects), and their batching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperquant.errors import HyperquantError, first_line
from hyperquant.multimodal.images import ImageCaption

CAPTION_PROMPT = "Describe the image in one sentence."
IGNORE = -100  # label of a position that is not scored
# Per-sequence keys padded on the right; every other tensor is per image and concatenated.
SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0, "labels": IGNORE}


def prompt_text(processor) -> str:
    """The caption prompt with the image in it: the processor's chat template when it has one (real
    checkpoints do), else its image placeholder followed by the instruction."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Gemma 3 marks an image by its begin token (the processor expands it), the others by the image token.
    placeholder = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
    if not placeholder:
        raise HyperquantError(f"{type(processor).__name__} has neither a chat template nor an image token; save "
                              f"the model's processor (with its chat template) beside the checkpoint")
    return f"{placeholder}{CAPTION_PROMPT} Caption:"


@dataclass
class CaptionSample:
    """One image-caption pair as model inputs (batch of one): ``inputs`` hold prompt + caption with
    ``labels`` on the caption tokens only; ``prompt_inputs`` the prompt alone (for generation)."""

    name: str
    inputs: dict[str, torch.Tensor]
    prompt_inputs: dict[str, torch.Tensor]

    @property
    def caption_tokens(self) -> int:
        return int((self.inputs["labels"] != IGNORE).sum())


def _process(processor, image, text: str) -> dict[str, torch.Tensor]:
    try:
        encoded = processor(images=[image], text=[text], return_tensors="pt")
    except Exception as e:  # noqa: BLE001 - processors raise anything on a foreign image or text
        raise HyperquantError(f"the model's processor could not encode an image-caption pair "
                              f"({type(e).__name__}: {first_line(e)}); check the processor files") from None
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def caption_sample(processor, pair: ImageCaption, prompt: str | None = None) -> CaptionSample:
    prompt = prompt_text(processor) if prompt is None else prompt
    prompt_inputs = _process(processor, pair.image, prompt)
    inputs = _process(processor, pair.image, f"{prompt} {pair.caption}")
    ids, prompt_ids = inputs["input_ids"][0], prompt_inputs["input_ids"][0]
    # The caption starts where the two encodings part (a tokenizer may close both with the same
    # special token, so the prompt is not always a prefix); special tokens are never scored.
    common = next((i for i, (a, b) in enumerate(zip(ids.tolist(), prompt_ids.tolist())) if a != b),
                  min(len(ids), len(prompt_ids)))
    labels = ids.clone()
    labels[:common] = IGNORE
    special = getattr(getattr(processor, "tokenizer", processor), "all_special_ids", [])
    labels[torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))] = IGNORE
    if not (labels != IGNORE).any():
        raise HyperquantError(f"{pair.name}: its caption gives no tokens to score; write a caption")
    inputs["labels"] = labels.unsqueeze(0)
    return CaptionSample(pair.name, inputs, prompt_inputs)


def caption_samples(processor, pairs: list[ImageCaption]) -> list[CaptionSample]:
    prompt = prompt_text(processor)
    return [caption_sample(processor, pair, prompt) for pair in pairs]


def collate(samples: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One batch from single-sequence inputs (text rows and image-caption pairs alike): sequences padded
    on the right (attention mask 0, labels ignored), per-image tensors (pixel values, grids)
    concatenated in order. A text row without ``labels`` is scored everywhere."""
    if len(samples) == 1 and "labels" in samples[0]:
        return dict(samples[0])
    length = max(s["input_ids"].shape[1] for s in samples)
    keys = {k for s in samples for k in s}
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in SEQUENCE_KEYS:
            fill = pad_id if key == "input_ids" else SEQUENCE_KEYS[key]
            rows = []
            for s in samples:
                row = s.get(key)
                if row is None:  # a text row: all tokens attended and scored, no image tokens
                    row = s["input_ids"] if key == "labels" else torch.ones_like(s["input_ids"]) if \
                        key == "attention_mask" else torch.zeros_like(s["input_ids"])
                pad = length - row.shape[1]
                rows.append(torch.nn.functional.pad(row, (0, pad), value=fill) if pad else row)
            batch[key] = torch.cat(rows)
        else:
            batch[key] = torch.cat([s[key] for s in samples if key in s])
    if "attention_mask" in batch and "labels" in batch:
        batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    return batch


def with_image_batches(text_ids: torch.Tensor | None, samples: list[CaptionSample] | None, batch_size: int = 8):
    """Calibration inputs: the text rows (batches of ``batch_size``), then one unpadded batch per
    image-caption pair, labels dropped. Without pairs, the text rows as they are (None stays None)."""
    if text_ids is None or not samples:
        return text_ids
    batches = [{"input_ids": text_ids[i : i + batch_size]} for i in range(0, len(text_ids), batch_size)]
    return batches + [{k: v for k, v in s.inputs.items() if k != "labels"} for s in samples]
