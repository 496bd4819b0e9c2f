"""What the trackers get: validation under the HF Trainer's names with its loss, the test's per-class
recalls, one learning rate per part, W&B's confusion-matrix chart, and what the console leaves out."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emotrain.config import LABEL_NAMES, load_config
from emotrain.train import recipe, tracking
from emotrain.train.loss import StepLoss
from emotrain.train.optim import current_learning_rates, parameter_groups, set_learning_rates
from emotrain.train.state import Progress

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


class FakeTracker:
    """An Accelerate tracker that keeps what it is given (TensorBoard's place)."""

    name = "tensorboard"

    def __init__(self):
        self.logged: list[tuple[dict, int | None]] = []

    def log(self, values: dict, step: int | None = None) -> None:
        self.logged.append((values, step))

    def keys(self) -> set[str]:
        return {key for values, _ in self.logged for key in values}


class FakeWandbRun:
    def __init__(self):
        self.logged: list[dict] = []
        self.summary: dict = {}

    def log(self, values: dict) -> None:
        self.logged.append(values)


class FakeAccelerator:
    """One process with one plain tracker and a W&B run."""

    is_main_process = True
    num_processes = 1
    device = torch.device("cpu")

    def __init__(self):
        self.trackers = [FakeTracker()]
        self.wandb = FakeWandbRun()

    def get_tracker(self, name: str, unwrap: bool = False):
        assert name == "wandb" and unwrap
        return self.wandb

    def reduce(self, tensor, reduction="sum"):
        return tensor


class FixedLogits(nn.Module):
    """A "model" whose logits are given per utterance, in batch order."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.seen = logits, 0

    def forward(self, **inputs):
        batch_size = inputs["audio_lengths"].shape[0]
        out = self.logits[self.seen:self.seen + batch_size]
        self.seen += batch_size
        return SimpleNamespace(logits=out)


LOGITS = torch.tensor([[2.0, 0.1, 0.0, 0.0], [0.3, 1.5, 0.0, 0.2], [0.0, 0.0, 0.1, 3.0],
                       [1.0, 0.0, 0.5, 0.0], [9.0, -9.0, 0.0, 0.0]])
LABELS = torch.tensor([0, 1, 2, 3, 1])
VALID = torch.tensor([True, True, True, True, False])  # the last one could not be decoded: not scored


def _batches():
    """Two evaluation batches of the five utterances above (3 + 2)."""
    for part in (slice(0, 3), slice(3, 5)):
        n = LABELS[part].shape[0]
        yield {"ids": [f"u{i}" for i in range(part.start, part.stop)], "labels": LABELS[part], "valid": VALID[part],
               "input_values": torch.zeros(n, 16), "audio_lengths": torch.full((n,), 16)}


def _training(report_to: str = "wandb,tensorboard") -> SimpleNamespace:
    cfg = load_config(None, [f"logging.report_to={report_to}"])
    model = FixedLogits(LOGITS)
    return SimpleNamespace(
        cfg=cfg, accelerator=FakeAccelerator(), log=logging.getLogger("test_tracking"), labels=list(LABEL_NAMES),
        state=SimpleNamespace(model=model, progress=Progress(step=7)), validation_loader=list(_batches()),
        loss=StepLoss(world_size=1, accumulation=1, label_smoothing=0.1))


def test_validation_is_logged_as_eval_with_the_training_loss_and_the_confusion_chart():
    import wandb

    t = _training()
    recipe.validate(t)
    (values, step), = t.accelerator.trackers[0].logged
    assert step == 7 and values[tracking.STEP_METRIC] == 7
    assert set(values) == {"eval/loss", "eval/wa", "eval/ua", "eval/macro_f1", tracking.STEP_METRIC,
                           *(f"eval/recall_{name}" for name in LABEL_NAMES)}
    # The loss is the run's own (label smoothing here), averaged over the scored utterances only.
    expected = F.cross_entropy(LOGITS[:4], LABELS[:4], label_smoothing=0.1).item()
    assert values["eval/loss"] == pytest.approx(expected, rel=1e-6)
    assert t.state.progress.best_validation["loss"] == values["eval/loss"]  # metrics.json's validation section
    (chart,) = [logged["eval/confusion"] for logged in t.accelerator.wandb.logged]
    assert isinstance(chart, wandb.plot.CustomChart)
    # The chart counts each scored utterance once, in its (true, predicted) cell: rows = true class.
    table = {(row[0], row[1]): row[2] for row in chart.table.data}
    assert table[("neutral", "neutral")] == table[("sad", "angry")] == table[("angry", "neutral")] == 1
    assert sum(table.values()) == 4


def test_without_wandb_the_other_trackers_get_the_scalars_only():
    t = _training(report_to="tensorboard")
    recipe.validate(t)
    assert "eval/ua" in t.accelerator.trackers[0].keys() and not t.accelerator.wandb.logged


def test_test_metrics_carry_the_per_class_recalls_and_reach_the_wandb_summary():
    metrics = {"wa": 0.5, "ua": 0.4, "macro_f1": 0.3, "n": 4, "confusion": [[1]],
               "per_class_recall": {"neutral": 1.0, "happy": 0.0, "sad": None, "angry": 0.5}}
    scalars = tracking.evaluation_scalars("test", metrics)
    assert scalars == {"test/wa": 0.5, "test/ua": 0.4, "test/macro_f1": 0.3, "test/recall_neutral": 1.0,
                       "test/recall_happy": 0.0, "test/recall_angry": 0.5}  # no loss computed, no sad utterance
    accelerator, cfg = FakeAccelerator(), load_config(None, ["logging.report_to=wandb"])
    tracking.summarize(accelerator, cfg, scalars)
    assert accelerator.wandb.summary["test/recall_angry"] == 0.5


def test_the_learning_rate_is_logged_once_per_part():
    model = nn.ModuleDict({"audio_encoder": nn.Linear(3, 3), "text_encoder": nn.Linear(3, 3), "classifier": nn.Linear(3, 2)})
    cfg = load_config(None, ["train.lr=1e-4", "train.head_lr=1e-3", "model.audio_encoder=facebook/wav2vec2-base",
                             "model.text_encoder=bert-base-uncased"])
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train, cfg.model))
    assert len(optimizer.param_groups) == 6  # each part: decayed weights and undecayed biases
    set_learning_rates(optimizer, 0.5)
    assert current_learning_rates(optimizer) == {"audio_encoder": 5e-5, "text_encoder": 5e-5, "head": 5e-4}


def test_the_resolved_config_can_stay_out_of_the_console_but_not_out_of_train_log(tmp_path, capsys):
    log = tracking.setup_logging(tmp_path, is_main_process=True)
    try:
        log.info("resolved config:\nsecret-free: yes", extra=tracking.FILE_ONLY)
        log.info("for everyone")
    finally:
        for handler in log.handlers:
            handler.close()
        log.handlers.clear()
    console = capsys.readouterr().err
    assert "for everyone" in console and "resolved config" not in console
    assert "resolved config:\nsecret-free: yes" in (tmp_path / "train.log").read_text()


def test_runs_of_a_seed_comparison_are_named_with_their_seed(tmp_path):
    from emotrain import cv

    def names(**seeds) -> list[str]:
        runs = cv.plan_runs([str(SMOKE)], [f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}"], folds=[1, 2], **seeds)
        return [tracking.run_name(load_config(run.config, run.overrides)) for run in runs]

    assert names() == ["smoke-fold1", "smoke-fold2"]
    assert names(seeds=[1, 2]) == ["smoke-fold1-seed1", "smoke-fold2-seed1", "smoke-fold1-seed2", "smoke-fold2-seed2"]
