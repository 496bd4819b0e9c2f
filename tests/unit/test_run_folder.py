"""A run folder refuses a config that would change its result, and accepts neutral changes."""

from __future__ import annotations

import pytest
import yaml

from emotrain.config import ConfigError, load_config, save_config
from emotrain.train.run_folder import (
    RESULT_NEUTRAL_KEYS,
    RunFolderConflict,
    check_run_folder,
    config_differences,
)


def _earlier_run(folder, cfg) -> None:
    """What a run that got as far as results leaves: its config.yaml and metrics.json."""
    save_config(cfg, folder / "config.yaml")
    (folder / "metrics.json").write_text("{}")


def _config(*overrides: str):
    return load_config(None, ["output_dir=runs/x", *overrides])


def test_a_new_or_unstarted_folder_passes(tmp_path):
    check_run_folder(tmp_path / "missing", _config())
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty", _config())


def test_the_same_config_passes(tmp_path):
    _earlier_run(tmp_path, _config("train.lr=3e-5"))
    check_run_folder(tmp_path, _config("train.lr=3e-5"))


@pytest.mark.parametrize(
    "override",
    [
        "output_dir=elsewhere", "train.resume=never", "data.path=/mnt/copy", "data.num_workers=8",
        "train.gradient_checkpointing=true", "train.checkpoint_every_steps=17",
        "train.keep_last_checkpoints=5", "train.max_consecutive_nonfinite=3", "logging.report_to=[wandb]",
        "logging.run_name=retry", "logging.progress_bar=false",
    ],
)
def test_result_neutral_differences_pass(tmp_path, override):
    _earlier_run(tmp_path, _config())
    check_run_folder(tmp_path, _config(override))


def test_a_result_changing_difference_is_refused_naming_every_key(tmp_path):
    _earlier_run(tmp_path, _config("train.lr=2e-5"))
    with pytest.raises(RunFolderConflict) as err:
        check_run_folder(tmp_path, _config("train.lr=3e-5", "model.variant=audio", "logging.tags=[x]",
                                           "data.eval_batch_size=64"))
    assert isinstance(err.value, ConfigError) and err.value.key == "output_dir"
    message = str(err.value)
    assert "train.lr: 2e-05 there, 3e-05 now" in message
    assert "model.variant: 'fusion' there, 'audio' now" in message
    assert "data.eval_batch_size: 8 there, 64 now" in message  # group-norm encoders see the padding
    assert "logging.tags" not in message
    assert "choose another output_dir" in message and "delete" in message
    assert "\n" not in message


def test_config_differences_counts_missing_keys_and_types():
    saved = {"train": {"lr": 1e-3, "seed": 1, "old": 5}, "logging": {"project": "a"}, "output_dir": "a"}
    new = {"train": {"lr": 1e-3, "seed": 1.0, "class_weights": "none"}, "logging": {"project": "b"}, "output_dir": "b"}
    assert config_differences(saved, new) == [
        ("train.class_weights", "<missing>", "none"),
        ("train.old", 5, "<missing>"),
        ("train.seed", 1, 1.0),
    ]
    assert config_differences(new, new) == []
    # A key added since the saved run, at its default (which does what emotrain did before it): the same run.
    defaults = {"train": {"class_weights": "none"}}
    assert config_differences(saved, new, defaults) == [("train.old", 5, "<missing>"), ("train.seed", 1, 1.0)]
    other = {"train": {**new["train"], "class_weights": "balanced"}, "output_dir": "b"}
    assert ("train.class_weights", "<missing>", "balanced") in config_differences(saved, other, defaults)


def test_a_folder_without_results_takes_the_new_config(tmp_path):
    """A run that failed before its first checkpoint (say on data.sampling_rate, checked at model
    build) left only its config.yaml: the corrected command must not be refused."""
    save_config(_config("data.sampling_rate=8000"), tmp_path / "config.yaml")
    check_run_folder(tmp_path, _config())
    (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)  # a save that never completed
    check_run_folder(tmp_path, _config())
    (tmp_path / "checkpoints" / "step-000010" / "loop_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-000010" / "COMPLETE").write_text('{"step": 10, "sequence": 1}')
    with pytest.raises(RunFolderConflict, match="data.sampling_rate: 8000 there, 16000 now"):
        check_run_folder(tmp_path, _config())


def test_another_seed_is_pointed_to_its_own_folder(tmp_path):
    _earlier_run(tmp_path, _config())
    with pytest.raises(RunFolderConflict, match=r"seed\{seed\}"):
        check_run_folder(tmp_path, _config("train.seed=7"))


def test_an_unreadable_saved_config_is_a_conflict(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RunFolderConflict, match="cannot read"):
        check_run_folder(tmp_path, _config())
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(RunFolderConflict, match="does not hold a config"):
        check_run_folder(tmp_path, _config())


def test_neutral_keys_are_real_config_keys():
    cfg = _config().to_dict()
    flat = {f"{section}.{key}" for section, values in cfg.items() if isinstance(values, dict) for key in values}
    flat |= {key for key, value in cfg.items() if not isinstance(value, dict)}
    for key in RESULT_NEUTRAL_KEYS:
        assert key in flat or (key.endswith(".") and any(k.startswith(key) for k in flat)), key
    saved = yaml.safe_load(_config().to_yaml())
    assert config_differences(saved, cfg) == []
