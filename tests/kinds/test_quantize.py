import math

import pytest
import torch

from hyperquant.kinds.quantize import QuantFields, quantize_matrix


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_an_all_zero_matrix_quantizes_to_zero_with_zero_error(method):
    """A layer whose weights are all zero (pruned, or a factor trained to zero) is exact on any grid; its
    logged relative error is 0, not a division by zero."""
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hessian = x.T @ x / len(x)
    record: dict = {}
    qw = quantize_matrix(torch.zeros(8, 32), hessian, QuantFields(method=method, group_size=16), record)
    assert torch.equal(qw.dequantize(), torch.zeros(8, 32))
    assert record["quant_error"] == 0.0 and math.isfinite(record["quant_error"])
    if method == "gptq":
        assert record["quant_error_rtn"] == 0.0
