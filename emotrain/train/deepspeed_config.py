"""Fill the DeepSpeed JSON's "auto" values from the experiment config.

Accelerate resolves most "auto" entries itself, but it takes the micro-batch size from prepared
dataloaders, and the training stream is deliberately not prepared (it is sharded already). So the
values that come from the experiment are written into the plugin's config before `prepare`.
"""

from __future__ import annotations

from emotrain.config import Config


def fill_deepspeed_auto(ds_config: dict, cfg: Config) -> dict:
    """Replace "auto" values that the experiment config decides; returns the same dict."""
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
            section["enabled"] = cfg.train.mixed_precision == precision
    # train_batch_size = micro x accumulation x world: left to Accelerate, which knows the world size.
    return ds_config
