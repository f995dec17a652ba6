"""hyperquant: PHM (sum-of-Kronecker) FFNs with low-bit factors, GPTQ/RTN, checkpoints and ONNX export.

Public API: ``PHMLinear``, ``FourierLinear``, ``CompressConfig``, ``compress(model, config, calib_inputs)``,
``load(folder)``, ``save_compressed(model, folder, tokenizer)``.
"""

from hyperquant.checkpoint import load, save_compressed
from hyperquant.config import CompressConfig
from hyperquant.errors import HyperquantError
from hyperquant.fourier.module import FourierLinear
from hyperquant.phm.layer import PHMLinear
from hyperquant.pipeline import compress
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
    "save_compressed",
]
