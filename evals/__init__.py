"""Evaluation of compressed models: perplexity, size, compute and latency (imported as hyperquant.evals)."""

from hyperquant.evals.captions import caption_agreement, caption_perplexity, greedy_captions
from hyperquant.evals.latency import torch_latency
from hyperquant.evals.perplexity import PerplexityProtocol, perplexity
from hyperquant.evals.size import folder_bytes, model_size

__all__ = ["PerplexityProtocol", "caption_agreement", "caption_perplexity", "folder_bytes", "greedy_captions", "model_size", "perplexity", "torch_latency"]
