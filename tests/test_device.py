"""Device and dtype discipline without a GPU.

A tensor on the ``meta`` device mixed with a CPU tensor raises, so running a path with its inputs and
modules on meta proves that nothing in it allocates on a fixed device (CUDA would fail the same way).
Data-dependent steps (GPTQ's Cholesky, ``.item()``) cannot run on meta; they are checked for device
arguments by reading and run on CPU in the other tests.
"""

import types

import pytest
import torch

from hyperquant import CompressConfig, compress
from hyperquant.device import peak_memory, resolve_device
from hyperquant.errors import HyperquantError
from hyperquant.phm.layer import PHMLinear
from hyperquant.quant.rtn import rtn_quantize
from hyperquant.train import TrainConfig
from hyperquant.train.fakequant import FakeQuantizer, fake_quantize
from hyperquant.train.interp import drop_dense, fixed_alpha, has_dense, interpolated_layers
from hyperquant.train.lora import adapters_disabled
from hyperquant.train.runner import _frozen_teacher, _micro_step, prepare_model
from tests.conftest import tiny_llama

META = torch.device("meta")
# meta everywhere; on a machine with a GPU (scripts/device_check.sh) the same tests run on CUDA too
DEVICES = [META] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
on_devices = pytest.mark.parametrize("device", DEVICES, ids=str)


def _on(tensors, device) -> bool:
    return all(t.device.type == device.type for t in tensors)


# ------------------------------------------------------------------------------------------ --device
def test_device_resolution_and_its_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(HyperquantError, match="no CUDA device is visible.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(HyperquantError, match="choose auto, cpu, cuda"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(HyperquantError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    with pytest.raises(ValueError, match="device='tpu'"):
        TrainConfig(device="tpu")
    assert peak_memory()["peak_host_bytes"] > 10_000_000  # this process holds torch: tens of MB at least


# ------------------------------------------------------------------------------------- quantization
@on_devices
def test_rtn_and_fake_quant_stay_on_the_weights_device(device):
    w = torch.randn(8, 40, device=device)
    q = rtn_quantize(w, 4, 16)
    assert _on([q.codes, q.scales, q.zeros, q.dequantize()], device)
    w = torch.randn(8, 40, device=device, requires_grad=True)
    fake_quantize(w, 4, 16, symmetric=True).sum().backward()
    assert _on([w.grad], device)


@on_devices
@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_scale_quantizer_forward_backward_and_export_on_meta(symmetric, device):
    quantizer = FakeQuantizer(8, 40, bits=4, group_size=16, symmetric=symmetric, learn_scales=True)
    quantizer.enable(torch.randn(8, 40))
    quantizer.to(device)
    w = torch.randn(8, 40, device=device, requires_grad=True)
    quantizer(w).square().sum().backward()
    assert _on([w.grad, quantizer.scales.grad], device)
    q = quantizer.quantized(w)
    assert _on([q.codes, q.scales, q.zeros], device)


@on_devices
def test_phm_layer_forward_backward_on_meta(device):
    layer = PHMLinear.from_dense(torch.randn(24, 16), n=2, num_bases=2, bias=torch.randn(24)).to(device)
    x = torch.randn(3, 16, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert _on([x.grad, layer.factors.grad], device)


@on_devices
def test_compressed_model_forward_on_meta_and_in_bf16(device):
    """Every compressed kind (PHM with 4-bit factors, dense 4-bit attention and head, the 4-bit embedding
    table) runs where its tensors are, and in bfloat16 close to its float32 result."""
    model = tiny_llama(hidden=64, intermediate=128)
    compress(model, CompressConfig(bits=4, method="rtn", init="frobenius", group_size=16), progress=False)
    ids = torch.randint(0, 128, (2, 12))
    reference = model(input_ids=ids).logits
    bf16 = model.to(torch.bfloat16)(input_ids=ids).logits
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    error = (bf16.float() - reference).norm() / reference.norm()
    assert error < 0.03, error  # bf16 keeps 8 bits of mantissa: ~0.4 % per op
    logits = model.to(device)(input_ids=ids.to(device)).logits
    assert _on([logits], device) and logits.dtype == torch.bfloat16


def test_phm_layer_in_bf16_matches_the_fp32_materialized_product():
    weight = torch.randn(48, 32, dtype=torch.float64)
    layer = PHMLinear.from_dense(weight.float(), n=2, num_bases=2)
    x = torch.randn(5, 32)
    reference = x.double() @ layer.effective_weight().double().T  # the materialized Kronecker sum
    y = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference, rtol=0.02, atol=0.02 * reference.abs().max().item())


# ------------------------------------------------------------------------------------------- training
def _cfg(**kw) -> TrainConfig:
    base = {"seq_len": 16, "train_samples": 4, "per_device_batch_size": 2, "max_steps": 4, "fade_steps": 2,
            "compress": {"group_size": 16, "init": "frobenius"}, "progress": False, "export": False,
            "qat_start_step": 0, "qat_learn_scales": True, "lora_r": 2, "recon_weight": 0.5}
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def no_packed_check(monkeypatch):
    """transformers looks for packed sequences in a training forward with a data-dependent ``.all()``
    (its own check, not hyperquant's); meta tensors have no data, so it is answered 'none'."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)


def _meta_run(cfg: TrainConfig, model, teacher=None):
    from accelerate import Accelerator

    return types.SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), model=model, wrapped=model,
                                 teacher=teacher)


def _prepared(cfg: TrainConfig):
    model = tiny_llama(hidden=64, intermediate=128)
    prepare_model(model, cfg, {}, None)
    for m in interpolated_layers(model).values():
        m.quantizer.enable(m.phm.a_cat.detach())
        m.alpha = 0.5
    return model


@on_devices
@pytest.mark.parametrize("stage", ["A", "B"])
def test_training_step_on_meta_with_the_dense_teacher(stage, device, no_packed_check):
    """A micro-step (student, teacher from the frozen dense weights, KD, recon, QAT with learned scales,
    LoRA) where every tensor is on meta."""
    cfg = _cfg()
    model = _prepared(cfg)
    if stage == "B":
        drop_dense(model, keep_teacher=True)
        assert not has_dense(model)
    model.to(device).train()
    ids = torch.randint(0, 128, (2, 16), device=device)
    sums = _micro_step(_meta_run(cfg, model), {"input_ids": ids}, lambda_kd=1.0)
    assert _on([sums], device) and sums.shape == (4,)
    # a padded batch's losses (image-caption pairs beside text rows; transformers' own mask building
    # reads the attention mask, so the model forward of a padded batch cannot run on meta)
    from hyperquant.train.losses import causal_lm_loss, kd_loss

    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    logits = torch.randn(2, 16, 128, device=device, requires_grad=True)
    losses = [causal_lm_loss(logits, ids.masked_fill(mask == 0, -100)), kd_loss(logits, logits.detach() * 2, 2.0, mask)]
    assert _on(losses, device)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and _on(grads, device)


@on_devices
def test_separate_teacher_is_put_on_the_training_device(tiny_model_dir, device, no_packed_check):
    cfg = _cfg(teacher="separate", kd_weight=1.0)
    from hyperquant.models import load_model, resolve_source

    source = resolve_source(str(tiny_model_dir))
    teacher = _frozen_teacher(cfg, source, device)
    assert _on(teacher.parameters(), device)
    assert not any(p.requires_grad for p in teacher.parameters())
    model = load_model(source)[0]
    prepare_model(model, cfg, {}, None)
    model.to(device).train()
    batch = {"input_ids": torch.randint(0, 100, (2, 16), device=device)}
    assert _on([_micro_step(_meta_run(cfg, model, teacher), batch, lambda_kd=1.0)], device)


def test_dense_teacher_is_the_original_model_in_stage_b():
    """teacher: dense keeps the frozen dense FFN weights after Stage B: at alpha 0 with LoRA off the model
    is exactly the uncompressed one (what a separate copy would compute), while the student is PHM."""
    cfg = _cfg()
    original = tiny_llama(hidden=64, intermediate=128)
    model = tiny_llama(hidden=64, intermediate=128)
    model.load_state_dict(original.state_dict())
    prepare_model(model, cfg, {}, None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "factors" in name:
                p.add_(0.1 * torch.randn_like(p))  # trained adapters and factors
    drop_dense(model, keep_teacher=True)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        student = model(input_ids=ids).logits
        with fixed_alpha(model, 0.0), adapters_disabled(model):
            teacher = model(input_ids=ids).logits
        expected = original(input_ids=ids).logits
    torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-6)
    assert (student - expected).abs().max() > 1e-2  # the student is not the teacher
    drop_dense(model)  # the export drops them for good
    assert all(m.dense is None for m in interpolated_layers(model).values())


def test_auto_mixed_precision_is_bf16_only_where_the_device_multiplies_it_natively(monkeypatch):
    from hyperquant.device import fast_bf16, resolve_mixed_precision

    cpu = torch.device("cpu")
    for setting in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(setting, cpu) == setting
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": False}, raising=False)
    assert fast_bf16(cpu) and resolve_mixed_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True}, raising=False)
    assert not fast_bf16(cpu) and resolve_mixed_precision("auto", cpu) == "no"
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # an older torch: never guessed
    assert resolve_mixed_precision("auto", cpu) == "no"
    assert not fast_bf16(torch.device("meta"))
