"""The tradeoff sweep: point specs, ids and the cache, and a real sweep of a tiny model end to end."""

import json

import pytest
from typer.testing import CliRunner

import hyperquant
from hyperquant.cli import app
from hyperquant.config import ConfigError
from hyperquant.tradeoff import sweep as sweep_module
from hyperquant.tradeoff.spec import PointSpec, SweepConfig, default_sweep
from hyperquant.tradeoff.sweep import run_sweep, weight_files

FAST = {"eval_tokens": 256, "eval_context": 64, "calib_samples": 4, "calib_seq_len": 32, "prompt_tokens": 8,
        "decode_tokens": 4, "latency_rounds": 1, "latency_threads": 1, "accuracy_level": 0}


def test_point_specs_are_validated():
    cases = [({}, "exactly one of"),
             ({"original": True, "baseline": "bnb-nf4"}, "exactly one of"),
             ({"baseline": "awq"}, "not a baseline"),
             ({"compress": {"n": 2, "num_bases": 5, "method": "rtn", "bits": 4}}, "number of bases 5"),
             ({"compress": {"n": 1, "method": "rtn", "bits": 5}}, "bits=5"),
             ({"compress": {"layers": {".*": {"kind": "fourier", "fraction": 1.5}}}}, "fraction=1.5"),
             ({"compress": {"layers": {".*": {"kind": "awq"}}}}, "unknown layer kind"),
             ({"compress": {"nn": 2}}, "unknown compress option")]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            PointSpec(**fields)
    with pytest.raises(ConfigError, match="unknown point field"):
        SweepConfig(points=[{"original": True, "bitz": 4}])
    with pytest.raises(ConfigError, match="share the label"):
        SweepConfig(points=[{"original": True}, {"compress": {"n": 1, "method": "rtn", "bits": 4},
                                                 "label": "dense fp32 (original)"}])
    with pytest.raises(ConfigError, match="no points"):
        SweepConfig()
    with pytest.raises(ConfigError, match="grid key"):
        SweepConfig(grid={"colour": ["red"]})


def test_grid_expansion_and_ids():
    cfg = SweepConfig(points=[{"compress": {"n": 2, "num_bases": 2, "method": "gptq", "bits": 4}}],
                      grid={"n": [2, 4], "num_bases": [2], "method": ["gptq"], "bits": [4]})
    specs = cfg.expanded()
    assert [(s.compress.n, s.compress.num_bases) for s in specs] == [(2, 2), (4, 2)]  # the grid's copy is dropped
    a, b = specs
    assert cfg.point_id(a, "m") != cfg.point_id(b, "m")
    relabeled = PointSpec(**{**a.__dict__, "label": "mine"})
    assert cfg.point_id(relabeled, "m") == cfg.point_id(a, "m")  # the label is not part of the measurement
    assert cfg.point_id(a, "other model") != cfg.point_id(a, "m")
    other = SweepConfig(points=cfg.points, eval_tokens=cfg.eval_tokens * 2)
    assert other.point_id(a, "m") != cfg.point_id(a, "m")
    assert SweepConfig.from_dict(cfg.to_dict()).expanded() == specs  # the YAML/JSON round trip
    default = default_sweep([4], [2, 4], [2, 5], baselines=False)
    shapes = [(p.method, p.compress.n, p.compress.num_bases, p.compress.method) for p in default.expanded()
              if p.method == "phm"]
    assert ("phm", 2, 5, "gptq") not in shapes and ("phm", 4, 5, "gptq") in shapes  # B <= n^2 only
    fractions = sorted(p.main_entry().fraction for p in default.expanded() if p.method == "fourier")
    assert fractions == [2 / 16, 5 / 16, 2 / 4]


@pytest.fixture(scope="module")
def tiny_sweep(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    trained = root / "external-ckpt"
    from hyperquant.data import calibration_ids
    from hyperquant.models import load_model, resolve_source

    model, tok = load_model(resolve_source(str(tiny_model_dir)))

    hyperquant.compress(model, hyperquant.CompressConfig(bits=4, n=2, method="rtn", group_size=16),
                        calibration_ids(tok, 4, 32), progress=False)
    hyperquant.save_compressed(model, trained, tok)
    points = [{"original": True},
              {"compress": {"n": 1, "method": "rtn", "bits": 4, "group_size": 16}},
              {"compress": {"n": 2, "num_bases": 2, "bits": None}},
              {"compress": {"n": 2, "num_bases": 2, "method": "gptq", "bits": 4, "group_size": 16}},
              {"compress": {"layers": {".*": {"kind": "fourier", "fraction": 0.5, "bits": 4, "group_size": 16}}}},
              {"checkpoint": str(trained), "label": "external"}]
    cfg = SweepConfig(model=str(tiny_model_dir), points=points, keep_checkpoints=True, **FAST)
    result = run_sweep(cfg, root / "report", root / "cache", progress=False)
    return cfg, root, result


def test_sweep_measures_every_point(tiny_sweep):
    _cfg, root, result = tiny_sweep
    points = {p["label"]: p for p in result["points"]}
    assert all(p["status"] == "ok" for p in points.values()), [p.get("error") for p in points.values()]
    assert len(result["computed"]) == 6
    for p in points.values():
        folder = (root / "cache" / "points" / p["id"] / "checkpoint") if p["method"] != "checkpoint" \
            else root / "external-ckpt"
        files = weight_files(folder)
        # bytes on disk are exactly the weight files' sizes
        assert p["metrics"]["bytes_on_disk"] == sum(f.stat().st_size for f in files) > 0
        assert p["metrics"]["perplexity"] > 1
    fp32 = points["dense fp32 (original)"]["metrics"]
    assert fp32["ffn_bits_per_weight"] == pytest.approx(32)
    assert fp32["bits_per_weight"] == pytest.approx(32, rel=0.01)  # + the safetensors header
    phm4 = points["PHM n=2 B=2 GPTQ-4 g16"]["metrics"]
    assert phm4["bytes_on_disk"] < points["dense RTN-4 g16"]["metrics"]["bytes_on_disk"] < fp32["bytes_on_disk"]
    assert phm4["ffn_bits_per_weight"] < 4  # half the factors at 4 bits plus scales and zero points
    # n=2, B=2 saves memory, not compute: the same matmul MACs plus the small input mixing
    assert fp32["macs_per_token"] < phm4["macs_per_token"] < 1.01 * fp32["macs_per_token"]
    # latency for what exports (not Fourier), and per-layer errors for what hyperquant compressed
    assert points["PHM n=2 B=2 GPTQ-4 g16"]["metrics"]["decode_ms"] > 0
    assert points["dense fp32 (original)"]["metrics"]["decode_ms"] > 0
    assert points["Fourier low-rank 0.5 + PolarQuant-4"]["metrics"]["decode_ms"] is None
    assert "Fourier" in points["Fourier low-rank 0.5 + PolarQuant-4"]["no_latency_reason"]
    layers = points["PHM n=2 B=2 GPTQ-4 g16"]["layers"]  # the whole model: 6 FFN, 8 attention, head, table
    assert len(layers) == 16 and sum(".mlp." in layer["name"] for layer in layers) == 6
    for name in ("report.md", "report.html", "points.json", "frontier_bytes.png", "frontier_latency.png",
                 "layer_errors.png"):
        assert (root / "report" / name).is_file(), name
    saved = json.loads((root / "report" / "points.json").read_text())
    assert {p["id"] for p in saved["points"]} == {p["id"] for p in result["points"]}


def test_cached_points_are_not_recomputed(tiny_sweep, monkeypatch):
    cfg, root, first = tiny_sweep

    def never(*args, **kwargs):
        raise AssertionError("a cached point was measured again")

    monkeypatch.setattr(sweep_module, "measure_point", never)
    with pytest.raises(Exception, match="already exists"):
        run_sweep(cfg, root / "report", root / "cache", progress=False)
    again = run_sweep(cfg, root / "report", root / "cache", overwrite=True, progress=False)
    assert again["computed"] == []
    assert [p["metrics"]["perplexity"] for p in again["points"]] == \
        [p["metrics"]["perplexity"] for p in first["points"]]
    # a new point is measured; the others still come from the cache
    new_point = PointSpec(compress={"n": 1, "method": "rtn", "bits": 8, "group_size": 16})
    extra = SweepConfig.from_dict({**cfg.to_dict(), "points": [*cfg.points, new_point]})
    monkeypatch.undo()
    third = run_sweep(extra, root / "report2", root / "cache", progress=False)
    assert len(third["computed"]) == 1 and len(third["points"]) == 7


def test_failed_point_is_reported_not_fatal(tiny_model_dir, tmp_path, monkeypatch):
    def broken(spec, ctx, point_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(sweep_module, "measure_point", broken)
    cfg = SweepConfig(model=str(tiny_model_dir), points=[{"original": True}], latency=False, **FAST)
    result = run_sweep(cfg, tmp_path / "r", tmp_path / "c", progress=False)
    assert result["points"][0]["status"] == "failed" and "boom" in result["points"][0]["error"]
    assert (tmp_path / "r" / "report.md").is_file()
    monkeypatch.undo()
    again = run_sweep(cfg, tmp_path / "r", tmp_path / "c", overwrite=True, progress=False)
    assert again["points"][0]["status"] == "ok"  # failures are not cached


def test_a_failed_export_keeps_the_point(tiny_model_dir, tmp_path, monkeypatch):
    from hyperquant.errors import HyperquantError

    def refuse(*args, **kwargs):
        raise HyperquantError("ONNX export does not match torch")

    monkeypatch.setattr(sweep_module, "_export_onnx", refuse)
    cfg = SweepConfig(model=str(tiny_model_dir), points=[{"compress": {"n": 1, "method": "rtn", "bits": 2,
                                                                       "group_size": 16}}], **FAST)
    point = run_sweep(cfg, tmp_path / "r", tmp_path / "c", progress=False)["points"][0]
    assert point["status"] == "ok" and point["metrics"]["perplexity"] > 1
    assert point["metrics"]["decode_ms"] is None and "does not match torch" in point["no_latency_reason"]


def test_report_cli_errors(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("points:\n  - {compress: {n: 1, bits: 5}}\n")
    result = CliRunner().invoke(app, ["report", "--config", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "bits=5" in result.output.strip().splitlines()[-1]
    result = CliRunner().invoke(app, ["report", "--n", "two", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
    result = CliRunner().invoke(app, ["report", "--config", str(bad), "--bits", "4", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "put the points in it" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_report_cli_runs_a_yaml_sweep(tiny_model_dir, tmp_path):
    (tmp_path / "notes.md").write_text("PHM loses here; see the table.\n")
    (tmp_path / "sweep.yaml").write_text(
        "notes: notes.md\neval_tokens: 256\neval_context: 64\ncalib_samples: 4\ncalib_seq_len: 32\n"
        "points:\n  - {original: true}\n  - {compress: {n: 1, method: rtn, bits: 8, group_size: 16}}\n")
    args = ["report", str(tiny_model_dir), "--config", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "r"),
            "--no-latency"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 points (2 computed now" in result.output
    report = (tmp_path / "r" / "report.md").read_text()
    assert "PHM loses here" in report and "dense RTN-8 g16" in report
    saved = json.loads((tmp_path / "r" / "points.json").read_text())
    assert saved["meta"]["sweep_config"]["latency"] is False  # the flag overrides the YAML
    assert all(p["metrics"]["decode_ms"] is None for p in saved["points"])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.output
