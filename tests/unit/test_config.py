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
        ("trainn.lr=1", "trainn", "allowed here"),
        ("train.lr.x=1", "train.lr.x", "not a section"),
        ("data.fold=9", "data.fold", "0..5"),
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
    with pytest.raises(yaml.YAMLError):
        load_config(path)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


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
    assert main(["config", str(CONFIGS / "paper.yaml"), "data.fold=7"]) == 2
    assert "data.fold: must be 0..5" in capsys.readouterr().err

    assert main(["config", "--keys"]) == 0
    assert "train.gradient_checkpointing  (bool" in capsys.readouterr().out
