"""The typed config tree: every shipped YAML validates; errors name the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emotrain.cli import main
from emotrain.config import (
    Config,
    ConfigError,
    describe_fields,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def test_every_shipped_config_is_found_and_validates():
    # Counted, so a config silently dropped from the glob fails the suite.
    assert [p.relative_to(CONFIGS).as_posix() for p in SHIPPED] == [
        "audio_only.yaml", "paper.yaml", "smoke.yaml", "text_only.yaml",
    ]
    for path in SHIPPED:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
        # Shipped files spell every key out explicitly where it matters, and start with the command.
        assert path.read_text().startswith("# "), f"{path.name} must start with the command that runs it"
        # No hard-coded run folder: the default follows the experiment and the fold.
        assert "output_dir" not in yaml.safe_load(path.read_text()), path.name
        assert cfg.output_dir == f"runs/{cfg.experiment}/fold{cfg.data.fold}"
        assert load_config(path, ["data.fold=4"]).output_dir == f"runs/{cfg.experiment}/fold4"


def test_paper_config_is_the_published_setup():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert (cfg.model.variant, cfg.model.audio_encoder, cfg.model.text_encoder) == (
        "fusion", "facebook/wav2vec2-base", "bert-base-uncased",
    )
    audio, text = load_config(CONFIGS / "audio_only.yaml"), load_config(CONFIGS / "text_only.yaml")
    assert (audio.model.variant, text.model.variant) == ("audio", "text")
    # The baselines differ from the paper only in what makes them baselines.
    for baseline in (audio, text):
        assert baseline.train == cfg.train and baseline.data == cfg.data


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "paper.yaml", ["train.lr=2e-5", "data.fold=3", "logging.report_to=[tensorboard]",
                                               "train.gradient_checkpointing=false", "model.tokenizer=null"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.fold == 3
    assert cfg.logging.report_to == ["tensorboard"]
    assert cfg.train.gradient_checkpointing is False
    assert cfg.model.tokenizer is None


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("train.nope=1", "train.nope", "allowed here"),
        ("nope=1", "nope", "allowed here"),
        ("trainn.lr=1", "trainn", "did you mean train.lr?"),
        ("train.lr.x=1", "train.lr.x", "not a section"),
        ("data.fold=-1", "data.fold", ">= 0"),
        ("data.labels=[sad,sad]", "data.labels", "distinct"),
        ("data.fold=two", "data.fold", "expected int"),
        ("data.fold=1.5", "data.fold", "expected int"),
        ("train.lr=-1", "train.lr", "> 0"),
        ("train.mixed_precision=fp8", "train.mixed_precision", "'no', 'bf16', 'fp16'"),
        ("model.variant=both", "model.variant", "'fusion', 'audio', 'text'"),
        ("model.cross_attention_heads=3", "model.cross_attention_heads", "divide"),
        ("logging.report_to=[mlflow]", "logging.report_to[0]", "'wandb', 'tensorboard'"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing", "expected bool"),
        ("train.lr", "train.lr", "dotted.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "paper.yaml", [override])
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}:") and allowed in str(err.value)


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  lr_decay: 0.5\n")
    with pytest.raises(ConfigError, match=r"^train\.lr_decay: unknown key"):
        load_config(path)


def test_yaml_is_plain_data(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("experiment: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == str(path) and "line 1" in str(err.value) and "plain data" in str(err.value)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("experiment: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == str(path) and "started at line 3" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.mixed_precision=no", "no"),  # YAML alone reads a bare `no` as False
        ("train.mixed_precision='no'", "no"),
        ('train.mixed_precision="bf16"', "bf16"),
        ("experiment=1e-3", "1e-3"),  # a str field keeps the text, not the float YAML would make
        ("experiment=off", "off"),
        ("experiment=null", "null"),  # None is not allowed there: the text it is
        ("logging.run_name=null", None),
        ("logging.run_name=~", None),
        ("logging.run_name=2024", "2024"),
        ("logging.run_name= spaced ", "spaced"),
        ("model.tokenizer=NULL", None),
    ],
)
def test_string_fields_keep_the_override_text(override, expected):
    key = override.split("=", 1)[0]
    section, _, name = key.rpartition(".")
    cfg = load_config(CONFIGS / "smoke.yaml", [override])
    assert getattr(getattr(cfg, section) if section else cfg, name) == expected


def test_yaml_booleans_in_a_file_map_to_the_one_allowed_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1: False
    assert load_config(path).train.mixed_precision == "no"
    # False could be spelled no, off or false: none of wandb_mode's values, so it stays an error.
    path.write_text("logging:\n  wandb_mode: off\n")
    with pytest.raises(ConfigError, match=r"^logging\.wandb_mode: expected one of"):
        load_config(path)


def test_report_to_none_and_a_bare_tracker(tmp_path):
    assert load_config(CONFIGS / "paper.yaml", ["logging.report_to=none"]).logging.report_to == []
    assert load_config(CONFIGS / "paper.yaml", ["logging.report_to=[none]"]).logging.report_to == []
    assert load_config(CONFIGS / "paper.yaml", ["logging.report_to=wandb"]).logging.report_to == ["wandb"]
    assert load_config(CONFIGS / "paper.yaml", ["logging.report_to="]).logging.report_to == []
    assert load_config(None, ["logging.tags=no"]).logging.tags == ["no"]
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n  report_to: none\n")
    assert load_config(path).logging.report_to == []
    path.write_text("logging:\n  report_to: tensorboard\n")
    assert load_config(path).logging.report_to == ["tensorboard"]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "paper.yaml", ["logging.report_to=[none, wandb]"])
    assert err.value.key == "logging.report_to" and "cannot be combined" in str(err.value)


def test_report_to_takes_what_the_hf_trainer_takes(tmp_path):
    both = ["wandb", "tensorboard"]
    for given in ("all", "[all]", "wandb,tensorboard", "wandb, tensorboard", "[wandb, tensorboard]"):
        assert load_config(None, [f"logging.report_to={given}"]).logging.report_to == both, given
    path = tmp_path / "c.yaml"
    path.write_text("logging:\n  report_to: wandb,tensorboard\n  tags: [a,b]\n")
    assert load_config(path).logging.report_to == both
    assert load_config(None, ["logging.tags=a,b"]).logging.tags == ["a,b"]  # free text is not split
    with pytest.raises(ConfigError, match=r"logging.report_to: `all` means every tracker"):
        load_config(None, ["logging.report_to=all,wandb"])
    with pytest.raises(ConfigError, match=r"logging.report_to\[1\]: expected one of"):
        load_config(None, ["logging.report_to=wandb,mlflow"])


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=inf", "train.lr=nan", "train.head_lr=inf", "train.head_lr=.inf", "train.head_lr=nan",
        "train.head_lr=0", "train.audio_encoder_lr=inf", "train.text_encoder_lr=-1e-5",
        "train.text_encoder_lr=nan", "data.max_audio_seconds=.inf", "data.max_audio_seconds=nan",
        "data.max_batch_audio_seconds=inf", "data.validation_fraction=nan", "data.validation_fraction=inf",
        "train.weight_decay=inf", "train.weight_decay=nan", "train.warmup_ratio=nan",
        "train.max_grad_norm=inf", "train.max_grad_norm=nan", "model.dropout=nan", "model.dropout=inf",
        "train.label_smoothing=1.0", "train.label_smoothing=-0.1", "train.label_smoothing=nan",
    ],
)
def test_non_finite_and_out_of_range_floats_name_the_key(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "paper.yaml", [override])
    assert err.value.key == key


def test_loss_and_per_encoder_lr_fields():
    cfg = load_config(None)
    assert (cfg.train.class_weights, cfg.train.label_smoothing) == ("none", 0.0)
    assert (cfg.train.audio_encoder_lr, cfg.train.text_encoder_lr) == (None, None)
    assert cfg.model.freeze_feature_encoder is None
    cfg = load_config(None, ["train.class_weights=balanced", "train.label_smoothing=0.1",
                             "train.audio_encoder_lr=1e-4", "model.freeze_feature_encoder=false"])
    assert (cfg.train.class_weights, cfg.train.label_smoothing, cfg.train.audio_encoder_lr) == ("balanced", 0.1, 1e-4)
    assert cfg.model.freeze_feature_encoder is False
    with pytest.raises(ConfigError, match=r"^train\.class_weights: expected one of 'none', 'balanced'"):
        load_config(None, ["train.class_weights=inverse"])


def test_freeze_feature_encoder_auto_follows_whether_the_encoder_is_random():
    assert not load_config(None).model.freezes_feature_encoder()  # tiny: random, trained whole
    paper = load_config(CONFIGS / "paper.yaml", ["model.freeze_feature_encoder=null"]).model
    assert paper.freeze_feature_encoder is None and paper.freezes_feature_encoder()
    assert load_config(None, ["model.freeze_feature_encoder=true"]).model.freezes_feature_encoder()


@pytest.mark.parametrize(
    "template, expected",
    [
        ("runs/{experiment}/fold{fold}", "runs/paper/fold3"),
        ("out/{variant}-s{seed}/{fold}", "out/fusion-s7/3"),
        ("out/fold{fold:02d}", "out/fold03"),
        ("out/{{literal}}/{fold}", "out/{literal}/3"),
        ("/abs/plain", "/abs/plain"),
    ],
)
def test_output_dir_is_a_template(template, expected):
    cfg = load_config(CONFIGS / "paper.yaml", [f"output_dir={template}", "data.fold=3", "train.seed=7"])
    assert cfg.output_dir == expected


def test_output_dir_default_follows_the_fold_after_overrides():
    assert load_config(None).output_dir == "runs/smoke/fold1"
    cfg = load_config(CONFIGS / "paper.yaml", ["data.fold=3", "experiment=ablation"])
    assert cfg.output_dir == "runs/ablation/fold3"
    assert Config().output_dir == "runs/smoke/fold1"  # built directly: resolved as well


@pytest.mark.parametrize(
    "template, message",
    [
        ("runs/{exp}/fold{fold}", "unknown placeholder {exp}"),
        ("runs/{}", "unknown placeholder"),
        ("runs/{0}", "unknown placeholder {0}"),
        ("runs/{fold.real}", "unknown placeholder"),
        ("runs/{fold", "malformed template"),
        ("runs/fold}", "malformed template"),
        ("runs/{fold:zz}", "cannot fill"),
    ],
)
def test_bad_output_dir_template_names_output_dir(template, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "paper.yaml", [f"output_dir={template}"])
    assert err.value.key == "output_dir" and message in str(err.value)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.seed=7", "output_dir=out/{experiment}-s{seed}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["output_dir"] == "out/smoke-s7"  # concrete
    assert load_config(tmp_path / "config.yaml") == cfg
    # A saved config holds the concrete folder: overriding its fold does not move the run.
    assert load_config(tmp_path / "config.yaml", ["data.fold=2"]).output_dir == "out/smoke-s7"


def test_every_field_has_a_docstring():
    rows = describe_fields()
    assert len(rows) > 50
    assert [key for key, _, _, doc in rows if not doc] == []


def test_config_cli(capsys):
    assert main(["config", str(CONFIGS / "paper.yaml"), "train.lr=3e-5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 3e-5 and printed["model"]["variant"] == "fusion"

    assert main(["config", str(CONFIGS / "paper.yaml"), "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err
    assert main(["config", str(CONFIGS / "paper.yaml"), "data.fold=-2"]) == 2
    assert "data.fold: must be >= 0" in capsys.readouterr().err

    assert main(["config", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "train.gradient_checkpointing  (bool" in keys
    assert "output_dir  (str, default 'runs/{experiment}/fold{fold}')" in keys  # the template, documented


def test_a_saved_config_with_a_literal_brace_in_its_folder_loads_back_the_same(tmp_path):
    from emotrain.config import save_config

    cfg = load_config(None, ["output_dir=runs/a{{b}}/fold{fold}", "data.fold=2"])
    assert cfg.output_dir == "runs/a{b}/fold2"
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.output_dir == "runs/a{b}/fold2" and again.to_dict() == cfg.to_dict()


def test_the_worker_count_is_decided_per_machine_when_not_given(monkeypatch):
    import os

    import torch

    from emotrain.config import DataConfig

    assert DataConfig(num_workers=3).workers(8) == 3  # given: as given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DataConfig().workers() == 0  # CPU-only: the workers would compete with the training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert DataConfig().workers(8) == 3 and DataConfig().workers(1) == 4 and DataConfig().workers(32) == 0


def test_flash_attention_needs_half_precision():
    from emotrain.config import load_config

    with pytest.raises(ConfigError, match="model.attention: flash_attention_2 runs in half precision only"):
        load_config(None, ["model.attention=flash_attention_2", "train.mixed_precision=no"])
    assert load_config(None, ["model.attention=flash_attention_2", "train.mixed_precision=bf16"]).model.attention


def test_keys_say_which_are_result_neutral_and_why(capsys):
    assert main(["config", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert ("data.num_workers  (int or null, default None)\n" in keys and "Result-neutral: an execution resource, "
            "like the number of processes; a run folder saved with another value accepts it." in keys)
    section = keys[keys.index("logging.tags  ("):]
    assert "Result-neutral: trackers, names, tags" in section.split("\n")[1]  # the whole section is neutral
    lr = keys[keys.index("train.lr  ("):]
    assert "Result-neutral" not in lr.split("\n")[1]
