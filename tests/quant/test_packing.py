import pytest
import torch

from hyperquant.quant import pack_codes, pack_zero_points, unpack_codes, unpack_zero_points
from hyperquant.quant.qtensor import QuantizedWeight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [16, 40, 100])  # whole, ragged and odd numbers of blocks
def test_codes_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    packed = pack_codes(codes, bits, 16)
    assert packed.shape == (5, -(-cols // 16), 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, 16, cols), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("blocks", [1, 3, 7, 8])
def test_zero_points_round_trip(bits, blocks):
    zeros = torch.randint(0, 2**bits, (4, blocks), dtype=torch.uint8)
    packed = pack_zero_points(zeros, bits)
    assert packed.shape == (4, -(-blocks * bits // 8))
    assert torch.equal(unpack_zero_points(packed, bits, blocks), zeros)


def test_four_bit_layout_is_low_nibble_first():
    # MatMulNBits: element 2k in the low nibble of byte k, element 2k+1 in the high nibble.
    codes = torch.tensor([[1, 2, 3, 4] + [0] * 12], dtype=torch.uint8)
    packed = pack_codes(codes, 4, 16)
    assert packed[0, 0, :2].tolist() == [0x21, 0x43]
    assert pack_zero_points(torch.tensor([[5, 9, 7]], dtype=torch.uint8), 4).tolist() == [[0x95, 0x07]]


def test_quantized_weight_packed_round_trip_keeps_dequantized_values():
    qw = QuantizedWeight(
        codes=torch.randint(0, 16, (3, 40), dtype=torch.uint8),
        scales=torch.rand(3, 3).half().float(),
        zeros=torch.randint(0, 16, (3, 3), dtype=torch.uint8),
        bits=4, group_size=16, symmetric=False,
    )
    back = QuantizedWeight.from_packed(qw.to_packed(), 4, 16, 40, False)
    assert torch.equal(back.dequantize(), qw.dequantize())
