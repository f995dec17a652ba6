"""Tiny random vision-language models of three families, each saved with a real processor (its image
processor and the MiniLM WordPiece tokenizer with the family's image tokens added)."""

import pytest
import torch

FAMILIES = ("llava", "idefics3", "gemma3")
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8}


def _tokenizer(**kwargs):
    from transformers import AutoTokenizer

    from tests.conftest import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir(), **kwargs)


def _llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION, projection_dim=32),
                         text_config=LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TEXT),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(config), processor


def _idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>",
                                                          "<global-img>"]})
    config = Idefics3Config(vision_config=VISION, text_config=dict(model_type="llama", vocab_size=len(tok),
                                                                   pad_token_id=tok.pad_token_id, **TEXT),
                            image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                             max_image_size={"longest_edge": 32})
    return Idefics3ForConditionalGeneration(config), Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                                                        image_seq_len=4)


def _gemma3():
    import transformers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    tok = _tokenizer(extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                           "eoi_token": "<end_of_image>"})
    config = Gemma3Config(text_config=dict(vocab_size=len(tok), head_dim=8, sliding_window=64,
                                           pad_token_id=tok.pad_token_id, **TEXT),
                          vision_config=VISION, mm_tokens_per_image=4, boi_token_index=tok.boi_token_id,
                          eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)
    # the Pillow image processor: the default one needs torchvision, which this project never installs
    image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialized to zeros: the images would not reach the language model at all
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return model, Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                                                    image_seq_length=4)


BUILDERS = {"llava": _llava, "idefics3": _idefics3, "gemma3": _gemma3}


def build_vlm(family: str):
    torch.manual_seed(0)
    model, processor = BUILDERS[family]()
    return model.eval(), processor


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory):
    """{family: folder} of saved tiny vision-language models with their processors."""
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        model, processor = build_vlm(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[family] = folder
    return folders
