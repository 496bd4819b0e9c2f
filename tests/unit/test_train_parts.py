"""Checkpoint folders, preemption requests, parameter groups, trackers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from torch import nn

from emotrain.config import TrainConfig
from emotrain.train import checkpoint as ckpt
from emotrain.train.optim import parameter_groups
from emotrain.train.preemption import STOP_SIGNALS, PreemptionWatcher
from tests.faults import KILLED, die_in_child

REPO = Path(__file__).resolve().parents[2]


def _save(root, step, weights=b"weights"):
    partial = ckpt.partial_dir(root, step)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(weights)
    return ckpt.finalize(root, step, {"step": step}, "experiment: x\n")


def _weights(folder):
    return (folder / "model.safetensors").read_bytes()


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
    _save(root, 100, b"again")
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [100]
    assert _weights(root / "step-000100") == b"again"
    assert sorted(p.name for p in root.iterdir()) == ["step-000100"]  # no aside folder left behind


def test_the_marker_records_save_order_and_old_markers_still_count(tmp_path):
    root = tmp_path / "checkpoints"
    old = root / "step-000300"  # written before markers carried a sequence: a bare step number
    old.mkdir(parents=True)
    (old / ckpt.COMPLETE).write_text("300\n")
    ckpt.write_json(old / ckpt.LOOP_STATE, {"step": 300})
    assert ckpt.read_marker(old) == (300, 0) and ckpt.latest_checkpoint(root) == old
    new = _save(root, 100)
    assert json.loads((new / ckpt.COMPLETE).read_text()) == {"step": 100, "sequence": 1}
    assert ckpt.read_marker(_save(root, 200)) == (200, 2)
    # Written later, so newer, whatever the step numbers say.
    assert [(s.step, s.sequence) for s in ckpt.saved_checkpoints(root)] == [(300, 0), (100, 1), (200, 2)]
    assert ckpt.latest_checkpoint(root) == root / "step-000200"
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [100, 200, 300]  # still by step


def test_a_run_resumed_from_an_older_checkpoint_keeps_what_it_writes(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300, 400, 500):
        _save(root, step, b"abandoned")
    # train.resume=<step-000200>: the new branch saves 300 and 400, lower than the abandoned 500.
    _save(root, 300, b"new")
    ckpt.rotate(root, keep_last=2, keep_steps={100})  # the best step, as the resumed loop state says
    assert _weights(root / "step-000300") == b"new"  # the save just written survives its rotation
    assert ckpt.resolve_resume("auto", root) == root / "step-000300"
    _save(root, 400, b"new")
    ckpt.rotate(root, keep_last=2, keep_steps={100})
    assert [(s, _weights(f)) for s, f in ckpt.complete_checkpoints(root)] == [
        (100, b"abandoned"), (300, b"new"), (400, b"new")]  # the abandoned 500 is gone, the best kept
    assert ckpt.resolve_resume("auto", root) == root / "step-000400"


def test_a_fresh_run_in_an_old_folder_never_resumes_the_old_run(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step, b"old run")
    assert ckpt.resolve_resume("never", root) is None
    _save(root, 50, b"new run")
    ckpt.rotate(root, keep_last=1)
    assert [(s, _weights(f)) for s, f in ckpt.complete_checkpoints(root)] == [(50, b"new run")]
    assert ckpt.resolve_resume("auto", root) == root / "step-000050"


@pytest.mark.parametrize("restart", ["older checkpoint", "never"])
def test_a_restart_that_crashes_before_its_first_save_never_resumes_the_abandoned_branch(tmp_path, restart):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step, b"abandoned branch" if step > 100 else b"kept")
    chosen = str(root / "step-000100") if restart == "older checkpoint" else "never"
    expected = root / "step-000100" if restart == "older checkpoint" else None
    assert ckpt.resolve_resume(chosen, root) == expected
    # The restarted run dies before it saves anything: the same command with resume=auto now must
    # start where the restart did, not continue the branch it gave up.
    assert ckpt.resolve_resume("auto", root) == expected
    assert sorted(ckpt.is_abandoned(root / f"step-{s:06d}") for s in (200, 300)) == [True, True]
    # Its first save replaces an abandoned step folder and rotation deletes the rest of that branch.
    _save(root, 200, b"new branch")
    ckpt.rotate(root, keep_last=2)
    kept = [(s, _weights(f)) for s, f in ckpt.complete_checkpoints(root)]
    assert kept == ([(100, b"kept"), (200, b"new branch")] if restart == "older checkpoint" else [(200, b"new branch")])
    assert ckpt.resolve_resume("auto", root) == root / "step-000200"


def test_a_complete_partial_or_aside_folder_counts_as_a_run_s_results(tmp_path):
    """Crash recovery publishes such a folder before resume=auto picks one: the run-folder check must see it."""
    from emotrain.config import load_config, save_config
    from emotrain.train.run_folder import RunFolderConflict, check_run_folder

    out = tmp_path / "run"
    save_config(load_config(None, ["train.lr=2e-3"]), out / "config.yaml")
    _complete_partial(out / "checkpoints", 10, b"old run")
    with pytest.raises(RunFolderConflict, match=r"train.lr: 0.002 there, 0.0001 now"):
        check_run_folder(out, load_config(None, ["train.lr=1e-4"]))
    check_run_folder(out, load_config(None, ["train.lr=2e-3"]))  # the same config resumes it


def test_a_deepspeed_config_that_would_apply_non_finite_steps_is_refused():
    from emotrain.config import ConfigError
    from emotrain.train.deepspeed_config import check_skips_nonfinite_steps

    for stage in (1, 2, 3):
        check_skips_nonfinite_steps({"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}})
    check_skips_nonfinite_steps(json.loads((REPO / "launch" / "ds_zero2.json").read_text()) | {"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"zero_optimization.stage: is 0: DeepSpeed without ZeRO never skips"):
        check_skips_nonfinite_steps({"zero_optimization": {"stage": 0}})
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        check_skips_nonfinite_steps({"bf16": {"enabled": True}})  # no ZeRO section: stage 0
    with pytest.raises(ConfigError, match=r"bf16.check_grad_overflow: is false"):
        check_skips_nonfinite_steps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}})


def test_fp16_without_cuda_is_one_rule_for_every_strategy():
    from emotrain.config import ConfigError, load_config
    from emotrain.train.deepspeed_config import check_precision_available, fill_deepspeed_auto, training_precision

    assert training_precision("fp16", cuda=False) == "no"  # trains in fp32 (the recipe says so in the log)
    assert [training_precision(p, cuda=False) for p in ("no", "bf16")] == ["no", "bf16"]  # bf16 works on a CPU
    assert [training_precision(p, cuda=True) for p in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    # DeepSpeed's "auto" gets the precision the run trains in, not the config's.
    ds = json.loads((REPO / "launch" / "ds_zero3.json").read_text())
    fill_deepspeed_auto(ds, load_config(None, ["train.mixed_precision=fp16"]), mixed_precision="no")
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False
    check_precision_available(ds, cuda=False)
    # A launch file that enables fp16 itself cannot follow the rule on a CPU: refused, in one line.
    with pytest.raises(ConfigError, match=r"fp16.enabled: is true, but fp16 needs a CUDA GPU"):
        check_precision_available({"fp16": {"enabled": True}}, cuda=False)
    check_precision_available({"fp16": {"enabled": True}}, cuda=True)


def _complete_partial(root, step, weights):
    """A partial folder exactly as `finalize` leaves it just before publishing."""
    partial = ckpt.partial_dir(root, step)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(weights)
    ckpt.write_json(partial / ckpt.LOOP_STATE, {"step": step})
    ckpt.write_json(partial / ckpt.COMPLETE, {"step": step, "sequence": 99})
    return partial


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_recover_an_interrupted_replacement_at_every_crash_point(tmp_path):
    # Killed after the old folder went aside and the new one into place, before the aside was deleted.
    root = tmp_path / "a"
    _save(root, 100, b"other")
    _save(root, 200, b"old")
    os.rename(root / "step-000200", ckpt.aside_dir(root, 200))
    os.rename(_complete_partial(root, 200, b"new"), root / "step-000200")
    assert len(ckpt.recover(root)) == 1
    assert _names(root) == ["step-000100", "step-000200"] and _weights(root / "step-000200") == b"new"

    # Killed between the two renames: the old folder aside, the new one complete but still partial.
    root = tmp_path / "b"
    _save(root, 100, b"old")
    os.rename(root / "step-000100", ckpt.aside_dir(root, 100))
    _complete_partial(root, 100, b"new")
    done = ckpt.recover(root)
    assert len(done) == 1 and "rolled forward" in done[0]
    assert _names(root) == ["step-000100"] and _weights(root / "step-000100") == b"new"

    # Old folder aside, the partial not complete (cannot come from finalize, but roll back all the same).
    root = tmp_path / "c"
    _save(root, 100, b"old")
    os.rename(root / "step-000100", ckpt.aside_dir(root, 100))
    ckpt.partial_dir(root, 100).mkdir()
    assert ckpt.resolve_resume("auto", root) == root / "step-000100"  # resolve_resume recovers first
    assert _names(root) == [".partial-step-000100", "step-000100"] and _weights(root / "step-000100") == b"old"
    ckpt.rotate(root, keep_last=1)  # the incomplete partial is rotation's to delete
    assert _names(root) == ["step-000100"]

    # Killed while deleting the aside folder, the new one in place: a deletion renames the folder away
    # before removing anything, so no half-deleted aside folder is ever there for recover to restore.
    root = tmp_path / "d"
    _save(root, 100, b"old")
    os.rename(root / "step-000100", ckpt.aside_dir(root, 100))
    os.rename(_complete_partial(root, 100, b"new"), root / "step-000100")

    def die_in_rmtree(die):
        ckpt.shutil.rmtree = lambda *args, **kwargs: die()

    assert die_in_child(lambda die: ckpt.recover(root), fault=die_in_rmtree) == KILLED
    assert _names(root) == [".deleting-.replaced-step-000100", "step-000100"]
    assert ckpt.recover(root) == ["deleted .deleting-.replaced-step-000100: its deletion was cut short"]
    assert _names(root) == ["step-000100"] and _weights(root / "step-000100") == b"new"

    # A replacement set aside a step folder that was no complete checkpoint (still being copied in),
    # and its new folder never got complete: it is put back as it was, and left alone.
    root = tmp_path / "e"
    _save(root, 100, b"copied")
    (root / "step-000100" / ckpt.COMPLETE).unlink()
    os.rename(root / "step-000100", ckpt.aside_dir(root, 100))
    ckpt.recover(root)
    assert _names(root) == ["step-000100"] and _weights(root / "step-000100") == b"copied"
    assert ckpt.resolve_resume("auto", root) is None and _names(root) == ["step-000100"]


def test_recover_publishes_a_complete_partial(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 100, b"kept")
    _complete_partial(root, 200, b"new")  # killed after COMPLETE, before the rename
    ckpt.partial_dir(root, 300).mkdir()  # killed while the ranks were writing
    assert ckpt.latest_checkpoint(root) == root / "step-000100"
    ckpt.rotate(root, keep_last=1)  # leaves the complete partial to recover
    assert _names(root) == [".partial-step-000200", "step-000100"]
    ckpt.partial_dir(root, 300).mkdir()
    ckpt.recover(root)
    assert _names(root) == [".partial-step-000300", "step-000100", "step-000200"]
    assert _weights(root / "step-000200") == b"new" and ckpt.latest_checkpoint(root) == root / "step-000200"
    # The same, with the step folder still there (killed before it went aside): replaced.
    _complete_partial(root, 100, b"newer")
    ckpt.recover(root)
    assert _names(root) == [".partial-step-000300", "step-000100", "step-000200"]
    assert _weights(root / "step-000100") == b"newer"
    assert ckpt.recover(root) == []  # nothing left to do


def test_a_crash_while_replacing_a_step_never_loses_it(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 100, b"old")
    real_rename = os.rename

    def crash_on_publish(src, dst):
        if os.fspath(dst).endswith("step-000100") and ".partial-" in os.fspath(src):
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 100, b"new")
    monkeypatch.undo()
    assert "step-000100" not in _names(root)  # the moment a crash used to lose the step
    ckpt.recover(root)
    assert _names(root) == ["step-000100"] and _weights(root / "step-000100") == b"new"

    # Killed while deleting the aside folder: the new folder is in place, the rest is debris.
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _save(root, 100, b"newest")
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root) == root / "step-000100" and _weights(root / "step-000100") == b"newest"
    ckpt.recover(root)
    assert _names(root) == ["step-000100"] and _weights(root / "step-000100") == b"newest"


def test_preemption_by_signal_and_flag_file(tmp_path):
    def previous(signum, frame):  # a handler someone installed before: it must come back exactly
        pass

    original = {sig: signal.signal(sig, previous) for sig in STOP_SIGNALS}
    try:
        flag = tmp_path / "STOP"
        with PreemptionWatcher(flag) as watcher:
            assert all(signal.getsignal(sig) == watcher._handle for sig in STOP_SIGNALS)
            assert not watcher.requested()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert watcher.requested() and watcher.reason() == "signal SIGUSR1"
        assert all(signal.getsignal(sig) is previous for sig in STOP_SIGNALS)
        with PreemptionWatcher(flag, poll_seconds=0) as watcher:
            assert not watcher.requested()
            flag.write_text("")
            assert watcher.requested() and "flag file" in watcher.reason()
        assert all(signal.getsignal(sig) is previous for sig in STOP_SIGNALS)
        # The flag file is looked for at most every poll_seconds, not at every step.
        flag.unlink()
        with PreemptionWatcher(flag, poll_seconds=0.3) as watcher:
            assert not watcher.requested()
            flag.write_text("")
            assert not watcher.requested()  # within the interval: no stat yet
            time.sleep(0.35)
            assert watcher.requested()
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


def test_a_stop_flag_older_than_the_run_is_stale_and_a_fresh_one_is_a_request(tmp_path, monkeypatch):
    from emotrain.train.preemption import remove_stale_stop_flag, started_at, stop_flag_is_fresh

    since = time.time()
    flag = tmp_path / "STOP"
    flag.touch()
    os.utime(flag, (since - 60, since - 60))  # an earlier run's request, served
    assert not stop_flag_is_fresh(flag, since)
    with PreemptionWatcher(flag, poll_seconds=0, since=since) as watcher:
        assert not watcher.requested() and watcher.reason() == "nothing"
        assert not remove_stale_stop_flag(flag, since) and not flag.exists()  # setup removes it
        flag.touch()  # touched during this run (setup, or a step): a request, kept
        assert stop_flag_is_fresh(flag, since) and remove_stale_stop_flag(flag, since) and flag.exists()
        assert watcher.requested() and watcher.reason() == f"flag file {flag}"
    assert not stop_flag_is_fresh(tmp_path / "none", since)
    # The Slurm script says since when its job's flag counts (a flag touched while the launcher starts).
    monkeypatch.setenv("EMOTRAIN_STOP_FILE_SINCE", "1700000000")
    assert started_at() == 1700000000.0 and PreemptionWatcher().since == 1700000000.0
    monkeypatch.delenv("EMOTRAIN_STOP_FILE_SINCE")
    assert started_at() >= since  # else: now (a second run in this process does not take the first's flag)
    assert started_at(now=since + 5) == since + 5 and PreemptionWatcher().since >= since


def test_before_the_first_step_a_stop_signal_interrupts_at_once_and_only_once(tmp_path):
    from emotrain.train.preemption import StoppedBeforeFirstStep

    with PreemptionWatcher(tmp_path / "STOP", at_once=True) as watcher:
        with pytest.raises(StoppedBeforeFirstStep, match="signal SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # setup's long work: the handler raises within it
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, on the way out: only remembered
        assert watcher.requested() and not watcher.at_once
    with PreemptionWatcher(tmp_path / "STOP", at_once=True) as watcher:
        watcher.steps_begin()  # steps begin: a stop now waits for a step boundary (state to save)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.requested() and watcher.reason() == "signal SIGUSR1"
    assert not issubclass(StoppedBeforeFirstStep, Exception)  # no library's `except Exception` swallows it


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio_encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.text_encoder = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)
        self.audio_encoder[0].weight.requires_grad_(False)  # a frozen part


def test_parameter_groups_split_encoders_head_and_decay():
    from emotrain.config import ModelConfig

    model = _Tiny()
    cfg = TrainConfig(lr=1e-5, head_lr=1e-3, weight_decay=0.1)
    # A random (`tiny`) audio encoder learns at the head's lr; the pretrained text encoder at train.lr.
    random_audio = ModelConfig(audio_encoder="tiny", text_encoder="bert-base-uncased")
    listed = parameter_groups(model, cfg, random_audio)
    # Fixed order; the audio encoder's only decayed weight is frozen, so that group is left out.
    assert [g["name"] for g in listed] == [
        "audio_encoder_no_decay", "text_encoder", "text_encoder_no_decay", "head", "head_no_decay",
    ]
    groups = {g["name"]: g for g in listed}
    assert {name: g["lr"] for name, g in groups.items()} == {
        "audio_encoder_no_decay": 1e-3, "text_encoder": 1e-5, "text_encoder_no_decay": 1e-5,
        "head": 1e-3, "head_no_decay": 1e-3,
    }
    assert {name: g["weight_decay"] for name, g in groups.items()} == {
        "audio_encoder_no_decay": 0.0, "text_encoder": 0.1, "text_encoder_no_decay": 0.0,
        "head": 0.1, "head_no_decay": 0.0,
    }
    ids = lambda name: {id(p) for p in groups[name]["params"]}  # noqa: E731
    assert ids("audio_encoder_no_decay") == {id(p) for p in (model.audio_encoder[0].bias,
                                                             *model.audio_encoder[1].parameters())}
    assert ids("text_encoder") == {id(model.text_encoder.weight)}
    assert ids("text_encoder_no_decay") == {id(model.text_encoder.bias)}
    assert ids("head") == {id(model.classifier.weight)} and ids("head_no_decay") == {id(model.classifier.bias)}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)  # the frozen weight is left out

    def lrs(train_cfg, model_cfg):
        return {g["name"]: g["lr"] for g in parameter_groups(model, train_cfg, model_cfg)}

    # Both pretrained: train.lr; both random: train.head_lr; an encoder's own lr wins either way.
    pretrained = ModelConfig(audio_encoder="facebook/wav2vec2-base", text_encoder="bert-base-uncased")
    assert lrs(cfg, pretrained)["audio_encoder_no_decay"] == 1e-5
    assert lrs(cfg, ModelConfig())["text_encoder"] == 1e-3
    own = TrainConfig(lr=1e-5, head_lr=1e-3, audio_encoder_lr=3e-4, text_encoder_lr=2e-5)
    assert lrs(own, ModelConfig())["audio_encoder_no_decay"] == 3e-4
    assert lrs(own, pretrained)["text_encoder"] == 2e-5 and lrs(own, pretrained)["head"] == 1e-3


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


def test_the_fused_optimizer_is_chosen_by_config():
    import torch

    from emotrain.config import ModelConfig
    from emotrain.train.optim import build_optimizer

    model = nn.Sequential(nn.Linear(4, 4))
    fused = build_optimizer(model, TrainConfig(fused_optimizer=True), ModelConfig())
    assert fused.defaults["fused"] is True
    auto = build_optimizer(model, TrainConfig(), ModelConfig())
    assert bool(auto.defaults["fused"]) is torch.cuda.is_available()


def test_an_os_error_deciding_on_the_main_process_is_raised_on_every_rank(monkeypatch):
    """A full disk while rank 0 decides (the lock file, recovery) must not leave the other ranks
    waiting in the broadcast: every rank raises the same OSError, which the CLI says in one line."""
    import errno
    import os
    from types import SimpleNamespace

    import emotrain.train.recipe as recipe

    sent = []

    def broadcast(objects):  # rank 0 sends its outcome, the others receive it
        if sent:
            objects[:] = sent[0]
        else:
            sent.append(list(objects))

    monkeypatch.setattr(recipe, "broadcast_object_list", broadcast)

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/.lock")

    for is_main in (True, False):
        with pytest.raises(OSError) as err:
            recipe.decided_by_main(SimpleNamespace(is_main_process=is_main), full)
        assert (err.value.errno, err.value.filename) == (errno.ENOSPC, "/runs/x/.lock")
