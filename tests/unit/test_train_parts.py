"""Checkpoint folders, preemption requests, parameter groups and the lr schedule."""

from __future__ import annotations

import os
import signal

import pytest
from torch import nn

from emotrain.config import TrainConfig
from emotrain.train import checkpoint as ckpt
from emotrain.train.optim import lr_factor, parameter_groups
from emotrain.train.preemption import PreemptionWatcher


def _save(root, step):
    partial = ckpt.partial_dir(root, step)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"weights")
    return ckpt.finalize(root, step, {"step": step}, "experiment: x\n")


def test_only_complete_checkpoints_are_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root) is None
    assert ckpt.resolve_resume("auto", root) is None
    _save(root, 100)
    newest = _save(root, 200)
    assert newest.name == "step-000200" and (newest / ckpt.COMPLETE).is_file()
    assert ckpt.read_json(newest / ckpt.LOOP_STATE) == {"step": 200}

    # A save killed mid-write: the partial folder, and a folder whose marker never got written.
    ckpt.partial_dir(root, 300).mkdir()
    (ckpt.partial_dir(root, 300) / "model.safetensors").write_bytes(b"half")
    truncated = root / "step-000400"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(root) == newest
    assert ckpt.resolve_resume("auto", root) == newest
    assert ckpt.resolve_resume("never", root) is None
    assert ckpt.resolve_resume(str(root / "step-000100"), root) == root / "step-000100"
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        ckpt.resolve_resume(str(truncated), root)


def test_rotation_keeps_the_newest_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300, 400, 500):
        _save(root, step)
    ckpt.partial_dir(root, 600).mkdir()
    ckpt.rotate(root, keep_last=2, keep_steps={200})
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [200, 400, 500]
    assert not ckpt.partial_dir(root, 600).exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 100)
    _save(root, 100)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [100]


def test_preemption_by_signal_and_flag_file(tmp_path):
    flag = tmp_path / "STOP"
    with PreemptionWatcher(flag) as watcher:
        assert not watcher.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.requested() and watcher.reason() == "signal SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGUSR1))
    with PreemptionWatcher(flag) as watcher:
        assert not watcher.requested()
        flag.write_text("")
        assert watcher.requested() and "flag file" in watcher.reason()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.text_encoder = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)
        self.audio_encoder[0].weight.requires_grad_(False)  # a frozen part


def test_parameter_groups_split_encoders_head_and_decay():
    model = _Tiny()
    cfg = TrainConfig(lr=1e-5, head_lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert set(groups) == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    assert groups["encoder"]["lr"] == 1e-5 and groups["head"]["lr"] == 1e-3
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 0.1
    ids = lambda name: {id(p) for p in groups[name]["params"]}  # noqa: E731
    assert ids("encoder") == {id(model.text_encoder.weight)}  # the frozen weight is left out
    assert ids("encoder_no_decay") == {id(p) for p in (model.audio_encoder[0].bias, *model.audio_encoder[1].parameters(),
                                                      model.text_encoder.bias)}
    assert ids("head") == {id(model.classifier.weight)}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(s, 100, 10, "linear") for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(70, 100, 10, "constant") == 1.0


def test_tracker_config_is_flat_scalars():
    from emotrain.config import load_config
    from emotrain.train.tracking import flat_config, init_kwargs

    cfg = load_config(None, ["logging.report_to=[wandb,tensorboard]", "data.fold=3", "experiment=paper"])
    flat = flat_config(cfg)
    assert flat["train.lr"] == cfg.train.lr and flat["data.fold"] == 3
    assert flat["logging.report_to"] == "wandb,tensorboard" and flat["logging.entity"] == "None"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    wandb = init_kwargs(cfg, "abc123")["wandb"]
    assert (wandb["id"], wandb["resume"], wandb["group"], wandb["job_type"]) == ("abc123", "allow", "paper", "fold3")
    assert wandb["name"] == "paper-fold3" and wandb["mode"] == "offline"
