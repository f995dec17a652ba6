"""Vision-language models: towers, image-caption inputs, image calibration, save/load, training with
pixel inputs and caption evaluation, on tiny random LLaVA, Idefics3 and Gemma 3 models."""

import json
import math

import pytest
import torch

from hyperquant.config import CompressConfig
from hyperquant.errors import HyperquantError
from tests.multimodal.conftest import FAMILIES, build_vlm

QUANT = {"bits": 4, "n": 2, "num_bases": 2, "group_size": 16, "calib_samples": 2, "calib_seq_len": 16,
         "heldout_samples": 0}


def _samples(processor, split="calibration", limit=None):
    from hyperquant.multimodal.images import shipped_pairs
    from hyperquant.multimodal.inputs import caption_samples

    pairs = shipped_pairs(split)
    return caption_samples(processor, pairs[:limit] if limit else pairs)


def _calib(samples):
    return [{k: v for k, v in s.inputs.items() if k != "labels"} for s in samples]


@pytest.mark.parametrize("family", FAMILIES)
def test_towers_and_which_linears_each_selects(family):
    from hyperquant.multimodal.towers import find_towers
    from hyperquant.plan import resolve_plan

    model, _ = build_vlm(family)
    towers = find_towers(model)
    assert towers.language and towers.vision and towers.projector
    default = resolve_plan(model, CompressConfig(**QUANT, scope="ffn"))
    assert len(default) == 6 and all(towers.tower_of(n) == "language" and ".mlp." in n for n in default)
    both = resolve_plan(model, CompressConfig(**QUANT, scope="ffn", towers=["language", "vision"]))
    vision = [n for n in both if towers.tower_of(n) == "vision"]
    # the encoder blocks' fc1/fc2 only: Gemma 3's SigLIP pooling head (never run) is not selected
    assert len(vision) == 4 and all(".layers." in n and n.endswith(("fc1", "fc2")) for n in vision)
    if family == "gemma3":  # its projector is a bare weight matrix and a norm, no linear layer
        with pytest.raises(HyperquantError, match="no FFN linears"):
            resolve_plan(model, CompressConfig(**QUANT, scope="ffn", towers=["projector"]))
    else:
        projector = resolve_plan(model, CompressConfig(**QUANT, scope="ffn", towers=["projector"]))
        assert projector and all(towers.tower_of(n) == "projector" for n in projector)
    # scope "model": attention and the head are the language tower's (CLIP/SigLIP q_proj stay dense)
    whole = resolve_plan(model, CompressConfig(**QUANT))
    assert not any(towers.tower_of(n) == "vision" for n in whole)
    assert any(n.endswith("self_attn.q_proj") for n in whole) and "lm_head" in whole


def test_towers_on_a_text_model_are_refused():
    from hyperquant.plan import resolve_plan
    from tests.conftest import tiny_llama

    with pytest.raises(HyperquantError, match="not a vision-language model"):
        resolve_plan(tiny_llama(), CompressConfig(**QUANT, towers=["language", "vision"]))
    with pytest.raises(HyperquantError, match="towers"):
        CompressConfig(towers=["audio"])


@pytest.mark.parametrize("family", FAMILIES)
def test_caption_labels_score_the_caption_tokens_only(family):
    from hyperquant.multimodal.inputs import IGNORE

    _, processor = build_vlm(family)
    sample = _samples(processor, limit=1)[0]
    ids, labels = sample.inputs["input_ids"][0], sample.inputs["labels"][0]
    caption = processor.tokenizer("A smiling astronaut in an orange flight suit poses beside an American flag and a "
                                  "space shuttle model.", add_special_tokens=False)["input_ids"]
    scored = ids[labels != IGNORE].tolist()
    assert scored == caption
    image_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    assert (ids == image_id).sum() > 0 and not (labels == image_id).any()
    assert sample.prompt_inputs["input_ids"].shape[1] < ids.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_statistics_include_the_image_tokens(family):
    """The language FFN's input statistics count every position, image tokens included, and change
    with the image: another photograph under the same caption gives other statistics."""
    from hyperquant.pipeline import input_covariances

    model, processor = build_vlm(family)
    samples = _samples(processor, limit=2)  # astronaut, its two captions
    gate = next(m for n, m in model.named_modules()
                if n.endswith(("language_model.layers.0.mlp.gate_proj", "text_model.layers.0.mlp.gate_proj")))
    seen = []
    handle = gate.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    covs = input_covariances(model, {"gate": gate}, _calib(samples[:1]))
    handle.remove()
    assert seen == [samples[0].inputs["input_ids"].shape[1]]  # prompt, image tokens and caption
    other = dict(_calib(samples[:1])[0])
    other["pixel_values"] = torch.flip(other["pixel_values"], dims=[-1]) * 0.5 + 0.3
    changed = input_covariances(model, {"gate": gate}, [other])
    assert not torch.allclose(covs["gate"], changed["gate"])
    text_only = {"input_ids": samples[0].inputs["input_ids"][:, -5:]}
    assert input_covariances(model, {"gate": gate}, [text_only])["gate"].shape == covs["gate"].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_with_images_then_save_and_load_give_equal_logits(family, tmp_path):
    from hyperquant import compress
    from hyperquant.checkpoint import load, save_compressed

    model, processor = build_vlm(family)
    samples = _samples(processor)
    text = torch.randint(5, 1000, (2, 16))
    batches = [{"input_ids": text}, *_calib(samples[:-2])]
    compress(model, CompressConfig(**QUANT, towers=["language", "vision"]), batches, progress=False,
             heldout_inputs=_calib(samples[-2:]))
    log = {r["name"]: r for r in model.hyperquant_log}
    vision = [r for n, r in log.items() if "vision" in n]
    language = [r for n, r in log.items() if ".mlp." in n and "vision" not in n]
    assert len(vision) == 4 and len(language) == 6
    # the vision MLPs saw the image batches only, the language FFN every position of every batch
    image_tokens = sum(b["input_ids"].numel() for b in batches[1:])
    assert all(r["calib_tokens"] == image_tokens + text.numel() for r in language)
    assert all(0 < r["calib_tokens"] < image_tokens for r in vision)
    assert all(math.isfinite(r["output_error_heldout"]) for r in vision + language)
    order = [r["name"] for r in model.hyperquant_log if ".mlp." in r["name"]]
    assert "vision" in order[0]  # the vision encoder is calibrated first: the language model sees its output
    folder = save_compressed(model, tmp_path / "ckpt", processor)
    loaded = load(folder)
    inputs = _calib(samples[:1])[0]
    with torch.no_grad():
        expected, got = model(**inputs).logits, loaded(**inputs).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    from hyperquant.models import load_processor

    assert type(load_processor(folder)).__name__ == type(processor).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_training_batch_gives_each_rows_own_logits(family):
    """Mixed text rows and image-caption pairs, right-padded: each row's logits at its real positions are
    its logits alone; padding is neither attended nor scored."""
    from hyperquant.multimodal.inputs import IGNORE
    from hyperquant.train.runner import training_batch

    model, processor = build_vlm(family)
    samples = _samples(processor, limit=3)
    text = torch.randint(5, 1000, (2, 12))
    batch = training_batch(text, samples, [0, 2, 4, 1], pad_id=0)  # text, pair 0, pair 2, text
    assert batch["input_ids"].shape[0] == 4 and "pixel_values" in batch
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert torch.equal(batch["labels"][0, :12], text[0])  # a text row is scored everywhere
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, inputs in [(1, samples[0].inputs), (2, samples[2].inputs)]:
            alone = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0]
            torch.testing.assert_close(together[row, : alone.shape[0]], alone, atol=1e-4, rtol=1e-4)
        alone = model(input_ids=text[1:2]).logits[0]
        torch.testing.assert_close(together[3, :12], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_steps_on_pixel_batches(family, vlm_dirs, tmp_path):
    from hyperquant.checkpoint import load
    from hyperquant.train.config import TrainConfig
    from hyperquant.train.runner import train

    cfg = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "max_steps": 3, "seq_len": 16, "train_samples": 4,
        "per_device_batch_size": 4, "grad_accum_steps": 1, "eval_tokens": 64, "eval_context": 32, "init_samples": 2,
        "fade_steps": 2, "stage_b_step": 2, "lora_r": 2, "eval_every": 0, "save_every": 0, "progress": False,
        "qat_start_step": 2, "compress": {**QUANT, "towers": ["language", "vision"]},
        "blockwise_steps": 2, "blockwise_samples": 4})
    pixel_steps = []
    from hyperquant.train import runner

    original = runner.training_batch

    def watched(*args, **kwargs):
        batch = original(*args, **kwargs)
        pixel_steps.append("pixel_values" in batch)
        return batch

    runner.training_batch = watched
    try:
        summary = train(vlm_dirs[family], cfg)
    finally:
        runner.training_batch = original
    assert any(pixel_steps)
    import csv

    with open(tmp_path / "run" / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert len(metrics) == 3 and all(math.isfinite(float(r["loss"])) for r in metrics)
    assert all(float(r["kd"]) > 0 for r in metrics)  # the dense teacher distils on the same pixel batches
    assert float(metrics[0]["recon"]) > 0 and [r["qat"] for r in metrics] == ["False", "False", "True"]
    final = load(summary["final_dir"])
    assert not [n for n, _ in final.named_modules() if "lora" in n]  # merged before the export
    assert sum(1 for n in final.config.hyperquant["plan"] if "vision" in n) == 4
    assert math.isfinite(summary["exported_ppl"])
    # the block-wise stage runs on text rows: the language model's blocks only (the vision encoder's layers
    # train end to end), each block once
    blocks = json.loads((tmp_path / "run" / "blockwise.json").read_text())["blocks"]
    language_blocks = final.config.get_text_config().num_hidden_layers
    assert [b["block"] for b in blocks] == list(range(language_blocks))
    plan = final.config.hyperquant["plan"]
    language_phm = [n for n, e in plan.items() if e["kind"].startswith("phm") and "vision" not in n]
    assert language_phm and sum(b["layers"] for b in blocks) == len(language_phm)


def test_lora_goes_to_the_language_towers_attention_only():
    from hyperquant.train.lora import add_lora
    from hyperquant.train.runner import lora_targets

    model, _ = build_vlm("llava")
    adapted = add_lora(model, lora_targets(model, ["q_proj", "k_proj", "v_proj"]), 2, 4.0)
    assert len(adapted) == 6 and all("language_model" in n for n in adapted)


def test_caption_perplexity_matches_a_float64_reference():
    from hyperquant.evals import caption_perplexity

    from hyperquant.multimodal.inputs import IGNORE

    model, processor = build_vlm("llava")
    samples = _samples(processor, "evaluation", limit=3)
    got = caption_perplexity(model, samples)
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(**{k: v for k, v in s.inputs.items() if k != "labels"}).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            labels = s.inputs["labels"][0]
            for t in range(1, labels.shape[0]):
                if labels[t] != IGNORE:
                    nll -= float(logp[t - 1, labels[t]])
                    count += 1
    assert got["predicted_tokens"] == count == sum(s.caption_tokens for s in samples)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_caption_agreement():
    from hyperquant.evals import caption_agreement

    assert caption_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == {"token_agreement": 1.0, "exact_match": 1.0}
    result = caption_agreement([[1, 2, 3], [4, 5]], [[1, 9, 3, 7], [4]])
    assert result == {"token_agreement": pytest.approx(3 / 6), "exact_match": 0.0}


def test_user_image_caption_pairs(tmp_path):
    from PIL import Image

    from hyperquant.multimodal.images import read_pairs

    folder = tmp_path / "pairs"
    folder.mkdir()
    Image.new("RGB", (20, 10), "red").save(folder / "a.png")
    (folder / "a.txt").write_text("A red square.\nA red rectangle.\n")
    pairs = read_pairs(folder)
    assert [p.caption for p in pairs] == ["A red square.", "A red rectangle."] and pairs[0].image.size == (20, 10)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"image": "pairs/a.png", "caption": "Red."}) + "\n")
    assert [p.caption for p in read_pairs(jsonl)] == ["Red."]
    Image.new("RGB", (4, 4)).save(folder / "b.png")
    with pytest.raises(HyperquantError, match="no caption file b.txt"):
        read_pairs(folder)
    jsonl.write_text('{"image": "missing.png", "caption": "x"}\n')
    with pytest.raises(HyperquantError, match="does not exist"):
        read_pairs(jsonl)
    jsonl.write_text("not json\n")
    with pytest.raises(HyperquantError, match=":1 is not a JSON object"):
        read_pairs(jsonl)


def _qwen2_vl():
    """A tiny random Qwen2-VL and image-text inputs built as its processor builds them: transformers'
    Qwen2VLProcessor needs a video processor, which needs torchvision (never installed here), so the
    image processor's grid gives the number of image tokens (grid / merge_size^2 between the vision
    start and end tokens) and mm_token_type_ids marks them."""
    import transformers
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from hyperquant.multimodal.images import shipped_pairs
    from tests.multimodal.conftest import TEXT, _tokenizer

    tok = _tokenizer()
    specials = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        text_config={**TEXT, "vocab_size": len(tok), "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=2 * 56 * 56)
    batches = []
    for pair in shipped_pairs("calibration")[:6]:
        pixels = image_processor(images=[pair.image], return_tensors="pt")
        tokens = int(pixels["image_grid_thw"][0].prod()) // 4
        text = "<|vision_start|>" + "<|image_pad|>" * tokens + "<|vision_end|>" + pair.caption
        encoded = tok([text], return_tensors="pt", add_special_tokens=False)
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                        "mm_token_type_ids": (encoded["input_ids"] == ids["<|image_pad|>"]).long(), **pixels})
    return model, batches


def test_qwen2_vl_towers_calibrate_in_forward_order_and_round_trip(tmp_path):
    from hyperquant import compress
    from hyperquant.checkpoint import load, save_compressed

    model, batches = _qwen2_vl()
    text = {"input_ids": torch.randint(5, 1000, (2, 16))}
    compress(model, CompressConfig(**QUANT, towers=["language", "vision", "projector"]), [batches[0], text,
             *batches[1:4]], progress=False, heldout_inputs=batches[4:])
    log = [r for r in model.hyperquant_log if r["kind"] == "phm-quant"]
    towers = [("merger" in r["name"] and "projector") or ("visual" in r["name"] and "vision") or "language"
              for r in log]
    # the encoder, then the projector (merger) on the compressed encoder, then the language model
    assert towers == ["vision"] * 4 + ["projector"] * 2 + ["language"] * 6
    patches = sum(b["pixel_values"].shape[0] for b in batches[:4])
    assert all(r["calib_tokens"] == patches for r in log[:4])
    assert all(r["calib_tokens"] == patches // 4 for r in log[4:6])  # merged 2x2 patches, fit batches only
    assert all(math.isfinite(r["output_error_heldout"]) for r in log)
    loaded = load(save_compressed(model, tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[5]).logits, model(**batches[5]).logits, atol=1e-5, rtol=1e-5)


def test_the_run_fingerprint_covers_the_pixels(tmp_path):
    import copy

    from hyperquant.train.config import TrainConfig
    from hyperquant.train.runner import run_fingerprint

    _, processor = build_vlm("llava")
    samples = _samples(processor, limit=2)
    source = type("Source", (), {"folder": tmp_path, "gguf_file": None})()
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    text = torch.randint(0, 100, (2, 8))
    other = copy.deepcopy(samples)
    other[1].inputs["pixel_values"] = other[1].inputs["pixel_values"] + 0.01
    first = run_fingerprint(source, cfg, text, samples)
    assert first == run_fingerprint(source, cfg, text, copy.deepcopy(samples))
    assert first["data"] != run_fingerprint(source, cfg, text, other)["data"]
    assert first["data"] != run_fingerprint(source, cfg, text)["data"]
