#!/usr/bin/env bash
# The prepared GPU run, on one H200 with no network, from the repository root:
#
#   bash bench/gpu.sh                     # ~5 minutes; tables in $OUT (or bench/out)
#
# Installs what the machine lacks from wheels carried beside the tree (.whl/, filled here by
# bench/gpu_wheels.sh; the bench itself needs none of them), then measures the paper's configuration
# at paper size in bf16 (bench/gpu_bench.py): matmul peak, utterances/s, audio s/s, TFLOP/s and its
# share of the peak, peak memory, with and without checkpointing, bucketed vs fixed vs the Trainer's
# grouped batches, the HF Trainer itself, and a profiler table of one step. Checked on a CPU with
# `python bench/gpu_bench.py --tiny --device cpu --steps 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -d .whl/site ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.whl/site"; fi  # the toy corpus's tokenizer
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
timeout "${GPU_BENCH_SECONDS:-480}" python3 bench/gpu_bench.py --steps "${GPU_BENCH_STEPS:-15}" --out "$out/gpu_results.md" \
  2>&1 | tee "$out/gpu_log.txt"
