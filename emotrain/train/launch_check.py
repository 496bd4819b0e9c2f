"""Launch mistakes found before the Accelerator is built: one line naming the setting, not a traceback
from inside Accelerate, DeepSpeed or NCCL (or, worse, a run that silently trains otherwise).

    check_launch(cfg)        # the recipe, first thing in setup, on every rank

Only what the environment `accelerate launch` (or torchrun, or the user) gives each process says
for certain is checked:
  - DeepSpeed with `ACCELERATE_USE_CPU=true`: Accelerate silently drops DeepSpeed (its processes
    then train as plain DDP, or each alone); DeepSpeed runs on a CPU by itself.
  - DeepSpeed told to use CUDA (`DS_ACCELERATOR=cuda`) on a machine without a CUDA GPU.
  - The launcher's mixed precision (`accelerate launch --mixed_precision`, a launch config's
    `mixed_precision`) set to bf16/fp16/fp8 and unlike `train.mixed_precision`: the run trains in
    the config's precision, so the launcher's would be silently ignored. A launcher's `no` is its
    default (every launch config of launch/ writes it), so it never contradicts the config.
  - More processes on a node than it has GPUs (`--num_processes` over the GPU count): NCCL fails
    with "Duplicate GPU detected" at the first collective.
  - Several CPU processes with a torch built without gloo, the one CPU backend.
What cannot be told from inside a process is not guessed at (`accelerate launch --cpu
--num_processes 2` starts one process whose environment does not say two were asked for).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from emotrain.config import Config, ConfigError


class LaunchError(ConfigError):
    """The launch contradicts itself or the config; the key names the launch setting at fault."""


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_launch(cfg: Config, environ: Mapping[str, str] | None = None, *, cuda_devices: int | None = None,
                 gloo: bool | None = None) -> None:
    """Raise LaunchError for the first launch mistake found (see the module docstring). `environ`:
    the process environment; `cuda_devices`: the CUDA GPUs this process sees; `gloo`: whether torch
    has the gloo backend (both asked of torch when not given)."""
    environ = os.environ if environ is None else environ
    if cuda_devices is None or gloo is None:
        import torch

        cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
        gloo = (torch.distributed.is_available() and torch.distributed.is_gloo_available()) if gloo is None else gloo
    deepspeed = _flag(environ, "ACCELERATE_USE_DEEPSPEED")
    if deepspeed and _flag(environ, "ACCELERATE_USE_CPU"):
        raise LaunchError("ACCELERATE_USE_CPU", (
            "is true under a DeepSpeed launch config: Accelerate would then silently train without DeepSpeed. "
            "Unset it (DeepSpeed runs on the CPU by itself when there is no GPU), or launch without DeepSpeed"))
    if deepspeed and cuda_devices == 0 and environ.get("DS_ACCELERATOR", "").strip().lower() == "cuda":
        raise LaunchError("DS_ACCELERATOR", (
            "is cuda, but this machine has no CUDA GPU: unset it (DeepSpeed then picks its CPU accelerator) or "
            "set DS_ACCELERATOR=cpu"))
    _check_precision(cfg, environ)
    _check_processes(environ, cuda_devices=cuda_devices, gloo=gloo)


def _check_precision(cfg: Config, environ: Mapping[str, str]) -> None:
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if launched not in ("", "no") and launched != cfg.train.mixed_precision:
        raise LaunchError("train.mixed_precision", (
            f"is {cfg.train.mixed_precision}, but the launcher asks for {launched} (accelerate launch "
            f"--mixed_precision, or the launch config's mixed_precision; ACCELERATE_MIXED_PRECISION={launched}): "
            f"emotrain trains in train.mixed_precision. Set train.mixed_precision={launched}, or launch with "
            "--mixed_precision no"))


def _check_processes(environ: Mapping[str, str], *, cuda_devices: int, gloo: bool) -> None:
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        on_this_node = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:  # not ours to judge: torch.distributed says what is wrong with them
        return
    if world_size <= 1:
        return
    if cuda_devices == 0 and not gloo:
        raise LaunchError("accelerate launch --num_processes", (
            f"{world_size} processes without a CUDA GPU need torch.distributed's gloo backend, and this torch has "
            "none: install a torch build with gloo, or launch one process"))
    if cuda_devices > 0 and on_this_node > cuda_devices and not _flag(environ, "ACCELERATE_USE_CPU"):
        raise LaunchError("accelerate launch --num_processes", (
            f"starts {on_this_node} processes on this node, which has {cuda_devices} CUDA GPU(s) visible: one "
            f"process per GPU, so --num_processes {cuda_devices} per node (times the number of nodes), or make "
            "more GPUs visible (CUDA_VISIBLE_DEVICES)"))
