"""The `hyperquant` command line: compress, eval, info, export, train."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hyperquant.errors import HyperquantError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Compress transformer FFNs into PHM layers with low-bit factors; evaluate and inspect them.")
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay readable in logs and pipes


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
    method: Annotated[str, typer.Option(help="gptq or rtn")] = "gptq",
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
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for perplexity (0 = skip evaluation)")] = 4096,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: hyperquant-out/<setting>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder")] = False,
) -> None:
    """Compress the FFN layers of MODEL and write a checkpoint folder with a report."""
    from hyperquant.config import CompressConfig

    cfg = CompressConfig(bits=bits, method=method, n=n, num_bases=bases, group_size=group_size, init=init,
                         learn_bases=learn_bases, symmetric=symmetric, act_order=act_order,
                         calib_samples=calib_samples, calib_seq_len=calib_seq_len, rest_dtype=rest_dtype)
    if eval_tokens < 0:
        _fail("--eval-tokens must be >= 0")
    setting = f"dense-{method}{bits}" if n == 1 else f"phm-n{n}b{bases}-{method}{bits}"
    out_dir = out_dir or Path("hyperquant-out") / setting
    if out_dir.exists() and not overwrite:
        _fail(f"output {out_dir} already exists; pass --overwrite or choose another --out")
    calib_texts = None
    if calib_text is not None:
        from hyperquant.data import read_text_file

        calib_texts = [read_text_file(calib_text)]
    run_compress(model, cfg, out_dir, overwrite, calib_texts, eval_tokens)


def run_compress(model_arg, cfg, out_dir: Path, overwrite: bool, calib_texts, eval_tokens: int) -> None:
    from hyperquant.checkpoint import save_compressed
    from hyperquant.data import calibration_ids
    from hyperquant.data import eval_tokens as held_out_tokens
    from hyperquant.evals import PerplexityProtocol, model_size, perplexity
    from hyperquant.evals.size import dtype_bytes
    from hyperquant.models import load_model, resolve_source
    from hyperquant.pipeline import compress as compress_model
    from hyperquant.pipeline import compress_targets
    from hyperquant.report import SUMMARY_COLUMNS, compress_report_md, summary_rows

    source = resolve_source(model_arg)
    console.print(f"loading {source}")
    model, tokenizer = load_model(source)
    compress_targets(model, cfg)  # shape errors (n not dividing a layer) before any long work
    calib = calibration_ids(tokenizer, cfg.calib_samples, cfg.calib_seq_len, texts=calib_texts) \
        if cfg.needs_calibration else None
    protocol = PerplexityProtocol(num_tokens=eval_tokens) if eval_tokens else None
    ids = held_out_tokens(tokenizer, eval_tokens) if protocol else None
    rows = [{"label": "original (fp32)", "size": model_size(model)}]
    if protocol:
        console.print("perplexity of the original model")
        rows[0]["perplexity"] = perplexity(model, ids, protocol)["perplexity"]
    start = time.perf_counter()
    if calib is not None:
        console.print(f"calibrating on {calib.shape[0]} x {calib.shape[1]} tokens")
    compress_model(model, cfg, calib)
    seconds = time.perf_counter() - start
    label = (f"dense {cfg.method.upper()}-{cfg.bits}" if cfg.n == 1 else
             f"PHM n={cfg.n} B={cfg.num_bases} {cfg.method.upper()}-{cfg.bits}") + f" g{cfg.group_size}"
    rows.append({"label": label, "size": model_size(model, rest_bytes_per_param=dtype_bytes(cfg.rest_dtype))})
    if protocol:
        console.print("perplexity of the compressed model")
        rows[1]["perplexity"] = perplexity(model, ids, protocol)["perplexity"]

    def write_report(folder: Path) -> None:
        rows[1]["size"]["bytes_on_disk"] = (folder / "model.safetensors").stat().st_size
        text = compress_report_md(str(source), cfg.to_dict(), rows, model.hyperquant_log,
                                  protocol.to_dict() if protocol else None, seconds)
        (folder / "report.md").write_text(text)
        (folder / "summary.json").write_text(json.dumps(
            {"source": str(source), "config": cfg.to_dict(), "rows": rows,
             "protocol": protocol.to_dict() if protocol else None, "compress_seconds": seconds}, indent=2))

    save_compressed(model, out_dir, tokenizer, overwrite=overwrite, extra_files=write_report)
    _print_table(SUMMARY_COLUMNS, summary_rows(rows), title=f"hyperquant compress -> {out_dir}")
    out.print(f"compressed in {seconds:.1f} s; weights file {rows[1]['size']['bytes_on_disk'] / 1e6:.1f} MB; "
              f"report: {out_dir / 'report.md'}")


@app.command("eval")
@_user_errors
def eval_cmd(
    folder: Annotated[str, typer.Argument(help="hyperquant checkpoint folder (or a plain HF model folder / .gguf)")],
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to measure perplexity on (default: held-out Wikipedia)")] = None,
    eval_tokens: Annotated[int, typer.Option(help="Tokens to score")] = 4096,
    context: Annotated[int, typer.Option(help="Context length of each window")] = 512,
    stride: Annotated[int, typer.Option(help="Stride between windows (= context: non-overlapping)")] = 512,
    latency: Annotated[bool, typer.Option(help="Also time prefill and decode of the torch model")] = True,
) -> None:
    """Perplexity, size, multiply-adds and CPU latency of a model; prints `perplexity: <float>` last."""
    import torch
    from transformers import AutoTokenizer

    from hyperquant.checkpoint import load
    from hyperquant.evals import PerplexityProtocol, folder_bytes, model_size, perplexity, torch_latency
    from hyperquant.models import load_model, resolve_source

    try:
        protocol = PerplexityProtocol(context=context, stride=stride, num_tokens=eval_tokens)
    except ValueError as e:
        _fail(str(e))
    path = Path(folder)
    config_path = path / "config.json"
    if path.is_dir() and config_path.is_file() and "hyperquant" in json.loads(config_path.read_text()):
        model = load(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        size = model_size(model, rest_bytes_per_param=torch.empty(0, dtype=getattr(
            torch, model.config.hyperquant["compress_config"]["rest_dtype"])).element_size())
        size["folder_bytes"] = folder_bytes(path)
    else:
        model, tokenizer = load_model(resolve_source(folder))
        size = model_size(model)
    if text is not None:
        from hyperquant.data import read_text_file

        ids = torch.tensor(tokenizer(read_text_file(text), add_special_tokens=False)["input_ids"])
        if len(ids) < 2:
            _fail(f"{text} has fewer than 2 tokens; give a longer text")
        protocol = PerplexityProtocol(context=context, stride=stride, num_tokens=min(eval_tokens, len(ids)))
    else:
        from hyperquant.data import eval_tokens as held_out_tokens

        ids = held_out_tokens(tokenizer, eval_tokens)
    result = {"size": size}
    if latency:
        result["latency"] = torch_latency(model, model.config.vocab_size)
    result["perplexity"] = perplexity(model, ids, protocol)
    rows = [[k, f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"] for k, v in size.items()]
    if latency:
        rows += [[k, f"{v:.2f}" if isinstance(v, float) else str(v)] for k, v in result["latency"].items()]
    rows += [["tokens scored", str(result["perplexity"]["predicted_tokens"])],
             ["context / stride", f"{context} / {stride}"]]
    _print_table(["metric", "value"], rows, title=f"hyperquant eval {folder}")
    out.print(f"perplexity: {result['perplexity']['perplexity']:.4f}")


@app.command()
@_user_errors
def info(folder: Annotated[str, typer.Argument(help="hyperquant checkpoint folder")]) -> None:
    """Show how a checkpoint was compressed: settings, layers and sizes."""
    from hyperquant.checkpoint import read_hyperquant_config
    from hyperquant.evals import folder_bytes

    config = read_hyperquant_config(folder)
    section = config["hyperquant"]
    cc = section["compress_config"]
    out.print(f"[bold]{folder}[/]: {config.get('model_type')} ({(config.get('architectures') or ['?'])[0]}), "
              f"format {section['format_version']}, {folder_bytes(folder) / 1e6:.1f} MB on disk")
    out.print("settings: " + ", ".join(f"{k}={cc[k]}" for k in ("bits", "method", "n", "num_bases", "group_size",
                                                                  "init", "symmetric", "rest_dtype")))
    kinds: dict[tuple, int] = {}
    for spec in section["layers"].values():
        key = (spec["kind"], spec.get("n", 1), spec.get("num_bases", 1), spec["bits"], spec.get("group_size"),
               f"{spec['out_features']}x{spec['in_features']}")
        kinds[key] = kinds.get(key, 0) + 1
    _print_table(["kind", "n", "B", "bits", "group", "shape (out x in)", "layers"],
                 [[str(c) for c in (*k, v)] for k, v in sorted(kinds.items(), key=str)], title="compressed layers")


@app.command()
@_user_errors
def export(
    folder: Annotated[str, typer.Argument(help="hyperquant checkpoint folder (from `hyperquant compress`)")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .onnx file")] = Path("model.onnx"),
    accuracy_level: Annotated[int, typer.Option(help="MatMulNBits accuracy_level 0-4 (4 = int8 activations, fastest on CPU)")] = 0,
    opset: Annotated[int, typer.Option(help="ONNX opset (18-23)")] = 21,
    device: Annotated[str, typer.Option(help="cpu or cuda (needs onnxruntime-gpu)")] = "cpu",
    cache: Annotated[bool, typer.Option(help="Export with past_key_values inputs and present.* outputs")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output")] = False,
) -> None:
    """Export a checkpoint to ONNX (PHM layers as hyperquant-domain nodes), checked against torch."""
    from hyperquant.exporters import export_command

    export_command(folder, str(out_path), accuracy_level=accuracy_level, opset=opset, device=device,
                   no_cache=not cache, overwrite=overwrite)


@app.command()
@_user_errors
def train(
    model: Annotated[str | None, typer.Argument(help="Local HF causal-LM folder or .gguf; default: the embedded model")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of TrainConfig fields")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (checkpoints, logs, final/)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override max_steps")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint")] = None,
) -> None:
    """Progressive PHM training with distillation (and optional QAT, capacity assignment, LoRA)."""
    from hyperquant.train import train_command

    train_command(model, config, output_dir=output_dir, max_steps=max_steps, resume=resume)


def main() -> None:
    app()
