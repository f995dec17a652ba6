import dataclasses
import json

import pytest
import torch
from hyperquant.evals import model_size
from hyperquant.evals.size import dtype_bytes

from hyperquant import CompressConfig, HyperquantError, compress, load, save_compressed
from hyperquant.atomic import atomic_output_dir
from hyperquant.fourier import FourierPlan
from tests.conftest import tiny_llama

CONFIGS = {
    "dense-gptq4": CompressConfig(bits=4, n=1, group_size=16),
    "phm-gptq3": CompressConfig(bits=3, n=2, num_bases=2, group_size=16),
    "phm-n4-rtn2-sym": CompressConfig(bits=2, n=4, num_bases=2, method="rtn", symmetric=True, group_size=16),
    "phm-learned-8": CompressConfig(bits=8, n=2, num_bases=3, learn_bases=True, group_size=32),
    "phm-float": CompressConfig(bits=None, n=2, num_bases=2, init="frobenius", rest_dtype="float32"),
    "phm-bf16-rest": CompressConfig(bits=4, n=2, num_bases=2, group_size=16, rest_dtype="bfloat16"),
    "phm-float-fp16-rest": CompressConfig(bits=None, n=2, num_bases=2, init="frobenius"),
    "fourier-4": CompressConfig.every_layer(FourierPlan(bits=4)),
    "fourier-3-4-bf16-rest": CompressConfig.every_layer(FourierPlan(bits=3, phase_bits=4, group_size=16, fraction=0.5),
                                                        rest_dtype="bfloat16"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_logits_are_identical(name, tmp_path):
    cfg = CONFIGS[name]
    ids = torch.randint(0, 128, (4, 24))
    model = compress(tiny_llama(), cfg, ids, progress=False)
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    layers = config["hyperquant"]["layers"]
    ffn = [name for name in layers if ".mlp." in name]
    assert len(ffn) == 6 and "quantization_config" not in config
    if cfg.bits is None or "fourier" in name:  # float settings keep all but the FFN: still tied
        assert len(layers) == 6
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    else:  # the whole model: attention and head dense-quant, the table the head's codes when alike
        assert len(layers) == 6 + 8 + 2 and layers["lm_head"]["kind"] == "dense-quant"
        shares = layers["model.embed_tokens"].get("shares")
        assert shares == ("lm_head" if cfg.bits == cfg.embed_bits else None)
        assert (loaded.model.embed_tokens.qweight is loaded.lm_head.qweight) == (shares is not None)
    plan = config["hyperquant"]["plan"]
    assert sorted(plan) == sorted(layers)
    for layer, spec in layers.items():
        assert spec["kind"] == plan[layer]["kind"]
        assert spec["bits"] == plan[layer].get("bits")
    for layer in ffn:
        assert plan[layer]["kind"] == cfg.entry_for(layer).kind
        assert plan[layer].get("bits") == getattr(cfg.entry_for(layer), "bits", None)
    log = json.loads((tmp_path / "ckpt" / "quant_log.json").read_text())
    assert sorted(r["name"] for r in log) == sorted(layers)


@pytest.mark.parametrize("name", ["phm-gptq3", "dense-gptq4", "phm-float-fp16-rest", "phm-bf16-rest"])
def test_stored_bytes_are_the_counted_bytes(name, tmp_path):
    cfg = CONFIGS[name]
    model = compress(tiny_llama(), cfg, torch.randint(0, 128, (4, 24)), progress=False)
    save_compressed(model, tmp_path / "ckpt")
    size = model_size(model, rest_bytes_per_param=dtype_bytes(cfg.rest_dtype))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert stored == size["bytes"]
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_size - stored < 20_000  # header only


def test_existing_output_is_never_overwritten_silently(tmp_path):
    model = compress(tiny_llama(), CONFIGS["phm-float"], progress=False)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(HyperquantError, match="--overwrite"):
        save_compressed(model, target)
    assert (target / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a folder hyperquant wrote: the user's folder survives that too
    with pytest.raises(HyperquantError, match="not written by hyperquant"):
        save_compressed(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1
    published = save_compressed(model, tmp_path / "ours")
    assert (published / ".hyperquant-output").is_file()
    save_compressed(model, published, overwrite=True)  # our own output is replaced
    assert (published / "config.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ours"]


def test_failure_while_writing_leaves_nothing(tmp_path):
    model = compress(tiny_llama(), CONFIGS["phm-float"], progress=False)

    def interrupt(_folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, tmp_path / "ckpt", extra_files=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_publishes_only_on_success(tmp_path):
    with atomic_output_dir(tmp_path / "x", overwrite=False) as tmp:
        (tmp / "a").write_text("1")
        assert not (tmp_path / "x").exists()
    assert (tmp_path / "x" / "a").read_text() == "1"


def test_load_rejects_foreign_and_future_folders(tmp_path):
    with pytest.raises(HyperquantError, match="no config.json"):
        load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(HyperquantError, match="not a hyperquant checkpoint"):
        load(tmp_path / "plain")
    model = compress(tiny_llama(), CONFIGS["phm-float"], progress=False)
    save_compressed(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["hyperquant"]["format_version"] = 99
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HyperquantError, match="format 99"):
        load(tmp_path / "ckpt")


def _as_format_1(folder):
    """Rewrite a checkpoint's config.json as format 1 wrote it: family kinds, no plan."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    section = config["hyperquant"]
    families = {"dense-quant": "dense", "phm-float": "phm", "phm-quant": "phm", "fourier": "fourier"}
    section["layers"] = {name: {**spec, "kind": families[spec["kind"]]} for name, spec in section["layers"].items()}
    section.pop("plan")
    section["format_version"] = 1
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["dense-gptq4", "phm-gptq3", "phm-float", "fourier-4"])
def test_format_1_checkpoints_still_load(name, tmp_path):
    ids = torch.randint(0, 128, (2, 16))
    cfg = dataclasses.replace(CONFIGS[name], scope="ffn")  # format 1 compressed the FFN only
    model = compress(tiny_llama(), cfg, ids, progress=False)
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, tmp_path / "ckpt")
    _as_format_1(tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert loaded.config.hyperquant["upgraded_from"] == 1
