"""What a checkpoint's manifest costs: Accelerate's save against hashing the files, and the check at resume.

    python bench/checkpoint_io.py --params 205e6 --repeats 2

A model of `--params` float32 parameters (Linear layers; 205M is wav2vec2-base + bert-base, the
paper config) with AdamW state after one step is saved by `accelerator.save_state` into a fresh
folder, as `TrainingState.save` does; then `write_manifest` hashes every file (what each save now
adds) and `checkpoint_problem` verifies it (what a resume adds: sizes, then every hash). The
folder is on the same disk as the runs (`--dir`); the page cache holds what was just written, as
it does at a real save.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_of(params: float):
    import torch
    from torch import nn

    width = 4096
    layers = max(1, round(params / (width * width)))
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # AdamW's two moments exist: the checkpoint is the size of a real one
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=205e6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    from accelerate import Accelerator

    from emotrain.train.checkpoint import checkpoint_problem, write_manifest

    model, optimizer = model_of(args.params)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    n_params = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="ckpt-io-", dir=args.dir))
    print(f"{n_params / 1e6:.0f}M parameters, float32, AdamW; folder {root}")
    print(f"{'repeat':>6} {'size MB':>8} {'save_state s':>13} {'manifest s':>11} {'of save':>8} {'verify s':>9}")
    try:
        for repeat in range(args.repeats):
            folder = root / f"step-{repeat:06d}"
            folder.mkdir()
            began = time.perf_counter()
            accelerator.save_state(str(folder))
            saved = time.perf_counter()
            write_manifest(folder)
            hashed = time.perf_counter()
            problem = checkpoint_problem(folder)
            verified = time.perf_counter()
            assert problem is None, problem
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
            save_s, manifest_s = saved - began, hashed - saved
            print(f"{repeat:>6} {size:>8.0f} {save_s:>13.2f} {manifest_s:>11.2f} {manifest_s / save_s:>8.0%} "
                  f"{verified - hashed:>9.2f}")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
