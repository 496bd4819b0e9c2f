"""The training state saved and restored whole, and the learning rate as a function of the run's progress."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from accelerate.utils import DistributedType

from emotrain.config import ConfigError, ModelConfig, TrainConfig
from emotrain.data.evaluation import EvalDataset, check_validation_set
from emotrain.data.folds import make_fold_split, read_metadata
from emotrain.data.plan import StreamSettings
from emotrain.data.stream import TrainStream
from emotrain.train import checkpoint as ckpt
from emotrain.train.checkpoint import stream_state_path
from emotrain.train.optim import (
    build_optimizer,
    epoch_shares,
    lr_factor,
    run_progress,
    set_learning_rates,
    step_lr_factor,
    stream_epoch_shares,
)
from emotrain.train.state import (
    LogWindow,
    Progress,
    TrainingState,
    check_resumable,
    load_checkpoint,
    read_progress,
    rng_state_problem,
)
from tests.toyset import toy_processors, write_toy_prepared

# ---------------------------------------------------------------------------------------------
# Progress and the whole state.


def test_progress_from_older_checkpoints_and_unknown_fields():
    old = {"epoch": 2, "step": 300, "best_ua": 0.6, "best_step": 200, "best_validation": None,
           "evaluations_without_improvement": 1, "consecutive_nonfinite": 0, "nonfinite_steps": 0,
           "stop_reason": None, "run_id": "abc"}
    progress = Progress.from_dict(old)
    assert (progress.step, progress.run_id) == (300, "abc")
    assert (progress.pending_evaluation, progress.world_size, progress.distributed_type, progress.zero_stage) == (
        False, 1, "NO", 0)
    again = Progress(step=5, pending_evaluation=True, world_size=4, distributed_type="DEEPSPEED", zero_stage=3)
    assert Progress.from_dict(json.loads(json.dumps(again.to_dict()))) == again
    with pytest.raises(ValueError, match="unknown field.*learning_rate"):
        Progress.from_dict({**old, "learning_rate": 1e-5})


def test_progress_counts_validations_and_steps():
    progress = Progress(step=4)
    assert progress.record_validation(0.5, {"ua": 0.5}) and (progress.best_step, progress.last_evaluation_step) == (4, 4)
    progress.record_step(applied=False)
    progress.record_step(applied=False)
    assert (progress.step, progress.consecutive_nonfinite, progress.nonfinite_steps) == (6, 2, 2)
    assert not progress.record_validation(0.5, {"ua": 0.5})  # equal is not better
    assert (progress.best_step, progress.evaluations_without_improvement) == (4, 1)
    progress.record_step(applied=True)
    assert (progress.consecutive_nonfinite, progress.nonfinite_steps) == (0, 2)


def _now(distributed_type, world_size, zero_stage):
    return {"distributed_type": distributed_type, "world_size": world_size, "zero_stage": zero_stage}


def test_check_resumable_refuses_what_cannot_be_restored():
    ddp = Progress(distributed_type="MULTI_GPU", world_size=2, zero_stage=0)
    check_resumable(ddp, _now("MULTI_GPU", 4, 0))  # DDP onto another world size: the stream re-plans
    check_resumable(ddp, _now("NO", 1, 0))
    zero2 = Progress(distributed_type="DEEPSPEED", world_size=2, zero_stage=2)
    check_resumable(zero2, _now("DEEPSPEED", 2, 2))
    with pytest.raises(ckpt.ResumeError, match="DeepSpeed and DDP checkpoints hold different files"):
        check_resumable(zero2, _now("MULTI_GPU", 2, 0))
    with pytest.raises(ckpt.ResumeError, match="DeepSpeed and DDP checkpoints hold different files"):
        check_resumable(ddp, _now("DEEPSPEED", 2, 2))
    with pytest.raises(ckpt.ResumeError, match=r"written by 2 DeepSpeed ZeRO-2 processes and this run has 4 \(ZeRO-2\)"):
        check_resumable(zero2, _now("DEEPSPEED", 4, 2))
    with pytest.raises(ckpt.ResumeError, match=r"this run has 2 \(ZeRO-3\)"):
        check_resumable(zero2, _now("DEEPSPEED", 2, 3))


def _write_rng_state(folder, rank: int) -> None:
    """A rank's RNG state file as Accelerate's `save_state` writes it (the part `load_state` reads first)."""
    torch.save({"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, Path(folder) / f"random_states_{rank}.pkl")


class _FakeAccelerator:
    """One process, as far as TrainingState can tell."""

    def __init__(self, distributed_type=DistributedType.NO, num_processes=1, zero_stage=None):
        self.is_main_process, self.process_index, self.num_processes = True, 0, num_processes
        self.distributed_type = distributed_type
        plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
        self.state = SimpleNamespace(deepspeed_plugin=plugin)
        self.device = torch.device("cpu")
        self.loaded = []
        self.optimizer = self.optimizer_state = None

    def wait_for_everyone(self):
        pass

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def save_state(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        _write_rng_state(folder, self.process_index)

    def load_state(self, folder):
        self.loaded.append(folder)
        if self.optimizer_state is not None:  # what Accelerate restores into the prepared optimizer
            self.optimizer.load_state_dict(self.optimizer_state)


class _FakeStream:
    def __init__(self, state=None):
        self.state, self.loaded = state or {}, None

    def state_dict(self):
        return self.state

    def load_state_dicts(self, states):
        self.loaded = states


def _state(accelerator, progress=None, stream_state=None) -> TrainingState:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, TrainConfig(head_lr=3e-3), ModelConfig())
    return TrainingState(model=model, optimizer=optimizer, stream=_FakeStream(stream_state),
                         progress=progress or Progress(), window=LogWindow(accelerator.device))


def test_the_whole_state_is_saved_and_restored_in_one_call(tmp_path):
    root = tmp_path / "checkpoints"
    accelerator = _FakeAccelerator(DistributedType.DEEPSPEED, num_processes=1, zero_stage=2)
    state = _state(accelerator, Progress(step=100, best_step=100, run_id="abc"), {"epoch": 0, "position": 7})
    state.window.add_batch({"ids": ["a", "b"], "audio_seconds": 3.0, "padded_audio_seconds": 4.0}, waited_seconds=0.5)
    state.window.add_step(torch.tensor(1.5, dtype=torch.float64), valid=2)
    ckpt.partial_dir(root, 100).mkdir(parents=True)  # debris of a killed save
    (ckpt.partial_dir(root, 100) / "junk").write_text("")
    folder = state.save(accelerator, root, config_yaml="experiment: x\n", keep_last=1)
    assert folder == root / "step-000100" and not (folder / "junk").exists()
    assert state.progress.world_size == 1 and state.progress.distributed_type == "NO"  # the writer is only on disk
    saved = read_progress(folder)
    assert (saved.step, saved.run_id, saved.distributed_type, saved.zero_stage) == (100, "abc", "DEEPSPEED", 2)

    restored = _state(accelerator)
    restored.restore(accelerator, folder)
    assert restored.progress == saved and restored.stream.loaded == [{"epoch": 0, "position": 7}]
    assert accelerator.loaded == [str(folder)]
    totals = restored.window.totals(accelerator)  # the log window goes on where it was
    assert (totals["loss"], totals["valid"], totals["utterances"], totals["steps"]) == (1.5, 2, 2, 1)

    # A strategy that cannot continue it is refused before anything loads.
    with pytest.raises(ckpt.ResumeError, match="DeepSpeed and DDP"):
        _state(accelerator).restore(_FakeAccelerator(DistributedType.MULTI_GPU, num_processes=2), folder)
    assert accelerator.loaded == [str(folder)]


def test_a_checkpoint_from_before_peak_lr_existed_resumes_with_the_config_s_peaks(tmp_path):
    """Checkpoints written under the step-count scheduler hold param groups without `peak_lr` (and with
    its `initial_lr`): loading one must leave the groups able to take the run's lr."""
    root = tmp_path / "checkpoints"
    accelerator = _FakeAccelerator()
    folder = _state(accelerator, Progress(step=3)).save(accelerator, root, config_yaml="x: 1\n", keep_last=1)
    state = _state(accelerator)
    old = state.optimizer.state_dict()
    for group in old["param_groups"]:
        group.pop("peak_lr")
        group.update(lr=1e-9, initial_lr=3e-3)
    accelerator.optimizer, accelerator.optimizer_state = state.optimizer, old
    state.restore(accelerator, folder)
    set_learning_rates(state.optimizer, 0.5)
    assert [group["lr"] for group in state.optimizer.param_groups] == [1.5e-3] * len(old["param_groups"])


def test_restore_reads_the_stream_state_of_every_rank_in_rank_order(tmp_path):
    folder = tmp_path / "step-000100"
    folder.mkdir()
    ckpt.write_json(folder / ckpt.LOOP_STATE, Progress(step=100, world_size=11).to_dict())
    for rank in range(11):  # rank 10 sorts before rank 2 by name
        ckpt.write_json(stream_state_path(folder, rank), {"rank": rank})
    _write_rng_state(folder, 0)
    accelerator = _FakeAccelerator()
    state = _state(accelerator)
    state.restore(accelerator, folder)
    assert state.stream.loaded == [{"rank": rank} for rank in range(11)]

    stream_state_path(folder, 3).unlink()
    with pytest.raises(ckpt.ResumeError, match=r"cannot resume from .*step-000100.*rank.*3"):
        _state(accelerator).restore(accelerator, folder)
    stream_state_path(folder, 10).unlink()  # ranks 0..9 minus 3: still one missing
    with pytest.raises(ckpt.ResumeError, match="rank.*3"):
        _state(accelerator).restore(accelerator, folder)
    ckpt.write_json(stream_state_path(folder, 3), {"rank": 3})  # 0..9 whole, but 11 wrote it
    with pytest.raises(ckpt.ResumeError, match="10"):
        _state(accelerator).restore(accelerator, folder)
    assert accelerator.loaded == [str(folder)]  # checked before the (slow) load_state


class _TouchesAFile:
    """Pickled, it names `open(path, "w")`: loading it with weights_only=False would create `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture
def real_accelerator():
    """Accelerate itself, one CPU process (it keeps its state in singletons: reset around)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_an_rng_state_that_does_not_load_fails_the_resume_where_accelerate_would_go_on(tmp_path, real_accelerator):
    """Accelerate's load_state catches a failure to load `random_states_<r>.pkl` and only logs it:
    the resumed run would silently diverge. Garbage, a pickle weights_only refuses, a missing file."""
    accelerator = real_accelerator
    model = torch.nn.Linear(2, 2)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    folder = tmp_path / "step-000004"
    accelerator.save_state(str(folder))
    ckpt.write_json(folder / ckpt.LOOP_STATE, Progress(step=4, world_size=1).to_dict())
    load_checkpoint(accelerator, folder)
    assert rng_state_problem(folder) is None
    rng = folder / "random_states_0.pkl"

    rng.write_bytes(b"garbage")
    accelerator.load_state(str(folder))  # what it does on its own: nothing to see
    with pytest.raises(ckpt.ResumeError, match=r"cannot resume from .*step-000004: random_states_0.pkl does not "
                                               r"load \(UnpicklingError: .*\); the resumed run would not be the same"):
        load_checkpoint(accelerator, folder)
    assert rng_state_problem(folder).startswith("is damaged (random_states_0.pkl does not load (UnpicklingError")

    torch.save({"random_state": _TouchesAFile(tmp_path / "pwned")}, rng)
    with pytest.raises(ckpt.ResumeError, match=r"random_states_0.pkl does not load \(UnpicklingError: "
                                               r"Unsupported global: GLOBAL io.open"):
        load_checkpoint(accelerator, folder)
    assert "io.open" in rng_state_problem(folder)
    assert not (tmp_path / "pwned").exists()

    rng.unlink()
    assert rng_state_problem(folder) == "is damaged (random_states_0.pkl: missing)"
    torch.save({"random_state": None}, rng)  # loads; the other rank that wrote the checkpoint has none
    ckpt.write_json(folder / ckpt.LOOP_STATE, Progress(step=4, world_size=2).to_dict())
    assert rng_state_problem(folder) == "is damaged (random_states_1.pkl: missing)"


def test_a_rank_the_writer_did_not_have_needs_no_rng_state_but_one_it_had_does(tmp_path):
    """A DDP run resumed on more processes: rank 1 of 2 continues a checkpoint one process wrote."""
    root = tmp_path / "checkpoints"
    folder = _state(_FakeAccelerator(), Progress(step=2)).save(_FakeAccelerator(), root, config_yaml="", keep_last=1)
    second_rank = _FakeAccelerator(num_processes=2)
    second_rank.process_index = 1
    load_checkpoint(second_rank, folder)
    assert second_rank.loaded == [str(folder)]
    ckpt.write_json(folder / ckpt.LOOP_STATE, Progress(step=2, world_size=2).to_dict())  # but 2 wrote it
    with pytest.raises(ckpt.ResumeError, match="random_states_1.pkl: missing"):
        load_checkpoint(second_rank, folder)


def test_a_checkpoint_file_that_does_not_load_is_one_line_naming_the_folder(tmp_path, real_accelerator):
    accelerator = real_accelerator
    accelerator.prepare(torch.nn.Linear(2, 2))
    folder = tmp_path / "step-000004"
    accelerator.save_state(str(folder))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ckpt.ResumeError) as refused:
        load_checkpoint(accelerator, folder)
    assert str(refused.value).startswith(f"cannot load checkpoint {folder} (SafetensorError: ")
    assert "\n" not in str(refused.value)


class _DiskFullAccelerator(_FakeAccelerator):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def save_state(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"w" * 1000)  # what fitted
        raise self.error


def _chained(error: Exception, cause: Exception) -> Exception:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(("error", "free", "free_text"), [
    (RuntimeError("unexpected pos 1088 vs 1024"), 200 << 10, "0.2 MB"),  # torch's writer: only the space tells
    (RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file "
                  "write failed"), 200 << 10, "0.2 MB"),
    (OSError(errno.ENOSPC, "No space left on device"), 200 << 10, "0.2 MB"),
    # the cause chain tells, whatever the message says and is free by the time we look
    (_chained(RuntimeError("writing failed"), OSError(errno.EDQUOT, "Disk quota exceeded")), 50 << 30, "51200 MB"),
    # safetensors wraps the OS error in its own; the error tells, whatever is free by the time we look
    (RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                  'device" })'), 50 << 30, "51200 MB"),
])
def test_a_save_that_runs_out_of_disk_space_says_so_and_what_a_checkpoint_needs(tmp_path, monkeypatch, error, free,
                                                                                 free_text):
    root = tmp_path / "checkpoints"
    accelerator = _FakeAccelerator()
    _state(accelerator, Progress(step=2)).save(accelerator, root, config_yaml="x: 1\n", keep_last=2)
    previous = sum(path.stat().st_size for path in (root / "step-000002").iterdir())
    monkeypatch.setattr("emotrain.train.state.shutil.disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(OSError) as full:
        _state(accelerator, Progress(step=4)).save(_DiskFullAccelerator(error), root, config_yaml="x: 1\n", keep_last=2)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(root) and full.value.__cause__ is error
    assert full.value.strerror == (
        f"no space left on device while saving checkpoint step-000004 ({error.__class__.__name__}: {error}); it needs "
        f"about {previous / 2**20:.1f} MB, {free_text} free there; free space and rerun: the run resumes from its last "
        "complete checkpoint")
    assert ckpt.latest_checkpoint(root) == root / "step-000002"  # nothing lost


@pytest.mark.parametrize(("error", "free"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), 50 << 30),
    # Not a word of the disk: not called a full disk, however little is free (a guess would mislabel them).
    (RuntimeError("CUDA error: an illegal memory access was encountered"), 200 << 10),
    (OSError(errno.EIO, "Input/output error"), 200 << 10),
    (PermissionError(errno.EACCES, "Permission denied"), 200 << 10),
    (_chained(RuntimeError("serializing failed"), OSError(errno.EROFS, "Read-only file system")), 200 << 10),
    # torch's writer failing without a reason, with room to spare: something else than space
    (RuntimeError("unexpected pos 1088 vs 1024"), 50 << 30),
])
def test_a_save_failure_that_is_not_the_disk_goes_on_as_it_was(tmp_path, monkeypatch, error, free):
    root = tmp_path / "checkpoints"
    monkeypatch.setattr("emotrain.train.state.shutil.disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(type(error)) as raised:
        _state(_FakeAccelerator(), Progress(step=2)).save(_DiskFullAccelerator(error), root, config_yaml="",
                                                          keep_last=2)
    assert raised.value is error


def test_with_no_checkpoint_yet_the_space_needed_is_that_of_the_model_and_optimizer(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    state = _state(_FakeAccelerator(), Progress(step=2))
    state.model = torch.nn.Linear(1024, 1024)  # 4 MB of weights
    monkeypatch.setattr("emotrain.train.state.shutil.disk_usage", lambda path: SimpleNamespace(free=2 << 20))
    with pytest.raises(OSError, match=r"unexpected pos.*it needs about 4.0 MB, 2.0 MB free there"):
        state.save(_DiskFullAccelerator(RuntimeError("unexpected pos 1")), root, config_yaml="", keep_last=2)


# ---------------------------------------------------------------------------------------------
# The learning rate.


def test_the_lr_warms_up_then_decays_over_the_run_s_progress():
    steps = 100
    factors = [lr_factor(s / steps, (s + 1) / steps, warmup=0.1, schedule="linear") for s in range(steps)]
    # With equal steps: warm-up over 10 steps reaching 1 at the 10th, none at lr 0, then linear decay.
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert factors[-1] == pytest.approx(1 / 90) and min(factors) > 0
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert lr_factor(1.0, 1.0, warmup=0.1, schedule="cosine") == pytest.approx(0.0)
    assert lr_factor(0.55, 0.56, warmup=0.1, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(0.7, 0.71, warmup=0.1, schedule="constant") == 1.0
    assert lr_factor(0.0, 0.01, warmup=0.0, schedule="linear") == 1.0  # no warm-up


def test_run_progress_counts_data_or_max_steps_whichever_ends_the_run():
    assert run_progress(epoch=1, epoch_share=0.5, step=999, max_epochs=4, max_steps=0) == 0.375
    assert run_progress(epoch=0, epoch_share=0.1, step=30, max_epochs=4, max_steps=60) == 0.5
    assert run_progress(epoch=3, epoch_share=1.0, step=10, max_epochs=4, max_steps=60) == 1.0
    np.testing.assert_allclose(epoch_shares(np.array([3, 1, 4])), [0, 3 / 8, 4 / 8, 1])
    np.testing.assert_allclose(epoch_shares(np.array([2, 2]), consumed_before=4), [0.5, 0.75, 1.0])


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    root = str(write_toy_prepared(tmp_path_factory.mktemp("prepared"), per_session=[14, 16, 15, 17, 13], num_shards=3))
    return make_fold_split(root, 1, validation="speakers", validation_speakers=1, seed=5, meta=read_metadata(root))


def _stream(split, rank, world_size):
    fe, tok = toy_processors()
    settings = StreamSettings(seed=3, batch_size=4, batching="bucket", max_batch_audio_seconds=2.4, bucket_buffer_size=10,
                              shuffle_buffer_size=6, max_audio_seconds=0.8, random_crop=True, max_text_tokens=12)
    return TrainStream(split, settings, feature_extractor=fe, tokenizer=tok, rank=rank, world_size=world_size)


def _factors(stream, cfg, epoch, step):
    """The recipe's lr factor for every step left in the stream's epoch (its fit loop, without training)."""
    shares = stream_epoch_shares(stream)  # what `fit` computes for the epoch
    out = []
    for k in range(stream.steps_done, len(shares) - 1):
        out.append(step_lr_factor(cfg, epoch=epoch, step=step, share_before=float(shares[k]),
                                  share_after=float(shares[k + 1])))
        step += 1
    return out


def test_the_lr_curve_continues_across_a_resume_on_another_world_size(toy_split):
    """2 ranks stopped at step 3, resumed on 1: the next step's lr continues the curve of the data seen,
    where a schedule in steps, rebuilt for the new step count, would jump (issue 16, defect 4)."""
    cfg = TrainConfig(max_epochs=2, warmup_ratio=0.25, lr_schedule="linear")
    two = [_stream(toy_split, rank, 2) for rank in range(2)]
    before = _factors(two[0], cfg, epoch=0, step=0)
    stopped_at = 3
    for stream in two:
        batches = iter(stream)
        for _ in range(stopped_at):
            next(batches)
        batches.close()
    one = _stream(toy_split, 0, 1)
    one.load_state_dicts([json.loads(json.dumps(s.state_dict())) for s in two])
    after = _factors(one, cfg, epoch=0, step=stopped_at)
    seen = sum(two[0].step_utterances()[:stopped_at])
    total = sum(two[0].step_utterances())
    assert int(one.consumed.sum()) == seen and seen + sum(one.step_utterances()) == total
    # Warm-up (a quarter of 2 epochs = half an epoch) was still on: each lr is the share of data seen over it.
    assert before[stopped_at - 1] == pytest.approx(seen / total / 2 / 0.25)
    next_share = (seen + one.step_utterances()[0]) / total / 2
    assert after[0] == pytest.approx(min(next_share / 0.25, 1.0))
    # The curve rises on from where it stopped (continuous in the data seen), never back to an earlier value.
    assert before[stopped_at - 1] < after[0] <= 1.0
    # A schedule in steps rebuilt from the new total (today's bug) would have given step 4 of the new count.
    steps_one = stopped_at + len(one.step_utterances()) + _stream(toy_split, 0, 1).steps_in_epoch(1)
    in_steps = (stopped_at + 1) / int(cfg.warmup_ratio * steps_one)
    assert abs(in_steps - after[0]) > 0.05


# ---------------------------------------------------------------------------------------------
# A validation set that could never score a model is refused before training.


def toy_split_audio(split) -> bytes:
    return _eval_set(split, split.validation_ids).audio[0].as_py()


def _eval_set(split, ids):
    return EvalDataset(split.meta, ids, name="validation")


def test_an_empty_or_undecodable_validation_set_is_refused_before_training(toy_split, tmp_path):
    check_validation_set(_eval_set(toy_split, toy_split.validation_ids), fold=1)  # a normal one passes
    with pytest.raises(ConfigError, match=r"data.validation: fold 1 has no validation utterances"):
        check_validation_set(_eval_set(toy_split, []), fold=1)
    damaged = _eval_set(toy_split, toy_split.validation_ids)
    damaged.audio = pa.array([b"not audio"] * len(damaged), type=pa.binary())
    with pytest.raises(ConfigError, match=r"data.path: none of the \d+ validation utterances of fold 1 can be decoded"):
        check_validation_set(damaged, fold=1)
    damaged.audio = pa.array([b"not audio"] * (len(damaged) - 1) + [toy_split_audio(toy_split)], type=pa.binary())
    check_validation_set(damaged, fold=1)  # one that decodes is enough to score


def test_the_best_checkpoint_is_this_run_s_never_an_abandoned_attempt_s(tmp_path):
    """Started from run A's step 500 in folder B, where an older attempt left its own step 200 (marked
    abandoned): the best step 200 is A's, not B's stale folder of the same name."""
    from emotrain.train.recipe import _best_checkpoint
    from emotrain.train.run_folder import RunFolder

    def complete(folder):
        folder.mkdir(parents=True)
        ckpt.write_json(folder / ckpt.COMPLETE, {"step": int(folder.name[5:]), "sequence": 1})
        return folder

    theirs = complete(tmp_path / "A" / "checkpoints" / "step-000200")
    stale = complete(tmp_path / "B" / "checkpoints" / "step-000200")
    (stale / ckpt.ABANDONED).write_text("an older attempt\n")
    run = SimpleNamespace(run=RunFolder(tmp_path / "B"), state=SimpleNamespace(progress=Progress(best_step=200)),
                          resumed_from=complete(tmp_path / "A" / "checkpoints" / "step-000500"))
    assert _best_checkpoint(run) == theirs
    (stale / ckpt.ABANDONED).unlink()  # B's own, current: it wins
    assert _best_checkpoint(run) == stale


def test_a_damaged_best_checkpoint_is_one_line_before_the_end_loads_it(tmp_path):
    from emotrain.train.recipe import _best_checkpoint
    from emotrain.train.run_folder import RunFolder

    root = tmp_path / "run" / "checkpoints"
    ckpt.partial_dir(root, 200).mkdir(parents=True)
    (ckpt.partial_dir(root, 200) / "model.safetensors").write_bytes(b"weights")
    folder = ckpt.finalize(root, 200, Progress(step=200).to_dict(), "x: 1\n")
    run = SimpleNamespace(run=RunFolder(tmp_path / "run"), state=SimpleNamespace(progress=Progress(best_step=200)),
                          resumed_from=None)
    assert _best_checkpoint(run) == folder
    (folder / "model.safetensors").write_bytes(b"w")
    with pytest.raises(ckpt.ResumeError, match=r"^the best checkpoint .*step-000200 is damaged \(model.safetensors: "
                                               r"1 bytes, 7 recorded\): best/ cannot be exported nor tested"):
        _best_checkpoint(run)
