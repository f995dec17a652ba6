"""The instruction-model check: what a compressed chat model says, against what the original says.

The original answers a fixed set of chat prompts (its own chat template, greedy, up to ``max_new_tokens``).
A compressed model is then teacher-forced on those replies and scored at every reply position on
- the KL divergence KL(original || compressed) of the next-token distributions, in nats per token;
- greedy agreement: the share of positions where its most likely token is the original's reply token.

The prompts are test-side text: no selection code may read them (`textsets.choosing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hyperquant.evals.perplexity import model_device
from torch import nn

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a good night's sleep.",
    "How do I reverse a list in Python?",
    "Translate 'good morning, my friend' into Spanish.",
    "What is 17 times 23?",
    "Summarize the plot of Cinderella in one paragraph.",
    "Suggest a name for a small bakery by the sea.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a polite email declining a meeting invitation.",
    "Why do we have seasons on Earth?",
    "List the planets of the solar system in order.",
    "What should I pack for a weekend hiking trip?",
    "Tell me a short joke about computers.",
    "How does a refrigerator keep food cold?",
)
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"  # for a tokenizer without a chat template (said in the report)


def prompt_ids(tokenizer, prompt: str) -> tuple[list[int], bool]:
    """(token ids of ``prompt`` as the model's chat template renders one user turn, whether the template
    was the model's own)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], True
    return tokenizer(PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"], False


@dataclass
class ChatReference:
    """The original model's greedy replies and its next-token log-probabilities along them."""

    sequences: list[torch.Tensor]  # prompt + reply ids, 1-D
    reply_starts: list[int]  # index of each reply's first token
    logprobs: list[torch.Tensor]  # (reply length, vocab) float32, the original's at each reply position
    own_template: bool
    max_new_tokens: int

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: nn.Module, tokenizer, prompts=CHAT_PROMPTS, max_new_tokens: int = 32) -> ChatReference:
        from hyperquant.textsets import _refuse_inside_selection

        _refuse_inside_selection("chat prompts")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds the tokenizer
        device = model_device(model)
        sequences, starts, own = [], [], True
        for prompt in prompts:
            ids, own_template = prompt_ids(tokenizer, prompt)
            own = own and own_template
            prompt_tensor = torch.tensor([ids], device=device)
            out = model.generate(prompt_tensor, attention_mask=torch.ones_like(prompt_tensor),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
            sequences.append(out[0].cpu())
            starts.append(len(ids))
        reference = cls(sequences, starts, [], own, max_new_tokens)
        reference.logprobs = [lp.cpu() for lp in reference._reply_logprobs(model)]
        return reference

    def _reply_logprobs(self, model: nn.Module) -> list[torch.Tensor]:
        device = model_device(model)
        result = []
        for seq, start in zip(self.sequences, self.reply_starts):
            logits = model(input_ids=seq[None].to(device), use_cache=False).logits[0].float()
            result.append(torch.log_softmax(logits[start - 1 : len(seq) - 1], dim=-1))
        return result

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict:
        """{'kl': mean KL(original || model) per reply token, 'agreement': share of reply tokens that are
        the model's argmax, 'tokens'}; NaN or Inf in the model's log-probabilities fails."""
        kl_sum, agree, tokens = 0.0, 0, 0
        for seq, start, ref, logp in zip(self.sequences, self.reply_starts, self.logprobs, self._reply_logprobs(model)):
            logp = logp.cpu()
            if not torch.isfinite(logp).all():
                raise FloatingPointError("the model gives NaN or Inf log-probabilities on the chat replies")
            kl_sum += float((ref.exp() * (ref - logp)).sum())
            agree += int((logp.argmax(-1) == seq[start:]).sum())
            tokens += len(ref)
        return {"kl": kl_sum / max(tokens, 1), "agreement": agree / max(tokens, 1), "tokens": tokens}

    def describe(self) -> dict:
        return {"prompts": len(self.sequences), "reply_tokens": sum(len(r) for r in self.logprobs),
                "max_new_tokens": self.max_new_tokens,
                "template": "the model's chat template" if self.own_template else PLAIN_TEMPLATE}
