"""A cross-validation you can watch: one overall progress line per run with an ETA, and each
training's resolved config in its train.log, on the console only when asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import emotrain.cli as cli
from emotrain import cv
from tests.integration.conftest import prepared_synthetic_corpus

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_every_run_and_estimates_from_the_runs_trained_here():
    clock = FakeClock()
    progress = cv.Progress(6, clock=clock)
    assert progress.run_ended() == "[cv] 1/6 runs finished"  # found finished: no duration to go by
    progress.run_started()
    clock.now += 120
    assert progress.run_ended(trained=True) == "[cv] 2/6 runs finished, ETA 8 min"  # 4 left x 2 min
    progress.run_started()
    clock.now += 5
    assert progress.run_ended(failed=True) == "[cv] 3/6 runs finished (1 failed), ETA 6 min"  # not timed
    progress.run_started()
    clock.now += 240
    assert progress.run_ended(trained=True) == "[cv] 4/6 runs finished (1 failed), ETA 6 min"  # 2 left x 3 min
    progress.run_started()
    clock.now += 20
    assert progress.run_ended(trained=True) == "[cv] 5/6 runs finished (1 failed), ETA 2 min"  # mean 380 s / 3
    progress.run_started()
    assert progress.run_ended(trained=True) == "[cv] 6/6 runs finished (1 failed)"


@pytest.mark.parametrize(("seconds", "said"), [(20, "<1 min"), (89 * 60, "89 min"), (2 * 3600 + 5 * 60, "2 h 05 min")])
def test_the_eta_reads_in_minutes_then_hours(seconds, said):
    clock = FakeClock()
    progress = cv.Progress(2, clock=clock)
    progress.run_started()
    clock.now += seconds
    assert progress.run_ended(trained=True) == f"[cv] 1/2 runs finished, ETA {said}"


def test_cv_says_one_progress_line_per_run_and_keeps_the_configs_off_the_console_unless_verbose(tmp_path):
    runs = cv.plan_runs([str(SMOKE)], [f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}"], folds=[1, 2])
    argv_file = tmp_path / "argv.jsonl"
    record = f"import json, sys; open({str(argv_file)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')"
    launcher = [sys.executable, "-c", record]
    for verbose in (False, True):
        said: list[str] = []
        code, _ = cv.run_sequentially(runs, launcher=launcher, say=said.append, verbose=verbose)
        assert code == 0
        assert [line for line in said if line.startswith("[cv] ")] == [
            "[cv] 1/2 runs finished, ETA <1 min", "[cv] 2/2 runs finished"]
    calls = [json.loads(line) for line in argv_file.read_text().splitlines()]
    assert [call[-1] == "logging.print_config=false" for call in calls] == [True, True, False, False]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepared_synthetic_corpus(tmp_path_factory.mktemp("console"), 12)


@pytest.mark.parametrize("print_config", [True, False])
def test_the_resolved_config_is_in_train_log_and_on_the_console_unless_turned_off(corpus, tmp_path, capsys,
                                                                                print_config):
    out = tmp_path / "out"
    argv = ["train", str(SMOKE), f"data.path={corpus}", f"output_dir={out}", "model.text_encoder=tiny",
            "model.hidden_size=32", "model.classifier_hidden_size=32", "logging.progress_bar=false",
            f"logging.print_config={str(print_config).lower()}"]
    # Setup only: a stop request before the first step ends the run once the config is logged.
    assert cli.main(argv, wrap_training=lambda training: training.watcher.request("the test")) == 75
    said = capsys.readouterr()
    console = said.out + said.err
    assert console.count("resolved config:") == int(print_config), console[-3000:]
    assert "Setting accelerator to CPU" not in console  # DeepSpeed's detection noise (no CUDA here)
    log = (out / "train.log").read_text()
    assert log.count("resolved config:") == 1 and f"path: {corpus}" in log


def test_deepspeed_is_told_its_accelerator_is_the_cpu_only_without_cuda():
    from emotrain.train.deepspeed_config import name_deepspeed_accelerator

    for cuda, before, after in ((False, {}, {"DS_ACCELERATOR": "cpu"}), (True, {}, {}),
                                (False, {"DS_ACCELERATOR": "npu"}, {"DS_ACCELERATOR": "npu"})):
        name_deepspeed_accelerator(cuda=cuda, environ=before)
        assert before == after


def test_a_bundled_encoder_loads_without_a_progress_bar_and_leaves_the_bars_on(capfd):
    from transformers.utils import logging as hf_logging

    from emotrain.config import ModelConfig
    from emotrain.model.encoders import build_text_encoder

    build_text_encoder(ModelConfig(text_encoder="bundled:all-MiniLM-L6-v2"))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # a hub download still shows its progress
