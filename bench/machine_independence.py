"""Does the README's table depend on the machine? One README training (configs/smoke.yaml, audio
variant, fold 1, 6 epochs) under the settings in which two CPUs differ, compared bit for bit.

    python bench/machine_independence.py                      # README corpus, all settings (~10 min, 2 cores)
    python bench/machine_independence.py --data runs/synthetic/prepared --settings native native-again

A CPU run differs from machine to machine through the kernels, never through the data: the batches
are a function of the seed and the corpus only (tests/unit/test_data_batching.py). What differs is
the float arithmetic: PyTorch picks its vectorised kernels by instruction set (AVX-512, AVX2, none),
MKL and oneDNN pick theirs by CPU, and the thread count splits reductions differently. Each setting
below emulates one such difference on this machine through the libraries' own switches
(ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS) and prints the
run's test UA / WA and a digest of its trained weights. `portable` pins all of them to the narrowest
choice (one thread, no vector kernels, MKL's conditional-numerical-reproducibility mode): where its
rows agree, the result no longer depends on the machine's instruction set or core count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NARROWEST = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
             "OMP_NUM_THREADS": "1"}
SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "native-again": {},  # the same machine twice: must be bit-identical
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "AVX2 cpu": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "no-vector cpu": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "portable": NARROWEST,
    "portable, AVX2 cpu": {**NARROWEST, "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "portable, 2 threads": {**NARROWEST, "OMP_NUM_THREADS": "2"},
}


def prepare_readme_corpus(work: Path) -> Path:
    """The README's corpus: `emotrain synth` and `emotrain prepare` as its first command runs them."""
    for verb in (["synth", str(work / "release")], ["prepare", str(work / "release"), str(work / "prepared")]):
        subprocess.run([sys.executable, "-m", "emotrain.cli", *verb], cwd=REPO, check=True, capture_output=True)
    return work / "prepared"


def weights_digest(best: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(best.glob("*.safetensors")) or sorted(best.glob("*.bin")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def train(data: Path, out: Path, settings: dict[str, str]) -> tuple[dict, str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           **settings}
    overrides = [f"data.path={data}", f"output_dir={out}", "experiment=smoke-audio", "model.variant=audio",
                 "data.fold=1", "logging.progress_bar=false"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emotrain.cli", "train", str(REPO / "configs/smoke.yaml"), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    test = json.loads((out / "metrics.json").read_text())["test"]
    return test, weights_digest(out / "best"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepared corpus (default: make the README's in a temporary folder)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    print("| setting | environment | test UA | test WA | weights sha256 | seconds |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    with tempfile.TemporaryDirectory(prefix="emotrain-machines-") as tmp:
        data = args.data.resolve() if args.data else prepare_readme_corpus(Path(tmp))
        for name in args.settings:
            test, digest, seconds = train(data, Path(tmp) / "runs" / name.replace(" ", "_").replace(",", ""),
                                          SETTINGS[name])
            environment = " ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) or "(as installed)"
            print(f"| {name} | {environment} | {test['ua']:.3f} | {test['wa']:.3f} | {digest} | {seconds:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
