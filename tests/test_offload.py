"""Block offloading (hyperquant.offload): the model stays on the host, one block at a time visits the device.

Without a GPU, the device is ``meta``, and where each block's weights are when it is called is recorded
(a meta tensor mixed with a CPU one raises in most ops, not all: meta matmuls accept CPU weights, so the
placement is checked, not only that the forward runs). The calibration itself (GPTQ's Cholesky) cannot
run on meta; the pipeline is run through a CPU-to-CPU offload, which takes every step of the offload path,
and must give the same model.
"""

import copy

import pytest
import torch

from hyperquant import CompressConfig, compress, pipeline
from hyperquant.offload import BlockOffload, offload_units, offloaded
from tests.conftest import tiny_llama

META = torch.device("meta")


def _host_tensors(model):
    return {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}


def test_units_are_the_decoder_blocks():
    model = tiny_llama(layers=3)
    assert offload_units(model) == list(model.model.layers)


def test_a_forward_through_the_offload_runs_each_block_on_the_device_alone():
    model = tiny_llama(layers=3, tie=False).eval()
    before = {name: (t.data_ptr(), t.clone()) for name, t in _host_tensors(model).items()}
    ids = torch.randint(0, 128, (2, 16))
    on_device_at_call = []
    for index, block in enumerate(model.model.layers):
        # on the block's first layer: it runs after the block's own pre-hooks (the offload's)
        block.input_layernorm.register_forward_pre_hook(lambda _m, _a, index=index: on_device_at_call.append(
            (index, sorted(i for i, b in enumerate(model.model.layers)
                           if next(b.parameters()).device.type == "meta"))))
    with torch.no_grad():
        model(input_ids=ids)  # without the offload, no block is on the device when it runs
        assert on_device_at_call == [(0, []), (1, []), (2, [])]
        on_device_at_call.clear()
        with BlockOffload(model, META) as offload:
            assert model.model.embed_tokens.weight.device == META and model.lm_head.weight.device == META
            assert all(p.device.type == "cpu" for b in model.model.layers for p in b.parameters())
            logits = model(input_ids=ids.to(META)).logits
        assert logits.device == META and logits.shape == (2, 16, 128)
    # each block is on the device when it runs, and alone
    assert on_device_at_call == [(0, [0]), (1, [1]), (2, [2])]
    assert offload.peak_blocks == 1
    after = _host_tensors(model)
    assert set(after) == set(before)
    for name, (ptr, value) in before.items():  # the very host tensors are back, unchanged
        assert after[name].device.type == "cpu" and after[name].data_ptr() == ptr, name
        assert torch.equal(after[name], value), name


def test_resident_keeps_a_block_on_the_device_and_a_deep_copy_is_left_alone():
    model = tiny_llama(layers=2).eval()
    block = model.model.layers[1]
    with torch.no_grad(), BlockOffload(model, META) as offload:
        with offload.resident(block):
            assert all(p.device == META for p in block.parameters())
            twin = copy.deepcopy(block)  # carries the hooks; it is not a unit, so nothing moves it
            assert all(p.device == META for p in twin.parameters())
            model(input_ids=torch.randint(0, 128, (1, 8), device=META))
            assert all(p.device == META for p in block.parameters())  # not sent back by its own call
            assert offload.peak_blocks == 2  # block 0 visited while block 1 stayed
        assert all(p.device.type == "cpu" for p in block.parameters())


def test_offloaded_is_nothing_where_the_model_already_is():
    model = tiny_llama()
    with offloaded(model, None) as a, offloaded(model, "cpu") as b:
        assert a is None and b is None


def _cpu_to_cpu(monkeypatch):
    """compress(device=...) with a CPU-to-CPU BlockOffload: every step of the offload path, on real numbers."""
    made = []

    class Recorded(BlockOffload):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def always(model, device):
        return Recorded(model, device, "cpu") if device is not None else offloaded(model, None)

    monkeypatch.setattr(pipeline, "offloaded", always)
    return made


@pytest.mark.parametrize("config", [
    {"n": 2, "num_bases": 2, "bits": 4, "group_size": 16, "calib_samples": 4, "calib_seq_len": 32, "scope": "model"},
    {"n": 1, "bits": 4, "group_size": 16, "calib_samples": 4, "calib_seq_len": 32, "scope": "model",
     "true_sequential": False},
], ids=["phm-gptq-whole-model", "dense-gptq"])
def test_compress_through_the_offload_gives_the_same_model(monkeypatch, config):
    torch.manual_seed(0)
    base = tiny_llama(layers=3, tie=False)
    calib = torch.randint(0, 128, (4, 32))
    held = torch.randint(0, 128, (2, 32))
    reference = compress(copy.deepcopy(base), CompressConfig(**config), calib, progress=False, heldout_inputs=held)
    made = _cpu_to_cpu(monkeypatch)
    offloaded_model = compress(copy.deepcopy(base), CompressConfig(**config), calib, progress=False,
                               heldout_inputs=held, device="cpu")
    assert len(made) == 1 and made[0].peak_blocks == 1
    assert offloaded_model.hyperquant_offload == {"device": "cpu", "peak_blocks": 1}
    ref_state, state = reference.state_dict(), offloaded_model.state_dict()
    assert ref_state.keys() == state.keys()
    for name in ref_state:
        assert torch.equal(ref_state[name], state[name]), name
    for a, b in zip(reference.hyperquant_log, offloaded_model.hyperquant_log, strict=True):
        assert a["name"] == b["name"] and a.get("output_error_heldout") == b.get("output_error_heldout")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, offloaded_model(input_ids=ids).logits)


def test_inputs_go_where_an_offloaded_compressed_model_takes_them():
    """A compressed model's quantized embedding has buffers only, so its first parameter is a block's
    (on the host while offloaded): the evaluation must put the ids where the embedding is."""
    from hyperquant.evals.perplexity import model_device

    model = compress(tiny_llama(layers=2), CompressConfig(n=1, bits=4, group_size=16, method="rtn", scope="model"),
                     progress=False)
    assert not list(model.get_input_embeddings().parameters())  # the table is quantized: buffers only
    with BlockOffload(model, META):
        assert next(model.parameters()).device.type == "cpu" and model_device(model) == META
    assert model_device(model).type == "cpu"
