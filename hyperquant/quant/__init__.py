from hyperquant.quant.gptq import GPTQResult, HessianNotPositiveDefinite, gptq_quantize
from hyperquant.quant.packing import (
    SUPPORTED_BITS,
    pack_codes,
    pack_zero_points,
    unpack_codes,
    unpack_zero_points,
)
from hyperquant.quant.qtensor import QuantizedWeight
from hyperquant.quant.rtn import group_qparams, rtn_quantize

__all__ = [
    "SUPPORTED_BITS",
    "GPTQResult",
    "HessianNotPositiveDefinite",
    "QuantizedWeight",
    "gptq_quantize",
    "group_qparams",
    "pack_codes",
    "pack_zero_points",
    "rtn_quantize",
    "unpack_codes",
    "unpack_zero_points",
]
