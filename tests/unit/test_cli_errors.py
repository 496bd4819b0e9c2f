"""A new user's mistakes, through the real CLI: one line on stderr naming the file or key, exit 2,
no traceback, and nothing built or written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emotrain.data.folds import NoPreparedDataset, list_session_files, read_metadata

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def emotrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emotrain.cli", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("verb", ["config", "train"])
def test_malformed_yaml_names_the_file_and_line(tmp_path, verb):
    path = tmp_path / "typo.yaml"
    path.write_text("experiment: x\ntrain:\n  lr: 1.0e-4\n   head_lr: 1.0e-3\n")  # bad indentation
    line = assert_one_line_error(emotrain(verb, path), str(path), "line 4")
    assert "fix the YAML syntax" in line


@pytest.mark.parametrize("verb", ["config", "train"])
def test_a_python_tag_is_refused_in_one_line(tmp_path, verb):
    path = tmp_path / "evil.yaml"
    path.write_text("experiment: !!python/object/apply:os.system ['echo pwned']\n")
    proc = emotrain(verb, path)
    line = assert_one_line_error(proc, str(path), "line 1", "python/object/apply")
    assert "plain data" in line and "pwned" not in proc.stdout


def test_a_missing_config_file_is_one_line(tmp_path):
    assert_one_line_error(emotrain("train", tmp_path / "nope.yaml"), "nope.yaml", "no such config file")


def test_train_before_prepare_fails_fast_naming_data_path(tmp_path):
    out = tmp_path / "out"
    proc = emotrain("train", CONFIGS / "smoke.yaml", f"data.path={tmp_path / 'nowhere'}", f"output_dir={out}",
                    "model.text_encoder=tiny")
    line = assert_one_line_error(proc, "data.path", str(tmp_path / "nowhere"), "emotrain prepare")
    assert "emotrain synth" in line
    assert not out.exists()  # failed before the recipe: no run folder, no model


def test_an_unknown_override_in_train_is_one_line():
    assert_one_line_error(emotrain("train", CONFIGS / "smoke.yaml", "train.lr_decay=0.5"), "train.lr_decay")


def test_a_partly_prepared_dataset_names_the_missing_session(tmp_path):
    with pytest.raises(NoPreparedDataset) as err:
        read_metadata(str(tmp_path))
    assert err.value.key == "data.path" and "no prepared dataset at" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # what callers caught before
    (tmp_path / "session1").mkdir()
    (tmp_path / "session1" / "data-00000-of-00001.parquet").write_bytes(b"")
    assert list_session_files(str(tmp_path), 1)
    with pytest.raises(NoPreparedDataset, match="no prepared shards for session 2 at"):
        list_session_files(str(tmp_path), 2)


def test_config_shows_the_fold_folder_and_takes_a_bare_no():
    proc = emotrain("config", CONFIGS / "paper.yaml", "data.fold=3", "train.mixed_precision=no",
                    "logging.report_to=none")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["output_dir"] == "runs/paper/fold3"
    assert printed["train"]["mixed_precision"] == "no" and printed["logging"]["report_to"] == []


def test_version():
    from emotrain import __version__

    proc = emotrain("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"emotrain {__version__}", proc.stderr
