"""hyperquant: PHM (sum-of-Kronecker) FFNs with low-bit factors, GPTQ/RTN, checkpoints and ONNX export.

Public API: ``PHMLinear``, ``FourierLinear``, ``CompressConfig``, ``resolve_plan(model, config)`` (the
per-layer plan), ``compress(model, config, calib_inputs)``, ``load(folder)``,
``save_compressed(model, folder, tokenizer)``; layer kinds in ``hyperquant.kinds``.
"""

from hyperquant.checkpoint import load, save_compressed
from hyperquant.config import CompressConfig
from hyperquant.errors import HyperquantError
from hyperquant.fourier.module import FourierLinear
from hyperquant.phm.layer import PHMLinear
from hyperquant.pipeline import compress
from hyperquant.plan import resolve_plan
from hyperquant.quant.modules import QuantLinear, QuantPHMLinear

__version__ = "0.1.0"

__all__ = [
    "CompressConfig",
    "FourierLinear",
    "HyperquantError",
    "PHMLinear",
    "QuantLinear",
    "QuantPHMLinear",
    "compress",
    "load",
    "resolve_plan",
    "save_compressed",
]
