import importlib.util
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from hyperquant.tradeoff import write_report
from hyperquant.tradeoff.render import fmt_num, fmt_ppl

REPO = Path(__file__).resolve().parents[2]
FILES = ["points", "markdown", "html", "frontier_bytes", "frontier_latency", "layer_errors"]


def _layers(scale: float, n_blocks: int = 3) -> list[dict]:
    out = []
    for b in range(n_blocks):
        for k, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
            out.append({"name": f"model.layers.{b}.mlp.{proj}", "output_error": scale * (1 + 0.3 * k + 0.2 * b)})
    return out


def _point(pid, label, family, method, mb, ffn_bits, ppl, decode=None, layers=None, status="ok", error=None,
           bits=None, no_latency=None):
    metrics = {} if status != "ok" else {
        "bytes_on_disk": int(mb * 1e6), "bits_per_weight": ffn_bits * 0.8 + 3.0, "ffn_bits_per_weight": ffn_bits,
        "params": 134_515_008, "macs_per_token": 106_000_000, "perplexity": ppl,
        "prefill_ms": None if decode is None else decode * 20, "decode_ms": decode, "compress_seconds": 42.5}
    return {"id": pid, "label": label, "family": family, "method": method, "status": status, "error": error,
            "config": {"method": method, "bits": bits}, "metrics": metrics, "layers": layers or [],
            "no_latency_reason": None if decode is not None else no_latency}


NO_ONNX = "no ONNX export for Fourier layers"


def synthetic_points() -> list[dict]:
    """What the sweep produces, in its vocabulary (families, methods), for a 135M-parameter model."""
    return [
        _point("a0", "dense fp32 (original)", "dense fp32", "original", 538.1, 32.0, 12.52, decode=9.1),
        _point("a1", "dense GPTQ-4 g128", "dense GPTQ", "dense", 160.4, 4.25, 13.91, decode=6.0,
               layers=_layers(0.02), bits=4),
        _point("a2", "dense GPTQ-3 g128", "dense GPTQ", "dense", 145.2, 3.25, 17.83, layers=_layers(0.05), bits=3,
               no_latency="latency disabled"),
        _point("a3", "dense RTN-2 g64", "dense RTN", "dense", 112.0, 2.5, 1.3e8, layers=_layers(0.9), bits=2,
               no_latency="latency disabled"),
        _point("b3", "dense GPTQ-2 g64", "dense GPTQ", "dense", 118.0, 2.5, 35.0, layers=_layers(0.1), bits=2,
               no_latency="latency disabled"),
        _point("a4", "PHM n=2 B=2 GPTQ-4 g128", "PHM GPTQ", "phm", 120.3, 2.1, 21.3, decode=5.5,
               layers=_layers(0.06), bits=4),
        _point("a5", "PHM n=4 B=2 GPTQ-4 g128", "PHM GPTQ", "phm", 100.7, 1.1, 48.0, layers=_layers(0.12), bits=4,
               no_latency="latency disabled"),
        _point("a6", "Fourier low-rank 0.1 + PolarQuant-4", "Fourier + PolarQuant", "fourier", 110.0, 1.6, 80.2,
               layers=_layers(0.2), bits=4, no_latency=NO_ONNX),
        _point("a7", "bitsandbytes NF4", "bitsandbytes NF4", "bnb-nf4", 165.9, 4.5, 14.2),
        _point("a8", "PHM n=8 B=4 GPTQ-2", "PHM GPTQ", "phm", 0, 0, 0, status="failed",
               error="RuntimeError: factor rank 0 | cannot factorize"),
        _point("a9", "GPTQModel GPTQ-4 g128", "GPTQModel", "gptqmodel", 0, 0, 0, status="skipped",
               error="gptqmodel not installed"),
    ]


META = {"model": "HuggingFaceTB/SmolLM2-135M", "command": "hyperquant report --model smollm2 --out rep",
        "protocol": {"dataset": "wikitext-2-raw-v1 test", "seq_len": 512, "windows": 40},
        "created": "2026-05-09T07:35:25+00:00", "machine": "2 CPU cores, onnxruntime 1.22",
        "notes_md": "The **PHM** points trade size for accuracy.\n\n- one\n- two with `code`"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(synthetic_points(), out, META)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_formatting():
    assert fmt_ppl(12.523) == "12.52"
    assert fmt_ppl(12.0) == "12.00"
    assert fmt_ppl(1234.4) == "1234"
    assert fmt_ppl(1.3e8) == "1.300e8"
    assert fmt_ppl(None) == "–" and fmt_ppl(float("inf")) == "∞"
    assert fmt_num(538.1) == "538" and fmt_num(0.0512) == "0.0512" and fmt_num(1.5) == "1.50"


def test_all_files_written(report):
    assert sorted(report) == sorted(FILES)
    for path in report.values():
        assert path.is_file() and path.stat().st_size > 0
    data = json.loads(report["points"].read_text())
    assert data["meta"]["model"] == META["model"]
    assert [p["id"] for p in data["points"]] == [p["id"] for p in synthetic_points()]
    assert data["frontier_bytes"] == ["a5", "b3", "a4", "a2", "a1", "a0"]


@pytest.mark.parametrize("name", ["frontier_bytes", "frontier_latency", "layer_errors"])
def test_pngs_are_reasonable_images(report, name):
    width, height = _png_size(report[name])
    assert 600 <= width <= 3000 and 300 <= height <= 2000
    assert report[name].stat().st_size > 10_000


def test_html_self_contained_and_complete(report):
    text = report["html"].read_text()
    assert 'src="http' not in text and "<link" not in text and "<script" not in text
    assert re.findall(r'src="([^"]+)"', text) and all(s.startswith("data:image/png;base64,")
                                                      for s in re.findall(r'src="([^"]+)"', text))
    for p in synthetic_points():
        assert p["label"] in text
    assert text.count('<tr class="hl">') == 6  # the six frontier rows
    assert "✓" in text
    assert "<strong>PHM</strong> points trade" in text  # notes_md rendered
    assert "1.300e8" in text


def test_markdown_table_and_sections(report):
    md = report["markdown"].read_text()
    n_ok = sum(p["status"] == "ok" for p in synthetic_points())
    table = md.split("## All points")[1].split("## Failed")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| frontier")]
    assert len(rows) == n_ok
    assert sum("✓" in r for r in rows) == 6
    mbs = [float(r.split(" | ")[3]) for r in rows]
    assert mbs == sorted(mbs)
    for section in ("## Reading the result", "### Notes", "## Figures", "## Failed or skipped points (2)"):
        assert section in md
    assert "(frontier_bytes.png)" in md and "(layer_errors.png)" in md
    assert "factor rank 0" in md and "gptqmodel not installed" in md
    assert "hyperquant report --model smollm2" in md


def test_no_latency_and_no_layers(tmp_path):
    points = [p for p in synthetic_points() if p["status"] == "ok"]
    for p in points:
        p["metrics"]["decode_ms"] = None
        p["layers"] = []
    paths = write_report(points, tmp_path, {"model": "m"})
    assert _png_size(paths["frontier_latency"])[0] > 600
    assert "No point has an ONNX Runtime decode latency" in paths["markdown"].read_text()


def test_degenerate_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    paths = write_report([], tmp_path / "empty", {})
    assert all(p.is_file() for p in paths.values())
    one = [synthetic_points()[4]]
    one[0]["metrics"]["perplexity"] = float("nan")
    (tmp_path / "one").mkdir()
    paths = write_report(one, tmp_path / "one", {"model": "m"})
    assert json.loads(paths["points"].read_text())["points"][0]["metrics"]["perplexity"] is None


def test_single_point_and_infinite_perplexity(tmp_path):
    points = [synthetic_points()[5], synthetic_points()[6]]
    points[1]["metrics"]["perplexity"] = float("inf")
    paths = write_report(points, tmp_path, {"model": "m"})
    md = paths["markdown"].read_text()
    assert "| ∞ |" in md and md.count("| ✓ |") == 1
    assert json.loads(paths["points"].read_text())["frontier_bytes"] == [points[0]["id"]]


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", REPO / "scripts" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_html_renders_in_headless_chromium(report, tmp_path):
    module = _screenshot_module()
    if module.find_chromium() is None:
        pytest.skip("no chromium binary on PATH (chromium, chromium-browser, google-chrome); "
                    "install Debian's chromium: apt-get install -y chromium")
    png = module.screenshot(report["html"], tmp_path / "shot.png")
    assert png.stat().st_size > 20_000
    assert _png_size(png) == (1400, 2400)
    try:
        from PIL import Image
    except ImportError:
        assert len(set(png.read_bytes()[100:5000])) > 50
        return
    with Image.open(png) as im:
        colours = im.convert("RGB").resize((140, 240)).getcolors(maxcolors=1_000_000)
    assert len(colours) > 50


def test_screenshot_script_cli_fails_cleanly_without_html(tmp_path):
    import subprocess
    import sys

    if shutil.which("chromium") is None and _screenshot_module().find_chromium() is None:
        pytest.skip("no chromium binary")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_report.py"),
                             str(tmp_path / "missing.html"), str(tmp_path / "x.png")],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "missing.html" in result.stderr


def test_notes_and_labels_cannot_inject_markup(tmp_path):
    """The HTML writer (markdown-it, raw HTML off) renders person-written notes and user labels as text."""
    points = synthetic_points()
    points[0]["label"] = "<img src=x onerror=alert(1)> *star*"
    notes = ("# Heading\n\n<script>alert(1)</script>\n\n[click](javascript:alert(1)) and "
             "[docs](https://example.org)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    paths = write_report(points, tmp_path, {**META, "notes_md": notes})
    text = paths["html"].read_text()
    assert "<script" not in text and "href=\"javascript" not in text and "<img src=x" not in text
    assert "&lt;script&gt;" in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<h2>Heading</h2>" in text  # the notes' headings sit one level below the report's
    assert '<a href="https://example.org">docs</a>' in text and "<td>2</td>" in text
