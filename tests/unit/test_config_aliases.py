"""The names an HF Trainer user types: `TrainingArguments` names accepted for ours with a one-line note
(on the command line and in YAML), both names at once refused, and a typo answered with the key it meant."""

from __future__ import annotations

from pathlib import Path

import pytest

from emotrain import config as config_module
from emotrain.cli import main
from emotrain.config import HF_ALIASES, ConfigError, describe_fields, load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    # A note is said once per process (cv loads a config many times): each test starts afresh.
    config_module._say_note.cache_clear()
    monkeypatch.delenv("RANK", raising=False)
    yield
    config_module._say_note.cache_clear()


def test_every_alias_names_a_key_we_have():
    keys = {key for key, _, _, _ in describe_fields()}
    assert set(HF_ALIASES.values()) <= keys


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("learning_rate=2e-5", "train.lr", 2e-5),
        ("train.learning_rate=2e-5", "train.lr", 2e-5),  # in its key's own section as well
        ("per_device_train_batch_size=4", "train.batch_size", 4),
        ("per_device_eval_batch_size=16", "data.eval_batch_size", 16),
        ("num_train_epochs=3", "train.max_epochs", 3),
        ("gradient_accumulation_steps=2", "train.gradient_accumulation_steps", 2),
        ("seed=7", "train.seed", 7),
        ("resume_from_checkpoint=runs/x/checkpoints/step-000010", "train.resume", "runs/x/checkpoints/step-000010"),
        ("report_to=wandb,tensorboard", "logging.report_to", ["wandb", "tensorboard"]),
        ("logging_steps=5", "logging.log_every_steps", 5),
        ("dataloader_num_workers=2", "data.num_workers", 2),
        ("run_name=abc", "logging.run_name", "abc"),
    ],
)
def test_an_hf_name_on_the_command_line_is_our_key_with_a_note(override, key, value, capsys):
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == value
    alias = override.split("=")[0].rpartition(".")[2]
    assert f"emotrain: note: {alias} is {key} here" in capsys.readouterr().err


def test_bf16_and_fp16_set_the_precision():
    assert load_config(None, ["bf16=true"]).train.mixed_precision == "bf16"
    assert load_config(None, ["fp16=True"]).train.mixed_precision == "fp16"
    # false alone cannot say which precision (in the HF Trainer it leaves the other flag alone): refused,
    # never a silent fp32; beside the other flag's true, as HF configs often carry them, it is ignored.
    with pytest.raises(ConfigError, match=r"^fp16: false does not say which precision to use here: give "
                                          r"train.mixed_precision=no \(fp32\) or bf16$"):
        load_config(None, ["fp16=false"])
    assert load_config(None, ["bf16=true", "fp16=false"]).train.mixed_precision == "bf16"
    assert load_config(None, ["fp16=false", "train.bf16=true"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"^bf16: expected true or false, got 'yes please'"):
        load_config(None, ["bf16=yes please"])


def test_an_hf_name_in_a_yaml_file_is_our_key_with_a_note(tmp_path, capsys):
    path = tmp_path / "hf.yaml"
    path.write_text("learning_rate: 3.0e-5\nbf16: true\nfp16: false\nseed: 3\ntrain:\n  num_train_epochs: 4\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.mixed_precision, cfg.train.seed, cfg.train.max_epochs) == (3e-5, "bf16", 3, 4)
    err = capsys.readouterr().err
    assert "learning_rate is train.lr here" in err and "bf16 is train.mixed_precision here" in err
    assert err.count("\n") == 4  # one line each
    # The command line overrides a file's HF name like any key of the file.
    assert load_config(path, ["train.lr=1e-4"]).train.lr == 1e-4


@pytest.mark.parametrize(
    "given, named",
    [
        (["learning_rate=2e-5", "train.lr=1e-4"], "learning_rate and train.lr"),
        (["train.lr=1e-4", "train.learning_rate=2e-5"], "train.lr and train.learning_rate"),
        (["bf16=true", "fp16=true"], "bf16 and fp16"),
        (["fp16=true", "train.mixed_precision=no"], "fp16 and train.mixed_precision"),
    ],
)
def test_one_key_under_two_names_on_the_command_line_is_an_error_naming_both(given, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, given)
    assert str(err.value).startswith(f"{named}: both are ") and "give one of them" in str(err.value)


@pytest.mark.parametrize(
    "text, named",
    [
        ("learning_rate: 2.0e-5\ntrain:\n  lr: 1.0e-4\n", "train.lr and learning_rate"),
        ("bf16: true\nfp16: true\n", "bf16 and fp16"),
        ("seed: 1\ntrain:\n  seed: 2\n", "train.seed and seed"),
    ],
)
def test_one_key_under_two_names_in_a_yaml_file_is_an_error_naming_both(tmp_path, text, named):
    path = tmp_path / "both.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{named}: both are ")


def test_a_value_that_means_something_else_here_is_not_mapped():
    # HF's resume_from_checkpoint=True: resume here is a folder, `auto` or `never`; not guessed.
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: takes a checkpoint folder here.*train.resume=auto"):
        load_config(None, ["resume_from_checkpoint=true"])
    # Names whose meaning differs are no aliases: the error points at the key to read about.
    with pytest.raises(ConfigError, match=r"^max_steps: unknown key \(the HF Trainer's max_steps has no exact "
                                          r"equivalent here: see train.max_steps"):
        load_config(None, ["max_steps=100"])
    with pytest.raises(ConfigError, match=r"see train.warmup_ratio"):
        load_config(None, ["warmup_steps=100"])


@pytest.mark.parametrize(
    "typo, meant",
    [
        ("train.lr_rate", "train.lr"),
        ("train.learnig_rate", "train.lr"),
        ("learnig_rate", "train.lr"),
        ("lr", "train.lr"),  # our name, in the wrong section
        ("trainn.lr", "train.lr"),
        ("data.fols", "data.fold"),
        ("train.bath_size", "train.batch_size"),
        ("train.mixed_precison", "train.mixed_precision"),
        ("logging.wandb_modes", "logging.wandb_mode"),
        ("per_device_train_batchsize", "train.batch_size"),
        ("max_epoch", "train.max_epochs"),  # our name, misspelt, without its section
        ("batchsize", "train.batch_size"),
    ],
)
def test_an_unknown_key_suggests_the_nearest_one(typo, meant):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{typo}=1"])
    assert str(err.value).endswith(f"unknown key (did you mean {meant}?)")


@pytest.mark.parametrize("word", ["train.nope", "nope", "train.foo", "data.epochs", "train.loss", "model.size"])
def test_a_random_word_gets_the_allowed_keys_not_a_guess(word):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{word}=1"])
    assert "did you mean" not in str(err.value) and "allowed here" in str(err.value)


def test_the_suggestion_also_answers_a_yaml_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lr_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"^train\.lr_rate: unknown key \(did you mean train\.lr\?\)$"):
        load_config(path)


def test_notes_come_from_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert load_config(None, ["learning_rate=2e-5"]).train.lr == 2e-5
    assert capsys.readouterr().err == ""


def test_config_keys_lists_the_aliases(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    aliases = out[out.index("The HF Trainer's names"):]
    for name, key in HF_ALIASES.items():
        assert f"  {name} is {key} here" in aliases
    assert "train.batch_size  (int" in out and "per device" in out[out.index("train.batch_size  (int"):][:300]


def test_cv_takes_hf_names_beside_its_own_seed_and_fold(tmp_path):
    from emotrain import cv

    runs = cv.plan_runs([str(REPO / "configs" / "smoke.yaml")],
                        ["seed=3", "learning_rate=1e-4", f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}"], folds=[1])
    (run,) = runs
    cfg = load_config(run.config, run.overrides)
    assert (run.seed, cfg.train.seed, cfg.train.lr) == (3, 3, 1e-4)
    assert "train.seed=3" in run.overrides and not any(o.startswith("seed=") for o in run.overrides)
