"""Evaluation of compressed models: perplexity, size, compute and latency (imported as hyperquant.evals)."""

from hyperquant.evals.latency import torch_latency
from hyperquant.evals.perplexity import PerplexityProtocol, perplexity
from hyperquant.evals.size import folder_bytes, model_size

__all__ = ["PerplexityProtocol", "folder_bytes", "model_size", "perplexity", "torch_latency"]
