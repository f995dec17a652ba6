"""The `hyperquant` command line: compress, eval, info, export, train, report."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hyperquant.errors import HyperquantError
from hyperquant.textsets import default_test_tokens

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Compress transformer models (PHM FFNs with low-bit factors, GPTQ everywhere else), evaluate "
                       "them and deploy them to onnxruntime / onnxruntime-genai.")
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay readable in logs and pipes
log = logging.getLogger("hyperquant.cli")


@app.callback()
def _configure_logging() -> None:
    """The library logs through `logging` ("hyperquant.*"); the command line shows INFO and above on stderr."""
    from rich.logging import RichHandler

    library = logging.getLogger("hyperquant")
    library.setLevel(logging.INFO)
    if not any(getattr(h, "_hyperquant_cli", False) for h in library.handlers):
        handler = RichHandler(console=console, show_time=False, show_path=False, show_level=False,
                              markup=False, highlighter=None)
        handler._hyperquant_cli = True
        library.addHandler(handler)
    # bitsandbytes (imported through peft) warns on a CPU with AVX512-BF16 that it could not fetch a hub
    # kernel; nothing of bitsandbytes runs in these commands (hub code is never loaded here, see models.py)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _user_errors(command):
    """User mistakes (HyperquantError) become a one-line message and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HyperquantError as e:
            _fail(str(e))

    return wrapper


def _input_paths(*paths) -> tuple[Path, ...]:
    """The user's input files and folders (an output must never be one of them or hold one)."""
    return tuple(Path(p) for p in paths if p is not None)


# --keep PART: the module-name pattern it leaves alone (the embedding is set through embed_bits)
KEEPABLE = {"attention": r"\.(self_attn|attn|attention)\.", "head": r"^(lm_head|embed_out)$", "embedding": ""}


def _print_table(header: list[str], rows: list[list[str]], title: str | None = None) -> None:
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    out.print(table)


@app.command()
@_user_errors
def compress(
    model: Annotated[str | None, typer.Argument(help="Local HF causal-LM folder or .gguf file; default: the embedded SmolLM2-135M-Instruct")] = None,
    bits: Annotated[int, typer.Option(help="Bits of the quantized factors: 2, 3, 4 or 8")] = 4,
    method: Annotated[str, typer.Option(help="gptq or rtn; fourier = the LLaVA-FA-style comparator (Fourier low-rank + PolarQuant, with --n 1)")] = "gptq",
    n: Annotated[int, typer.Option(help="PHM base size n (1 = keep layers dense, quantize only)")] = 2,
    bases: Annotated[int, typer.Option(help="Number of PHM bases B (1..n^2)")] = 2,
    group_size: Annotated[int, typer.Option(help="Quantization group size (power of two >= 16)")] = 128,
    init: Annotated[str, typer.Option(help="PHM fit: activation (output error on calibration text) or frobenius")] = "activation",
    learn_bases: Annotated[bool, typer.Option(help="Kronecker-SVD bases instead of the fixed I, J, K, L family")] = False,
    symmetric: Annotated[bool, typer.Option(help="Symmetric quantization (no zero points)")] = False,
    act_order: Annotated[bool, typer.Option(help="GPTQ: quantize columns by decreasing Hessian diagonal")] = True,
    calib_samples: Annotated[int, typer.Option(help="Calibration sequences")] = 32,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence")] = 512,
    calib_text: Annotated[Path | None, typer.Option(help="UTF-8 text file for calibration (default: the embedded Wikipedia text)")] = None,
    rest_dtype: Annotated[str, typer.Option(help="Storage dtype of the weights left uncompressed")] = "float16",
    scope: Annotated[str, typer.Option(help="model: the FFN as set, attention and the LM head with the dense quantizer "
                                            "of --bits, the embedding table RTN (--embed-bits); ffn: the FFN only")] = "model",
    embed_bits: Annotated[str, typer.Option(help="Bits of the embedding table (RTN; a tied model shares the LM head's "
                                                 "codes when equal to --bits), or none to keep it")] = "4",
    keep: Annotated[str, typer.Option(help="Comma-separated parts to leave uncompressed: attention, head, embedding")] = "",
    towers: Annotated[str, typer.Option(help="A vision-language model: the towers whose FFN/MLP linears are compressed, "
                                             "comma-separated: language (default), vision, projector")] = "language",
    images: Annotated[Path | None, typer.Option(help="A vision-language model: image-caption pairs for calibration and "
                                                     "training, a folder of images with .txt captions or a JSONL file "
                                                     "(default: the photographs shipped with scikit-image)")] = None,
    fourier_fraction: Annotated[float, typer.Option(help="--method fourier: fraction of each layer's parameters the factors keep")] = 0.25,
    eval_tokens: Annotated[int, typer.Option(help="Validation tokens per domain for perplexity (0 = skip evaluation)")] = 4096,
    test_tokens: Annotated[int | None, typer.Option(help="Test-set tokens per domain (dialogue, drama, code), reported "
                                                         "with standard errors and never read by any choice (default "
                                                         "4 x --eval-tokens: 16,384; 0 = skip)")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Score the compressed model's replies to fixed chat "
                                                                "prompts against the original's (KL, agreement)")] = True,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: hyperquant-out/<setting>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder")] = False,
    train: Annotated[bool, typer.Option("--train/--no-train", help="PHM layers: distil them from the dense model before quantizing (default; post-training alone leaves PHM unusable). --no-train: post-training only")] = True,
    train_tokens: Annotated[int | None, typer.Option(help="Training budget in tokens (default 204800: 200 steps, 30-50 min of "
                                                          "steps on 2 CPU cores; the same command gives the same model)")] = None,
    train_minutes: Annotated[float | None, typer.Option(help="A time budget for the training steps instead, in minutes (as many "
                                                             "steps as fit: the result depends on the machine)")] = None,
    qat: Annotated[bool, typer.Option(help="Train with fake-quantized factors (QAT) from 60 % of the steps; export on the QAT grid")] = False,
    train_config: Annotated[Path | None, typer.Option(help="YAML of TrainConfig fields that override the training recipe (see docs/training.md)")] = None,
    device: Annotated[str | None, typer.Option(help="Where calibration, training and evaluation run: auto (CUDA when visible), cpu, "
                                             "cuda or cuda:<i>; the model stays on the CPU and its blocks visit the "
                                             "device one at a time")] = None,
) -> None:
    """Compress MODEL (the FFN as PHM with low-bit factors, attention, LM head and embeddings quantized)
    and write a checkpoint folder with a report.

    PHM layers (n >= 2) are trained by distillation from the dense model for --train-minutes, then
    quantized; --no-train gives the post-training result in a few minutes. A vision-language folder
    (with its processor) is calibrated, trained and evaluated on image-caption pairs too."""
    from hyperquant.config import CompressConfig
    from hyperquant.device import resolve_device
    from hyperquant.multimodal.towers import parse_towers
    from hyperquant.plan import config_slug

    where = resolve_device(device)  # a wrong or absent device fails before anything is loaded
    tower_list = list(parse_towers(towers))

    if method == "fourier":  # the comparator kind for every target; n and --bases do not apply
        if n not in (1, 2):
            _fail("--method fourier replaces each weight by a Fourier low-rank factorization; drop --n")
        cfg = CompressConfig(n=1, bits=None, group_size=group_size, calib_samples=calib_samples,
                             calib_seq_len=calib_seq_len, rest_dtype=rest_dtype, towers=tower_list,
                             layers={".*": {"kind": "fourier", "fraction": fourier_fraction, "bits": bits,
                                            "group_size": group_size}})
    else:
        kept = [part.strip() for part in keep.split(",") if part.strip()]
        unknown = sorted(set(kept) - set(KEEPABLE))
        if unknown:
            _fail(f"--keep {unknown[0]}: choose from {', '.join(KEEPABLE)} (comma-separated)")
        layers = {KEEPABLE[part]: {"kind": "keep"} for part in kept if part != "embedding"}
        if embed_bits.lower() in ("none", "") or "embedding" in kept:
            table_bits = None
        elif embed_bits.isdigit():
            table_bits = int(embed_bits)
        else:
            _fail(f"--embed-bits takes a bit width (2, 4, 8) or none, not {embed_bits!r}")
        cfg = CompressConfig(bits=bits, method=method, n=n, num_bases=bases, group_size=group_size, init=init,
                             learn_bases=learn_bases, symmetric=symmetric, act_order=act_order,
                             calib_samples=calib_samples, calib_seq_len=calib_seq_len, rest_dtype=rest_dtype,
                             scope=scope, embed_bits=table_bits, layers=layers, towers=tower_list)
    if eval_tokens < 0:
        _fail("--eval-tokens must be >= 0")
    test_tokens = default_test_tokens(eval_tokens) if test_tokens is None else test_tokens
    if test_tokens < 0:
        _fail("--test-tokens must be >= 0")
    training = train and n > 1 and method != "fourier"
    setting = config_slug(cfg) + ("-qat" if training and qat else "-trained" if training else "")
    out_dir = out_dir or Path("hyperquant-out") / setting
    from hyperquant.atomic import check_output_dir

    check_output_dir(out_dir, overwrite, _input_paths(model, calib_text, images))
    _check_vision_options(model, tower_list, images)
    image_pairs = None
    if images is not None:
        from hyperquant.multimodal.images import read_pairs

        image_pairs = read_pairs(images)  # a bad folder or line fails before the model loads
    tcfg = None
    if training:
        from hyperquant.train.compress import work_dir_for
        from hyperquant.train.config import read_yaml_options
        from hyperquant.train.recipe import DEFAULT_TOKENS, compress_train_config

        if train_tokens is not None and train_minutes is not None:
            _fail("--train-tokens and --train-minutes are two budgets; give one")
        overrides = read_yaml_options(train_config) if train_config is not None else {}
        if device is not None:
            overrides["device"] = device  # the flag over the YAML's device
        tokens = train_tokens if train_tokens is not None else (None if train_minutes is not None else DEFAULT_TOKENS)
        from hyperquant.models import is_vision_language_source, resolve_source

        tcfg = compress_train_config(cfg, str(work_dir_for(out_dir)), train_minutes, qat, overrides, tokens,
                                     vision_language=is_vision_language_source(resolve_source(model)))
    elif qat:
        _fail("--qat trains the PHM layers: drop --no-train (and use n >= 2)")
    calib_texts = None
    if calib_text is not None:
        from hyperquant.data import read_text_file

        calib_texts = [read_text_file(calib_text)]
    run_compress(model, cfg, out_dir, overwrite, calib_texts, eval_tokens, tcfg, image_pairs, where,
                 test_tokens=test_tokens if eval_tokens else 0, chat=chat and bool(eval_tokens))


def _check_vision_options(model_arg, towers: list[str], images) -> None:
    """--towers beyond the language model and --images need a vision-language folder: told before loading."""
    from hyperquant.models import is_vision_language_source, resolve_source

    if towers == ["language"] and images is None:
        return
    source = resolve_source(model_arg)
    if not is_vision_language_source(source):
        option = f"--images {images}" if images is not None else f"--towers {','.join(towers)}"
        _fail(f"{option}: {source} is a text model (no vision tower); image-caption data and the vision or "
              f"projector towers need a vision-language model folder (drop the option)")


def _image_data(source, model, image_pairs, heldout_pairs: int):
    """A vision-language model's processor, (calibration samples, held-out samples) of image-caption
    pairs (the user's, else the shipped calibration photographs) and the evaluation samples (the shipped
    evaluation photographs); (None, None, None, None) for a text model."""
    from hyperquant.models import is_vision_language_source, load_processor
    from hyperquant.multimodal.images import shipped_pairs
    from hyperquant.multimodal.inputs import caption_samples

    if not is_vision_language_source(source):
        if image_pairs is not None:
            raise HyperquantError(f"--images: {source} is a text model; image-caption data needs a vision-language "
                                  f"model folder")
        return None, None, None, None
    processor = load_processor(source.folder)
    pairs = image_pairs if image_pairs is not None else shipped_pairs("calibration")
    samples = caption_samples(processor, pairs)
    held = min(heldout_pairs, len(samples) // 4)  # per-layer held-out errors, never fitted on
    fit, heldout = samples[: len(samples) - held], samples[len(samples) - held:]
    log.info("%d image-caption pairs for calibration (%d held out)", len(fit), len(heldout))
    return processor, fit, heldout, caption_samples(processor, shipped_pairs("evaluation"))


def run_compress(model_arg, cfg, out_dir: Path, overwrite: bool, calib_texts, eval_tokens: int,
                 train_cfg=None, image_pairs=None, device=None, test_tokens: int = 0, chat: bool = False) -> None:
    from hyperquant.atomic import check_free_space
    from hyperquant.data import calibration_ids, calibration_split
    from hyperquant.data import eval_tokens as held_out_tokens
    from hyperquant.evals import PerplexityProtocol
    from hyperquant.job import Evaluation, compress_to_folder, measure
    from hyperquant.models import check_sequence_length, load_model, resolve_source
    from hyperquant.plan import resolve_plan
    from hyperquant.report import summary_columns, summary_rows

    source = resolve_source(model_arg)
    log.info("loading %s", source)
    model, tokenizer = load_model(source)
    processor, image_fit, image_heldout, image_eval = _image_data(source, model, image_pairs, 4)
    # Generous estimates from the parameter count: a compressed checkpoint stores under a byte per
    # parameter (0.4 for the default model, 1 with the rest in fp16); a training run's work folder keeps
    # two checkpoints of the trained factors with their optimizer moments (fp32, three tensors each).
    params = sum(p.numel() for p in model.parameters())
    check_free_space(out_dir, params * (1 if train_cfg is None else 8),
                     "the compressed checkpoint" if train_cfg is None else "the training run and its checkpoint")
    plan = resolve_plan(model, cfg)  # shape errors (n not dividing a layer) before any long work
    if cfg.needs_calibration and train_cfg is None:
        from hyperquant.pipeline import check_calibration_size

        check_sequence_length(model.config, cfg.calib_seq_len, "--calib-seq-len")
        check_calibration_size({name: model.get_submodule(name) for name in plan}, plan,
                               cfg.calib_samples * cfg.calib_seq_len)
    if train_cfg is not None:
        check_sequence_length(model.config, train_cfg.seq_len, "seq_len (--train-config)")
        check_sequence_length(model.config, min(train_cfg.eval_context, train_cfg.eval_tokens),
                              "eval_context (--train-config)")
    from hyperquant.models import max_positions

    # windows of 512 tokens, or of the model's positions if it has fewer
    context = min(512, max_positions(model.config) or 512)
    calib = heldout = None
    if cfg.needs_calibration and train_cfg is None:
        calib, heldout = calibration_split(tokenizer, cfg.calib_samples, cfg.heldout_samples, cfg.calib_seq_len,
                                           texts=calib_texts)
    protocol = PerplexityProtocol(context=context, stride=context, num_tokens=eval_tokens) if eval_tokens else None
    from hyperquant.data import second_domain_tokens
    from hyperquant.evals.chat import CHAT_PROMPTS
    from hyperquant.textsets import load_test_set

    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    evaluation = Evaluation(held_out_tokens(tokenizer, eval_tokens) if protocol else None, protocol,
                            second_ids=second_domain_tokens(tokenizer, eval_tokens) if protocol else None,
                            test_ids=load_test_set(text_tokenizer, test_tokens) if protocol and test_tokens else None,
                            captions=image_eval if eval_tokens else None)
    if chat and processor is None:  # the original's replies, before anything changes the model
        from hyperquant.evals.chat import ChatReference

        log.info("chat check: the original's greedy replies to %d prompts", len(CHAT_PROMPTS))
        evaluation.chat = ChatReference.from_model(model, tokenizer)
    rows = [measure(model, "original (fp32)", evaluation, device=device)]
    saved_with = processor if processor is not None else tokenizer  # a processor saves its tokenizer too
    if train_cfg is not None:
        from hyperquant.train.compress import train_and_compress

        train_ids = calibration_ids(tokenizer, train_cfg.train_samples, train_cfg.seq_len, train_cfg.data_seed,
                                    texts=calib_texts)
        per_step = train_cfg.per_device_batch_size * train_cfg.grad_accum_steps * train_cfg.seq_len
        if train_cfg.max_minutes is not None:
            log.info("training the PHM layers for about %s min (a time budget: the result depends on the machine; "
                     "--no-train: post-training only)", train_cfg.max_minutes)
        else:
            log.info("training the PHM layers: %d steps, %s tokens (--no-train: post-training only)",
                     train_cfg.max_steps, f"{train_cfg.max_steps * per_step:,}")
        if evaluation.eval_ids is None:
            evaluation = Evaluation(held_out_tokens(tokenizer, train_cfg.eval_tokens), None)
        train_and_compress(source, model, saved_with, cfg, train_cfg, out_dir, overwrite, train_ids, evaluation,
                           rows, image_fit)
        _print_table(summary_columns(rows), summary_rows(rows), title=f"hyperquant compress -> {out_dir}")
        out.print(f"weights file {rows[1]['size']['bytes_on_disk'] / 1e6:.1f} MB; report: {out_dir / 'report.md'}")
        return
    if calib is not None:
        log.info("calibrating on %d x %d tokens", calib.shape[0], calib.shape[1])
    if processor is not None:
        from hyperquant.multimodal.inputs import with_image_batches

        calib, heldout = with_image_batches(calib, image_fit), with_image_batches(heldout, image_heldout)
    result = compress_to_folder(model, saved_with, cfg, out_dir, source=str(source), calib=calib,
                                evaluation=evaluation, overwrite=overwrite, rows=rows, heldout=heldout,
                                device=device)
    _print_table(summary_columns(rows + [result.row]), summary_rows(rows + [result.row]), title=f"hyperquant compress -> {out_dir}")
    out.print(f"compressed in {result.seconds:.1f} s; weights file {result.row['size']['bytes_on_disk'] / 1e6:.1f} "
              f"MB; report: {out_dir / 'report.md'}")


@app.command("eval")
@_user_errors
def eval_cmd(
    folder: Annotated[str, typer.Argument(help="hyperquant checkpoint folder (or a plain HF model folder / .gguf)")],
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to measure perplexity on (default: held-out Wikipedia)")] = None,
    eval_tokens: Annotated[int, typer.Option(help="Validation tokens to score per domain")] = 4096,
    test_tokens: Annotated[int | None, typer.Option(help="Test-set tokens per domain (dialogue, drama, code; default "
                                                         "4 x --eval-tokens: 16,384; 0 = skip; not with --text)")] = None,
    context: Annotated[int | None, typer.Option(help="Context length of each window (default 512, or the model's positions if fewer)")] = None,
    stride: Annotated[int | None, typer.Option(help="Stride between windows (default = context: non-overlapping)")] = None,
    latency: Annotated[bool, typer.Option(help="Also time prefill and decode of the torch model (on the CPU)")] = True,
    device: Annotated[str, typer.Option(help="Where perplexity runs: auto (CUDA when visible), cpu, cuda or cuda:<i>")] = "auto",
    original: Annotated[str | None, typer.Option(help="The uncompressed model (folder or .gguf): also score the chat "
                                                      "check, KL to its greedy replies to fixed chat prompts and "
                                                      "agreement with them")] = None,
    images: Annotated[Path | None, typer.Option(help="A vision-language model: image-caption pairs to score captions on, a "
                                                     "folder of images with .txt captions or a JSONL file (default: the "
                                                     "shipped evaluation photographs)")] = None,
) -> None:
    """Perplexity on the validation domains (held-out Wikipedia, the Python docs) and on the test set
    (dialogue, drama, code: text no choice has read), each with its standard error over windows, size,
    multiply-adds and CPU latency of a model; prints `perplexity: <float>` (validation Wikipedia, or
    --text) last. A vision-language model also gets image-conditioned caption perplexity and, for a checkpoint that
    recorded its original's greedy captions, their agreement."""
    import torch
    from transformers import AutoTokenizer

    from hyperquant.device import resolve_device

    where = resolve_device(device)

    from hyperquant.checkpoint import is_hyperquant_checkpoint, load
    from hyperquant.evals import PerplexityProtocol, folder_bytes, model_size, perplexity, torch_latency
    from hyperquant.models import check_sequence_length, load_model, max_positions, resolve_source

    if context is not None and context < 1:
        _fail(f"--context {context} must be at least 1 (tokens per window, e.g. 512)")
    if stride is not None and not 0 < stride <= (context or 512):
        _fail(f"--stride {stride} must be in 1..--context ({context or 512}); a stride equal to the context gives "
              f"non-overlapping windows")
    if eval_tokens < 2:
        _fail(f"--eval-tokens {eval_tokens} must be at least 2 (one token is predicted from the one before)")
    test_tokens = default_test_tokens(eval_tokens) if test_tokens is None else test_tokens
    if test_tokens < 0:
        _fail(f"--test-tokens {test_tokens} must be >= 0 (0 skips the test set)")
    original_source = resolve_source(original) if original is not None else None  # a bad path fails first
    path = Path(folder)
    image_pairs = None
    if images is not None:
        from hyperquant.multimodal.images import read_pairs
        from hyperquant.multimodal.towers import is_vision_language_dict

        config_file = path / "config.json"
        try:
            config = json.loads(config_file.read_text()) if path.is_dir() and config_file.is_file() else {}
        except (ValueError, UnicodeDecodeError):
            config = {}  # a damaged config.json is told by the loader below, in its own words
        if not is_vision_language_dict(config if isinstance(config, dict) else {}):
            _fail(f"--images: {folder} is not a vision-language model folder; image-caption pairs need one")
        image_pairs = read_pairs(images)
    if is_hyperquant_checkpoint(path):
        model = load(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        size = model_size(model, rest_bytes_per_param=torch.empty(0, dtype=getattr(
            torch, model.config.hyperquant["compress_config"]["rest_dtype"])).element_size())
        size["folder_bytes"] = folder_bytes(path)
    else:
        model, tokenizer = load_model(resolve_source(folder))
        size = model_size(model)
    if context is None:
        context = min(512, max_positions(model.config) or 512)
    check_sequence_length(model.config, min(context, eval_tokens), "--context")
    stride = context if stride is None else stride
    if stride > context:
        _fail(f"--stride {stride} must be in 1..--context ({context})")
    protocol = PerplexityProtocol(context=context, stride=stride, num_tokens=eval_tokens)
    if text is not None:
        from hyperquant.data import read_text_file

        ids = torch.tensor(tokenizer(read_text_file(text), add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            _fail(f"{text} has fewer than 2 tokens; give a longer text")
        protocol = PerplexityProtocol(context=context, stride=stride, num_tokens=min(eval_tokens, len(ids)))
    else:
        from hyperquant.data import eval_tokens as held_out_tokens

        ids = held_out_tokens(tokenizer, eval_tokens)
    second, tests = None, {}
    if text is None:  # the second validation domain beside the held-out Wikipedia split, and the test set
        from hyperquant.data import second_domain_tokens
        from hyperquant.textsets import load_test_set

        second = second_domain_tokens(tokenizer, eval_tokens)
        tests = load_test_set(getattr(tokenizer, "tokenizer", tokenizer), test_tokens) if test_tokens else {}
    captions = _eval_captions(path, model, image_pairs)
    chat = _chat_reference(original_source, tokenizer) if original_source is not None else None
    result = {"size": size}
    if latency:
        result["latency"] = torch_latency(model, model.config.get_text_config().vocab_size)
    result["perplexity"] = perplexity(model.to(where), ids, protocol)
    if second is not None:
        result["perplexity_second_domain"] = perplexity(model, second, protocol)
    test_protocol = PerplexityProtocol(context=context, stride=stride, num_tokens=test_tokens or 2)
    result["test"] = {name: perplexity(model, ids, test_protocol) for name, ids in tests.items()}
    if chat is not None:
        result["chat"] = chat.score(model)
    result["device"] = str(where)
    rows = [[k, f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"] for k, v in size.items()]
    if latency:
        rows += [[k, f"{v:.2f}" if isinstance(v, float) else str(v)] for k, v in result["latency"].items()]
    rows += [["tokens scored", str(result["perplexity"]["predicted_tokens"])],
             ["context / stride", f"{context} / {stride}"]]
    rows += _perplexity_rows(result, text)
    if chat is not None:
        agreement = f"{result['chat']['agreement']:.1%} of {result['chat']['tokens']} reply tokens"
        rows += [["chat KL to the original (nats/token)", f"{result['chat']['kl']:.4f}"],
                 ["chat greedy agreement with the original", agreement]]
    if captions is not None:
        from hyperquant.job import Evaluation, measure_captions

        samples, reference = captions
        row = {"label": folder}
        measure_captions(model, Evaluation(captions=samples, reference_captions=reference), row)
        rows += [["caption perplexity", f"{row['caption_perplexity']:,.4g}"],
                 ["caption tokens scored", f"{sum(s.caption_tokens for s in samples)} in {len(samples)} pairs"]]
        if reference is not None:
            rows += [["greedy caption agreement with the original",
                      f"{row['caption_agreement']:.1%} tokens, {row['caption_exact_match']:.0%} exact"]]
    _print_table(["metric", "value"], rows, title=f"hyperquant eval {folder}")
    out.print(f"perplexity: {result['perplexity']['perplexity']:.4f}")


def _chat_reference(original, tokenizer):
    """The original model's greedy replies to the chat prompts (it is loaded, replies, and is let go)."""
    from hyperquant.evals.chat import ChatReference
    from hyperquant.models import load_model

    reference_model, _ = load_model(original)
    return ChatReference.from_model(reference_model, tokenizer)


def _perplexity_rows(result: dict, text) -> list[list[str]]:
    """One row per domain, each named with its role and given with its standard error."""
    from hyperquant.report import fmt_figure
    from hyperquant.textsets import TEST_DOMAINS, validation_title

    def cell(r: dict) -> str:
        return f"{fmt_figure(r['perplexity'], r['perplexity_stderr'])} ({r['predicted_tokens']} tokens)"

    first = f"perplexity on {text}" if text is not None else f"validation: {validation_title('wikipedia')}"
    rows = [[first, cell(result["perplexity"])]]
    if "perplexity_second_domain" in result:
        rows.append([f"validation: {validation_title('python-docs')}", cell(result["perplexity_second_domain"])])
    rows += [[f"test: {TEST_DOMAINS[name].title}", cell(r)] for name, r in result["test"].items()]
    return rows


def _eval_captions(path: Path, model, image_pairs):
    """(caption samples, the original's greedy captions or None) for a vision-language model, else None."""
    from hyperquant.multimodal.towers import is_vision_language

    if not is_vision_language(model.config):
        if image_pairs is not None:
            _fail(f"--images: {path} is a text model; image-caption pairs need a vision-language model")
        return None
    from hyperquant.models import load_processor
    from hyperquant.multimodal.images import shipped_pairs
    from hyperquant.multimodal.inputs import caption_samples

    folder = path if path.is_dir() else path.parent
    samples = caption_samples(load_processor(folder), image_pairs or shipped_pairs("evaluation"))
    reference = None
    summary = folder / "summary.json"
    if image_pairs is None and summary.is_file():
        try:
            reference = (json.loads(summary.read_text()).get("reference_captions") or {}).get("tokens")
        except ValueError:
            log.warning("%s is not valid JSON: the greedy captions are not compared with the original's", summary)
    return samples, reference


@app.command()
@_user_errors
def info(
    folder: Annotated[str, typer.Argument(help="hyperquant checkpoint folder")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-layer plan as JSON (one object per layer)")] = False,
) -> None:
    """Show how a checkpoint was compressed: settings, layers and sizes."""
    from hyperquant.checkpoint import read_hyperquant_config
    from hyperquant.evals import folder_bytes

    config = read_hyperquant_config(folder)
    section = config["hyperquant"]
    plan = section.get("plan") or {}
    layers = [{"name": name, **spec, **plan.get(name, {})} for name, spec in section["layers"].items()]
    kept = [{"name": name, **entry} for name, entry in plan.items() if name not in section["layers"]]
    if as_json:
        print(json.dumps({"folder": str(folder), "format_version": section["format_version"],
                          "model_type": config.get("model_type"), "layers": layers + kept}, indent=2))
        return
    cc = section["compress_config"]
    out.print(f"[bold]{folder}[/]: {config.get('model_type')} ({(config.get('architectures') or ['?'])[0]}), "
              f"format {section['format_version']}, {folder_bytes(folder) / 1e6:.1f} MB on disk")
    if plan:
        from hyperquant.plan import plan_from_dict, plan_label

        out.print(f"plan: {plan_label(plan_from_dict(plan))}; other weights in {cc.get('rest_dtype')}")
    else:
        out.print("settings: " + ", ".join(f"{k}={cc[k]}" for k in ("bits", "method", "n", "num_bases",
                                                                      "group_size", "rest_dtype") if k in cc))
    from hyperquant.multimodal.towers import is_vision_language_dict, tower_of_name

    towers = is_vision_language_dict(config)  # a vision-language model: which tower each layer is in
    kinds: dict[tuple, int] = {}
    for layer in layers + kept:
        shape = f"{layer['out_features']}x{layer['in_features']}" if "out_features" in layer else "-"
        key = ((tower_of_name(layer["name"]),) if towers else ()) + (
            layer["kind"], layer.get("n", 1), layer.get("num_bases", "-"), layer.get("bits"),
            layer.get("group_size"), shape)
        kinds[key] = kinds.get(key, 0) + 1
    _print_table((["tower"] if towers else []) + ["kind", "n", "B", "bits", "group", "shape (out x in)", "layers"],
                 [[str(c) for c in (*k, v)] for k, v in sorted(kinds.items(), key=str)], title="compressed layers")


@app.command()
@_user_errors
def export(
    folder: Annotated[str, typer.Argument(help="hyperquant checkpoint folder (from `hyperquant compress`)")],
    out_path: Annotated[Path, typer.Option("--out", help="Output folder (onnxruntime-genai: fused graph, genai_config.json, "
                                                          "tokenizer), or a .onnx file (traced graph, any architecture)")] = Path("hyperquant-onnx"),
    accuracy_level: Annotated[int | None, typer.Option(help="MatMulNBits accuracy_level 0-4 (4 = int8 activations, "
                                                            "fastest on CPU; default 4 on cpu, 0 on cuda)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18-23)")] = 21,
    device: Annotated[str, typer.Option(help="cpu or cuda (needs onnxruntime-gpu)")] = "cpu",
    cache: Annotated[bool, typer.Option(help="Export with past_key_values inputs and present.* outputs")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output")] = False,
) -> None:
    """Export a checkpoint to ONNX (PHM layers as hyperquant-domain nodes), checked against torch: an
    onnxruntime-genai folder with the fused graph, or with --out FILE.onnx one traced graph."""
    from hyperquant.checkpoint import read_hyperquant_config
    from hyperquant.exporters import export_command, export_folder_command
    from hyperquant.multimodal.towers import is_vision_language_dict

    if is_vision_language_dict(read_hyperquant_config(folder)):
        _fail(f"{folder} is a vision-language model; its ONNX export (vision encoder, projector and the image "
              f"inputs of the decoder) is not built: run it in torch with hyperquant.load")
    level = accuracy_level if accuracy_level is not None else (4 if device == "cpu" else 0)
    if out_path.suffix == ".onnx":
        export_command(folder, str(out_path), accuracy_level=level, opset=opset, device=device,
                       no_cache=not cache, overwrite=overwrite)
        return
    if device != "cpu" or not cache:
        _fail("the onnxruntime-genai folder is written for --device cpu with the KV cache; for other settings "
              "export one traced file with --out model.onnx")
    export_folder_command(folder, str(out_path), accuracy_level=level, overwrite=overwrite)


@app.command()
@_user_errors
def train(
    model: Annotated[str | None, typer.Argument(help="Local HF causal-LM folder or .gguf; default: the embedded model")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of TrainConfig fields")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (checkpoints, logs, final/)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override max_steps")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when visible), cpu, cuda or cuda:<i> (overrides the YAML's device)")] = None,
) -> None:
    """Progressive PHM training with distillation (and optional QAT, capacity assignment, LoRA)."""
    from hyperquant.train import train_command

    if device is not None:
        from hyperquant.device import resolve_device

        resolve_device(device)  # a wrong or absent device fails before anything is loaded
    train_command(model, config, output_dir=output_dir, max_steps=max_steps, resume=resume,
                  overrides={"device": device})


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated integers, e.g. 2,4 (got {text!r})")


@app.command()
@_user_errors
def report(
    model: Annotated[str | None, typer.Argument(help="Local HF causal-LM folder or .gguf; default: the embedded model")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Sweep YAML (points, grid, measurement options); without it the flags below make the sweep")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Report folder (report.md, report.html, points.json, PNGs)")] = Path("hyperquant-report"),
    cache: Annotated[Path | None, typer.Option(help="Cache of measured points (default: .<out>.cache beside the report)")] = None,
    bits: Annotated[str | None, typer.Option(help="Bit widths of the quantized points, comma-separated (default 4)")] = None,
    n: Annotated[str | None, typer.Option("--n", help="PHM base sizes, comma-separated (default 2,4)")] = None,
    bases: Annotated[str | None, typer.Option(help="PHM numbers of bases, comma-separated; those <= n^2 are used (default 2)")] = None,
    group_size: Annotated[int | None, typer.Option(help="Quantization group size (default 128)")] = None,
    fourier: Annotated[bool | None, typer.Option("--fourier/--no-fourier", help="Include the Fourier low-rank + PolarQuant comparator at the bytes of each PHM shape (default: yes)")] = None,
    baselines: Annotated[bool | None, typer.Option("--baselines/--no-baselines", help="Include bitsandbytes NF4 and GPTQModel, skipped when the baselines extra is not installed (default: yes)")] = None,
    latency: Annotated[bool | None, typer.Option("--latency/--no-latency", help="Export to ONNX and time onnxruntime prefill/decode (default: yes; overrides the YAML)")] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="Held-out tokens for perplexity (default 4096; overrides the YAML)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder (cached points are reused either way)")] = False,
) -> None:
    """Sweep compression settings on MODEL and write a size / accuracy / latency tradeoff report."""
    import shlex

    from hyperquant.tradeoff.spec import SweepConfig, default_sweep
    from hyperquant.tradeoff.sweep import run_sweep

    measure = {k: v for k, v in {"latency": latency, "eval_tokens": eval_tokens}.items() if v is not None}
    if config is not None:
        if any(v is not None for v in (bits, n, bases, group_size, fourier, baselines)):
            _fail("--bits, --n, --bases, --group-size, --fourier and --baselines make the sweep when there is no "
                  "--config; with a YAML, put the points in it")
        data = SweepConfig.from_yaml(config).to_dict()
        cfg = SweepConfig.from_dict({**data, **measure, **({"model": model} if model is not None else {})})
    else:
        cfg = default_sweep(_int_list(bits or "4", "--bits"), _int_list(n or "2,4", "--n"),
                            _int_list(bases or "2", "--bases"), group_size or 128,
                            fourier is not False, baselines is not False, model=model, **measure)
    from hyperquant.atomic import check_output_dir

    check_output_dir(out_dir, overwrite, _input_paths(cfg.model, config))
    if cfg.model is not None:
        from hyperquant.models import is_vision_language_source, resolve_source

        if is_vision_language_source(resolve_source(cfg.model)):  # a wrong path fails before any work too
            _fail(f"{cfg.model} is a vision-language model; the tradeoff report sweeps text models only (compress "
                  f"and evaluate it with hyperquant compress / eval)")
    from hyperquant.checkpoint import read_hyperquant_config

    for point in cfg.points:  # a checkpoint point that is not there fails now, not after the sweep
        if point.checkpoint:
            if not Path(point.checkpoint).exists():
                _fail(f"checkpoint point {point.checkpoint} does not exist; fix its path in {config or 'the sweep'}")
            read_hyperquant_config(point.checkpoint)
    command = "hyperquant report " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    result = run_sweep(cfg, out_dir, cache, overwrite=overwrite, command=command)
    points = result["points"]
    ok = [p for p in points if p["status"] == "ok"]
    rows = [[p["label"], f"{p['metrics']['bytes_on_disk'] / 1e6:.1f}", f"{p['metrics']['bits_per_weight']:.2f}",
             f"{p['metrics']['perplexity']:.4g}",
             "-" if p["metrics"].get("decode_ms") is None else f"{p['metrics']['decode_ms']:.1f}"] for p in ok]
    _print_table(["point", "MB", "bits/weight", "perplexity", "decode ms"], rows,
                 title=f"hyperquant report -> {out_dir}")
    failed = [p for p in points if p["status"] == "failed"]
    for p in points:
        if p["status"] != "ok":
            out.print(f"{p['status']}: {p['label']}: {p['error']}")
    out.print(f"{len(ok)} points ({len(result['computed'])} computed now, the rest from the cache); "
              f"report: {out_dir / 'report.md'}")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outputs are atomic: an interrupted run leaves nothing half-written
        console.print("interrupted: nothing was written (a training run resumes from its last checkpoint when "
                      "the same command is run again)", highlight=False, soft_wrap=True)
        sys.exit(130)
