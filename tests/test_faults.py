"""Bad input and faults, one row each: every one ends in a one-line error naming the problem and the
fix, exit code 2, no traceback, nothing written and nothing of the user's lost.

Each row's setup builds the bad input under the test's folder and returns the command line; the test
fingerprints every file there (and the shared model and checkpoint folders) before the command and
checks after it that nothing was added, changed or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hyperquant.cli import app

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--eval-tokens", "256", "--group-size", "16", "--no-train"]
SMALL_TRAIN = ("seq_len: 32\ntrain_samples: 16\nper_device_batch_size: 2\ninit_samples: 4\nmax_steps: 2\n"
               "num_threads: 1\nprogress: false\neval_tokens: 128\neval_context: 64\n")


@pytest.fixture(scope="module")
def good_checkpoint(tiny_model_dir, tmp_path_factory):
    """A hyperquant checkpoint of the tiny model (PHM GPTQ FFN, GPTQ attention and head)."""
    out = tmp_path_factory.mktemp("good") / "ckpt"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


@dataclass
class Env:
    tmp: Path
    model: Path  # the tiny model folder (shared: never to be changed)
    ckpt: Path  # a good checkpoint (shared: never to be changed)

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model, self.tmp / "model"))

    def ckpt_copy(self) -> Path:
        return Path(shutil.copytree(self.ckpt, self.tmp / "ckpt"))

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def out(self) -> Path:
        return self.tmp / "out"


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _model_with(env: Env, edit: Callable[[dict], None]) -> Path:
    model = env.model_copy()
    _edit_tensors(_weights(model), edit)
    return model


def _set(key: str, value: float):
    def edit(state):
        state[key].view(-1)[0] = value
    return edit


def _layer_spec(env: Env, layer: str, edit: Callable[[dict], None]) -> Path:
    ckpt = env.ckpt_copy()
    _edit_json(ckpt / "config.json", lambda c: edit(c["hyperquant"]["layers"][layer]))
    return ckpt


def _compress(model, *args) -> list:
    return ["compress", model, *FAST, *args]


def _train_work(env: Env, files: dict[str, str | bytes]) -> Path:
    """An interrupted `compress` run's work folder beside --out, holding ``files``."""
    step = env.tmp / ".out.train" / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    for name, content in files.items():
        (step / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return step


def _foreign_checkpoint() -> dict[str, bytes]:
    """A resumable checkpoint (as save_checkpoint writes) of a run of another model."""
    from safetensors.torch import save

    meta = {"step": 2, "scheduler": {}, "layer_bases": {}, "history": [], "config": {}, "schedule": {},
            "fingerprint": {"model": "[[\"/elsewhere/other-model\", 1, 1]]", "config": {}, "data": "0"},
            "optimizer": {"param_groups": [], "indices": [], "plain": {}}}
    return {"state.json": json.dumps(meta), "state.safetensors": save({"rng.torch": torch.get_rng_state()})}


T = "train.yaml"


def _with_train_yaml(text: str):
    return lambda e: ["compress", e.model, "--train-config", e.write(T, text)]
LLAMA_FFN = "model.layers.0.mlp.down_proj"

# (id, setup(env) -> argv, the message the error line must hold)
FAULTS: list[tuple[str, Callable[[Env], list], str]] = [
    # --- the model to compress
    ("model-missing", lambda e: _compress(e.tmp / "nope"), "does not exist"),
    ("model-folder-without-config", lambda e: _compress(e.write("empty/x.txt", "x").parent), "no config.json"),
    ("model-file-not-gguf", lambda e: _compress(e.write("model.txt", "hello")), "not .gguf"),
    ("model-gguf-not-gguf", lambda e: _compress(e.write("model.gguf", "not a gguf file at all")), "model.gguf"),
    ("model-gguf-truncated", lambda e: _compress(_truncated_gguf(e)), "truncated.gguf"),
    ("model-config-bad-json", lambda e: _compress(_bad_json(e.model_copy() / "config.json").parent),
     "config.json is not valid JSON"),
    ("model-config-unknown-type", lambda e: _compress(_config(e, model_type="nonsense")), "could not load"),
    ("model-config-wrong-shape", lambda e: _compress(_config(e, hidden_size=48)), "could not load"),
    ("model-weights-truncated", lambda e: _compress(_truncated_weights(e.model_copy())), "damaged"),
    ("model-weights-garbage", lambda e: _compress(_garbage_weights(e.model_copy())), "damaged"),
    ("model-weights-missing", lambda e: _compress(_no_weights(e.model_copy())), "no weights"),
    ("model-missing-tensor", lambda e: _compress(_model_with(e, lambda s: s.pop(f"{LLAMA_FFN}.weight"))),
     "misses 1 weight"),
    ("model-pickle-bin", lambda e: _compress(_pickle_model(e)), "pickle"),
    ("model-nan-ffn-weight", lambda e: _compress(_model_with(e, _set(f"{LLAMA_FFN}.weight", float("nan")))),
     "NaN or Inf"),
    ("model-inf-norm-weight", lambda e: _compress(_model_with(e, _set("model.norm.weight", float("inf")))),
     "NaN or Inf"),
    ("model-nan-embedding", lambda e: _compress(_model_with(e, _set("model.embed_tokens.weight", float("nan")))),
     "NaN or Inf"),
    ("model-without-tokenizer", lambda e: _compress(_no_tokenizer(e.model_copy())), "tokenizer"),
    # --- calibration
    ("calib-text-missing", lambda e: _compress(e.model, "--calib-text", e.tmp / "nope.txt"), "does not exist"),
    ("calib-text-folder", lambda e: _compress(e.model, "--calib-text", e.tmp), "is a folder"),
    ("calib-text-empty", lambda e: _compress(e.model, "--calib-text", e.write("t.txt", " \n")), "is empty"),
    ("calib-text-not-utf8", lambda e: _compress(e.model, "--calib-text", e.write("t.txt", b"\xff\xfe\x00bad")),
     "not UTF-8"),
    ("calib-text-too-short", lambda e: _compress(e.model, "--calib-text", e.write("t.txt", "three short words")),
     "fewer than one sample"),
    ("calib-too-few-tokens", lambda e: ["compress", e.model, *FAST, "--calib-samples", "1", "--calib-seq-len", "8"],
     "too few"),
    ("calib-seq-len-over-positions", lambda e: ["compress", e.model, *FAST, "--calib-seq-len", "1024"],
     "256 positions"),
    ("calib-samples-zero", lambda e: ["compress", e.model, *FAST, "--calib-samples", "0"], "calib_samples"),
    ("eval-tokens-beyond-text", lambda e: ["compress", e.model, *FAST, "--eval-tokens", "100000000"], "only"),
    # --- compress settings
    ("bits-5", lambda e: _compress(e.model, "--bits", "5"), "bits=5 is not supported"),
    ("group-size-100", lambda e: _compress(e.model, "--group-size", "100"), "power of two"),
    ("n-3", lambda e: _compress(e.model, "--n", "3"), "n=3 must divide"),
    ("method-awq", lambda e: _compress(e.model, "--method", "awq"), "method='awq'"),
    ("bases-9", lambda e: _compress(e.model, "--bases", "9"), "number of bases 9"),
    ("keep-mlp", lambda e: _compress(e.model, "--keep", "mlp"), "--keep mlp"),
    ("embed-bits-word", lambda e: _compress(e.model, "--embed-bits", "four"), "--embed-bits"),
    ("scope-all", lambda e: _compress(e.model, "--scope", "all"), "scope='all'"),
    ("eval-tokens-negative", lambda e: _compress(e.model, "--eval-tokens", "-1"), "--eval-tokens"),
    ("rest-dtype-int8", lambda e: _compress(e.model, "--rest-dtype", "int8"), "rest_dtype"),
    ("init-unknown", lambda e: _compress(e.model, "--init", "magic"), "init"),
    ("fourier-with-n4", lambda e: _compress(e.model, "--method", "fourier", "--n", "4"), "drop --n"),
    ("fourier-fraction-2", lambda e: _compress(e.model, "--method", "fourier", "--n", "1", "--fourier-fraction", "2"),
     "fraction"),
    ("qat-without-training", lambda e: _compress(e.model, "--qat"), "--qat trains"),
    ("train-tokens-zero", lambda e: ["compress", e.model, "--train-tokens", "0"], "--train-tokens=0"),
    ("two-budgets", lambda e: ["compress", e.model, "--train-tokens", "2048", "--train-minutes", "1"], "two budgets"),
    # --- the output
    ("out-is-input", lambda e: _compress(e.model, "--out", e.model, "--overwrite"), "is (or holds) the input"),
    ("out-holds-input", lambda e: _compress(e.model, "--out", e.model.parent, "--overwrite"), "is (or holds) the input"),
    ("out-is-calib-text", lambda e: _compress(e.model, "--calib-text", e.write("t.txt", "text " * 500), "--out",
                                              e.tmp / "t.txt", "--overwrite"), "is (or holds) the input"),
    ("out-users-folder", lambda e: _compress(e.model, "--out", e.write("mine/notes.txt", "keep").parent,
                                             "--overwrite"), "not written by hyperquant"),
    ("out-is-a-file", lambda e: _compress(e.model, "--out", e.write("file.txt", "keep"), "--overwrite"),
     "is not a folder"),
    ("out-exists", lambda e: _compress(e.model, "--out", e.write("done/.hyperquant-output", "{}").parent),
     "--overwrite"),
    ("out-under-a-file", lambda e: _compress(e.model, "--out", e.write("file.txt", "keep") / "sub"), "is a file"),
    ("out-no-free-space", lambda e: _compress(e.model, "--out", e.out()), "free"),
    # --- training options
    ("train-config-missing", lambda e: ["compress", e.model, "--train-config", e.tmp / "nope.yaml"], "does not exist"),
    *[(f"train-config-{name}", _with_train_yaml(text), message) for name, text, message in [
        ("bad-yaml", "lr: [1,\n", "not valid YAML"),
        ("not-mapping", "- 1\n- 2\n", "mapping"),
        ("wrong-type", 'lr: "fast"\n', "lr='fast' must be a number"),
        ("bool-for-int", "seq_len: yes\n", "seq_len=True must be an integer"),
        ("unknown-key", "learning_rate: 1\n", "unknown training option"),
        ("bad-value", "seq_len: 0\n", "seq_len must be"),
        ("seq-len-over-positions", "seq_len: 1024\n", "256 positions"),
    ]],
    ("resume-another-model", lambda e: (_train_work(e, _foreign_checkpoint()),
                                        ["compress", e.model, "--out", e.out(), "--train-config", e.write(T, SMALL_TRAIN)])[1],
     "started with another model"),
    ("resume-pickle", lambda e: (_train_work(e, {"state.pt": b"\x80\x04K\x01."}),
                                 ["compress", e.model, "--out", e.out(), "--train-config", e.write(T, SMALL_TRAIN)])[1],
     "never loaded"),
    ("resume-damaged", lambda e: (_train_work(e, {"state.json": "{", "state.safetensors": b"x"}),
                                  ["compress", e.model, "--out", e.out(), "--train-config", e.write(T, SMALL_TRAIN)])[1],
     "damaged"),
    # --- a checkpoint to evaluate, inspect or export
    ("ckpt-nan-scale", lambda e: ["eval", _ckpt_with(e, _set(f"{LLAMA_FFN}.scales", float("nan"))), "--no-latency"],
     "NaN or Inf"),
    ("ckpt-inf-norm", lambda e: ["eval", _ckpt_with(e, _set("model.norm.weight", float("inf"))), "--no-latency"],
     "NaN or Inf"),
    ("ckpt-missing-tensor", lambda e: ["eval", _ckpt_with(e, lambda s: s.pop(f"{LLAMA_FFN}.scales")), "--no-latency"],
     "do not match"),
    ("ckpt-weights-truncated", lambda e: ["eval", _truncated_weights(e.ckpt_copy()), "--no-latency"], "damaged"),
    ("ckpt-weights-garbage", lambda e: ["export", _garbage_weights(e.ckpt_copy()), "--out", e.out()], "damaged"),
    ("ckpt-weights-missing", lambda e: ["eval", _no_weights(e.ckpt_copy()), "--no-latency"], "no model.safetensors"),
    ("ckpt-config-bad-json", lambda e: ["info", _bad_json(e.ckpt_copy() / "config.json").parent],
     "config.json is not valid JSON"),
    ("ckpt-wrong-bits", lambda e: ["eval", _layer_spec(e, LLAMA_FFN, lambda s: s.update(bits=3)), "--no-latency"],
     "does not match its config.json"),
    ("ckpt-wrong-shape", lambda e: ["eval", _layer_spec(e, LLAMA_FFN, lambda s: s.update(out_features=48)),
                                    "--no-latency"], "damaged"),
    ("ckpt-spec-missing-key", lambda e: ["eval", _layer_spec(e, LLAMA_FFN, lambda s: s.pop("group_size")),
                                         "--no-latency"], "damaged"),
    ("ckpt-spec-bad-value", lambda e: ["eval", _layer_spec(e, LLAMA_FFN, lambda s: s.update(n="two")),
                                       "--no-latency"], "damaged"),
    ("ckpt-unknown-kind", lambda e: ["info", _layer_spec(e, LLAMA_FFN, lambda s: s.update(kind="magic"))], "magic"),
    ("ckpt-format-99", lambda e: ["info", _section(e, lambda h: h.update(format_version=99))], "format 99"),
    ("ckpt-layers-not-mapping", lambda e: ["eval", _section(e, lambda h: h.update(layers=[])), "--no-latency"],
     "damaged"),
    ("ckpt-without-section", lambda e: ["eval", _section(e, None), "--no-latency"], "misses"),
    ("info-plain-model", lambda e: ["info", e.model], "not a hyperquant checkpoint"),
    # --- eval options
    ("eval-missing", lambda e: ["eval", e.tmp / "nope"], "does not exist"),
    ("eval-context-zero", lambda e: ["eval", e.ckpt, "--context", "0", "--no-latency"], "--context"),
    ("eval-stride-zero", lambda e: ["eval", e.ckpt, "--stride", "0", "--no-latency"], "--stride"),
    ("eval-stride-over-context", lambda e: ["eval", e.ckpt, "--stride", "600", "--no-latency"], "--stride"),
    ("eval-device-unknown", lambda e: ["eval", e.ckpt, "--device", "tpu", "--no-latency"], "choose auto, cpu, cuda"),
    # cuda:99: absent here (no CUDA) and on a GPU machine alike
    ("eval-device-absent", lambda e: ["eval", e.ckpt, "--device", "cuda:99", "--no-latency"], "CUDA device"),
    ("train-device-absent", lambda e: ["train", e.model, "--device", "cuda:99", "--output-dir", e.out()], "CUDA device"),
    ("compress-device-absent", lambda e: _compress(e.model, "--device", "cuda:99", "--out", e.out()), "CUDA device"),
    ("compress-device-unknown", lambda e: _compress(e.model, "--device", "gpu0", "--out", e.out()), "choose auto, cpu"),
    ("eval-context-over-positions", lambda e: ["eval", e.ckpt, "--context", "1024", "--stride", "1024",
                                               "--no-latency"], "256 positions"),
    ("eval-text-folder", lambda e: ["eval", e.ckpt, "--text", e.tmp, "--no-latency"], "is a folder"),
    ("eval-text-not-utf8", lambda e: ["eval", e.ckpt, "--text", e.write("t.txt", b"\xff\xfe"), "--no-latency"],
     "not UTF-8"),
    ("eval-text-one-token", lambda e: ["eval", e.ckpt, "--text", e.write("t.txt", "the"), "--no-latency"],
     "fewer than 2 tokens"),
    ("eval-tokens-one", lambda e: ["eval", e.ckpt, "--eval-tokens", "1", "--no-latency"], "--eval-tokens"),
    # --- export
    ("export-plain-model", lambda e: ["export", e.model, "--out", e.out()], "not a hyperquant checkpoint"),
    ("export-exists", lambda e: ["export", e.ckpt, "--out", e.write("m.onnx", "keep")], "exists"),
    ("export-into-checkpoint", lambda e: ["export", e.ckpt, "--out", e.ckpt, "--overwrite"], "is (or holds) the input"),
    ("export-accuracy-level-7", lambda e: ["export", e.ckpt, "--out", e.out(), "--accuracy-level", "7"],
     "accuracy"),
    ("export-opset-12", lambda e: ["export", e.ckpt, "--out", e.tmp / "m.onnx", "--opset", "12"], "opset"),
    ("export-nan-checkpoint", lambda e: ["export", _ckpt_with(e, _set(f"{LLAMA_FFN}.scales", float("nan"))),
                                         "--out", e.out()], "NaN or Inf"),
    # --- report
    ("report-missing-checkpoint", lambda e: ["report", e.model, "--config", e.write("s.yaml", _sweep(
        "  - checkpoint: " + str(e.tmp / "nope"))), "--out", e.out(), "--no-latency"], "does not exist"),
    ("report-bad-yaml", lambda e: ["report", e.model, "--config", e.write("s.yaml", "points: [\n"), "--out", e.out()],
     "not valid YAML"),
    ("report-unknown-point-key", lambda e: ["report", e.model, "--config", e.write("s.yaml", _sweep(
        "  - compres: {n: 1}")), "--out", e.out()], "compres"),
    ("report-bits-word", lambda e: ["report", e.model, "--bits", "four", "--out", e.out()], "--bits"),
    ("report-out-a-file", lambda e: ["report", e.model, "--out", e.write("file.txt", "keep"), "--overwrite"],
     "is not a folder"),
    ("report-flags-with-config", lambda e: ["report", e.model, "--config", e.write("s.yaml", _sweep(
        "  - original: true")), "--bits", "4", "--out", e.out()], "with a YAML"),
    # --- train
    ("train-output-dir-is-a-file", lambda e: ["train", e.model, "--config", e.write(T, SMALL_TRAIN), "--output-dir",
                                              e.write("file.txt", "keep")], "is a file"),
    ("train-missing-model", lambda e: ["train", e.tmp / "nope", "--config", e.write(T, SMALL_TRAIN)], "does not exist"),
]


def _sweep(point: str) -> str:
    return "points:\n" + point + "\n"


def _bad_json(path: Path) -> Path:
    path.write_text(path.read_text()[:-20])
    return path


def _config(env: Env, **changes) -> Path:
    model = env.model_copy()
    _edit_json(model / "config.json", lambda c: c.update(changes))
    return model


def _truncated_weights(folder: Path) -> Path:
    _truncate(_weights(folder))
    return folder


def _garbage_weights(folder: Path) -> Path:
    size = _weights(folder).stat().st_size
    _weights(folder).write_bytes(os.urandom(64) + b"\x00" * (size - 64))
    return folder


def _no_weights(folder: Path) -> Path:
    _weights(folder).unlink()
    return folder


def _no_tokenizer(folder: Path) -> Path:
    for path in folder.iterdir():
        if "token" in path.name or path.name in ("vocab.txt", "special_tokens_map.json"):
            path.unlink()
    return folder


def _pickle_model(env: Env) -> Path:
    folder = env.model_copy()
    torch.save(load_file(str(_weights(folder))), folder / "pytorch_model.bin")
    _weights(folder).unlink()
    return folder


def _truncated_gguf(env: Env) -> Path:
    from hyperquant.models import default_model_source

    source = default_model_source()
    with open(source.folder / source.gguf_file, "rb") as f:
        head = f.read(1 << 20)
    return env.write("truncated.gguf", head)


def _ckpt_with(env: Env, edit: Callable[[dict], None]) -> Path:
    ckpt = env.ckpt_copy()
    _edit_tensors(_weights(ckpt), edit)
    return ckpt


def _section(env: Env, edit: Callable[[dict], None] | None) -> Path:
    ckpt = env.ckpt_copy()

    def change(config):
        if edit is None:
            del config["hyperquant"]
        else:
            edit(config["hyperquant"])

    _edit_json(ckpt / "config.json", change)
    return ckpt


def _fingerprint(*folders: Path) -> dict:
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                files[str(path)] = "dir"
    return files


def test_the_table_is_large_and_distinct():
    ids = [fault_id for fault_id, _, _ in FAULTS]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("fault_id,setup,message", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(fault_id, setup, message, tiny_model_dir, good_checkpoint, tmp_path, monkeypatch):
    env = Env(tmp_path, tiny_model_dir, good_checkpoint)
    argv = [str(a) for a in setup(env)]
    if fault_id == "out-no-free-space":
        import shutil as shutil_module

        monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 1000))
    if argv[0] == "compress" and "--out" not in argv:
        argv += ["--out", str(env.out())]
    before = _fingerprint(tmp_path, tiny_model_dir, good_checkpoint)
    result = CliRunner().invoke(app, argv)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert sum(line.startswith("error") for line in lines) == 1, result.output
    assert _fingerprint(tmp_path, tiny_model_dir, good_checkpoint) == before  # nothing written, nothing lost
