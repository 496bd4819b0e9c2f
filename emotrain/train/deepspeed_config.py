"""Fill the DeepSpeed JSON's "auto" values from the experiment config.

Accelerate resolves most "auto" entries itself, but it takes the micro-batch size from prepared
dataloaders, and the training stream is deliberately not prepared (it is sharded already). So the
values that come from the experiment are written into the plugin's config before `prepare`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

from emotrain.config import Config, ConfigError


def name_deepspeed_accelerator(*, cuda: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    """Without CUDA, tell DeepSpeed its accelerator is the CPU (`DS_ACCELERATOR=cpu`, unless already
    set) before it is first imported (by Accelerate, even in a run that does not use it): its own
    detection falls back to the CPU anyway, but says so in a warning on every console ("Setting
    accelerator to CPU. If you have GPU ..."), which on a machine without a GPU says nothing."""
    if not cuda:
        environ.setdefault("DS_ACCELERATOR", "cpu")


def training_precision(requested: str, *, cuda: bool) -> str:
    """The mixed precision a run trains in: `train.mixed_precision`, except fp16 without a CUDA GPU.

    One rule for every strategy (plain, DDP, DeepSpeed): fp16 needs a GPU (autocast with loss
    scaling; DeepSpeed's fp16 engine). On a CPU, Accelerate would silently train in fp32 while
    saying fp16, and DeepSpeed would keep fp16 weights on the CPU (slow, and its loss scale skips
    steps). So a run asking for fp16 on a machine without CUDA trains in fp32 (the recipe says so
    once in the log, and records it in the provenance): the config stays valid on a laptop and on
    the cluster. bf16 autocast works on a CPU and is kept."""
    return "no" if requested == "fp16" and not cuda else requested


def check_precision_available(ds_config: dict, *, cuda: bool) -> None:
    """Refuse a DeepSpeed JSON that enables fp16 itself (`"enabled": true`, not "auto") on a machine
    without CUDA: `training_precision` cannot apply there, and DeepSpeed would train fp16 on the CPU."""
    if not cuda and (ds_config.get("fp16") or {}).get("enabled") is True:
        raise ConfigError("deepspeed_config.fp16.enabled", (
            "is true, but fp16 needs a CUDA GPU and this machine has none: set it to \"auto\" (train.mixed_precision "
            "decides, and fp16 runs in fp32 on a CPU), or use bf16"))


def fill_deepspeed_auto(ds_config: dict, cfg: Config, mixed_precision: str | None = None) -> dict:
    """Replace "auto" values that the experiment config decides; returns the same dict.
    `mixed_precision`: the precision the run trains in (`training_precision`), default the config's."""
    filled = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        # 0 disables clipping in both emotrain and DeepSpeed.
        "gradient_clipping": cfg.train.max_grad_norm,
    }
    for key, value in filled.items():
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
    for precision in ("bf16", "fp16"):
        section = ds_config.get(precision)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = (mixed_precision or cfg.train.mixed_precision) == precision
    # train_batch_size = micro x accumulation x world: left to Accelerate, which knows the world size.
    return ds_config


def check_skips_nonfinite_steps(ds_config: dict) -> None:
    """Refuse a DeepSpeed config that would apply a step whose gradients are not finite.

    Under DeepSpeed the engine steps inside `backward`, so emotrain cannot hold a bad step back: it
    relies on the ZeRO optimizer's own check, which skips the step and clears the gradient partitions
    when the global norm is inf/NaN. That check exists at ZeRO stages 1-3 (fp16 always, fp32 through
    the norm, bf16 unless `bf16.check_grad_overflow` is false); stage 0 has none.
    """
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)
    if stage == 0:
        raise ConfigError("deepspeed_config.zero_optimization.stage", (
            "is 0: DeepSpeed without ZeRO never skips a step with non-finite gradients, so one NaN would "
            "reach the weights. Use stage 1, 2 or 3 (launch/zero2.yaml), or DDP (launch/ddp.yaml)"))
    bf16 = ds_config.get("bf16") or {}
    if bf16.get("enabled") is True and bf16.get("check_grad_overflow") is False:
        raise ConfigError("deepspeed_config.bf16.check_grad_overflow", (
            "is false: DeepSpeed would then apply a bf16 step with non-finite gradients. Remove it (default true)"))


@contextmanager
def model_construction(accelerator) -> Iterator[None]:
    """Build the model inside this: under ZeRO-3 it honours `zero3_init_flag: false` (our launch configs).

    Accelerate registers its DeepSpeed config with transformers (`HfDeepSpeedConfig`) whatever
    `zero3_init_flag` says, so with a stage-3 config every `from_config`/`from_pretrained` after the
    Accelerator exists runs under `deepspeed.zero.Init` and then `initialize_weights_zero3`. With
    transformers 5.23 / deepspeed 0.19.8 that crashes on Wav2Vec2's weight-normed positional conv:
    it gathers only a module's own and its children's parameters, not the parametrization's
    `original0/1`, so `_weight_norm` sees an empty partition ("IndexError: Dimension out of range
    (expected to be in range of [-1, 0], but got 2)"). Building the model whole and letting
    `accelerator.prepare` partition it (what zero3_init_flag=false means) avoids it. The config is
    registered again afterwards. A no-op without DeepSpeed, below stage 3, or with zero3_init_flag true.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    registered = getattr(plugin, "dschf", None)
    if registered is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def zero_stage(accelerator) -> int:
    """The ZeRO stage of this run (0 without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0
