"""The checkpoint store when a run restarts from an explicitly chosen checkpoint: the chosen branch
is current again, and its best checkpoint survives rotation."""

from __future__ import annotations

import pytest

from emotrain.train import checkpoint as ckpt
from tests.faults import KILLED, die_in_child


def _save(root, step: int, best_step: int, keep_last: int = 2, weights: bytes = b"weights"):
    """What `save_checkpoint` does on the main process, without Accelerate: publish, then rotate
    keeping the best step the saved loop state names."""
    partial = ckpt.partial_dir(root, step)
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(weights)
    folder = ckpt.finalize(root, step, {"step": step, "best_step": best_step}, "experiment: x\n")
    ckpt.rotate(root, keep_last, keep_steps={best_step})
    return folder


def _steps(root) -> list[tuple[int, bool]]:
    return [(step, ckpt.is_abandoned(folder)) for step, folder in ckpt.complete_checkpoints(root)]


def test_resuming_explicitly_from_an_abandoned_checkpoint_keeps_its_best(tmp_path):
    """The sequence of defect 3: a run (best at step 200) restarted with resume=never by mistake and
    killed before its first save; then train.resume=<its step 300>."""
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step, best_step=200 if step >= 200 else 100)
    assert _steps(root) == [(200, False), (300, False)]  # keep_last=2, and the best
    assert ckpt.resolve_resume("never", root) is None  # ... killed before it saved anything
    assert _steps(root) == [(200, True), (300, True)]
    chosen = root / "step-000300"
    assert ckpt.resolve_resume(str(chosen), root) == chosen
    assert _steps(root) == [(200, False), (300, False)]  # the chosen branch is current again
    assert ckpt.read_json(chosen / ckpt.LOOP_STATE)["best_step"] == 200
    # The resumed run saves twice (keep_last=2, the best still 200): its best is never rotated away.
    _save(root, 400, best_step=200)
    _save(root, 500, best_step=200)
    assert _steps(root) == [(200, False), (400, False), (500, False)]
    assert ckpt.resolve_resume("auto", root) == root / "step-000500"


def test_choosing_an_abandoned_checkpoint_abandons_those_written_after_it(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step, best_step=100, keep_last=3)
    ckpt.resolve_resume("never", root)
    chosen = root / "step-000200"
    assert ckpt.resolve_resume(str(chosen), root) == chosen
    assert _steps(root) == [(100, False), (200, False), (300, True)]
    assert ckpt.resolve_resume("auto", root) == chosen  # (killed again before a save: the same place)
    _save(root, 300, best_step=100, keep_last=3, weights=b"new branch")  # replaces the abandoned 300
    assert _steps(root) == [(100, False), (200, False), (300, False)]
    assert (root / "step-000300" / "model.safetensors").read_bytes() == b"new branch"


def test_rotation_never_deletes_the_best_step_even_if_marked_abandoned(tmp_path):
    """A restart cut short between its marker writes may leave the best step's folder marked."""
    root = tmp_path / "checkpoints"
    for step in (100, 200):
        _save(root, step, best_step=100)
    (root / "step-000100" / ckpt.ABANDONED).write_text("cut short\n")
    _save(root, 300, best_step=100, keep_last=1)
    assert [step for step, _ in _steps(root)] == [100, 300]


# ---------------------------------------------------------------------------------------------
# Damage after the save: the manifest, and what resume does with a damaged checkpoint.


def _saved(root, *steps: int, deepspeed: bool = False):
    for step in steps:
        partial = ckpt.partial_dir(root, step)
        (partial / "pytorch_model").mkdir(parents=True)  # DeepSpeed's shards live in a subfolder
        (partial / "model.safetensors").write_bytes(b"weights %d" % step)
        (partial / "pytorch_model" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"rank 1's shard")
        ckpt.finalize(root, step, {"step": step, "distributed_type": "DEEPSPEED" if deepspeed else "NO"}, "x: 1\n")
    return [root / ckpt.checkpoint_name(step) for step in steps]


def test_the_manifest_records_every_file_and_finds_each_kind_of_damage(tmp_path):
    (folder,) = _saved(tmp_path, 4)
    files = ckpt.read_json(folder / ckpt.MANIFEST)["files"]
    assert sorted(files) == ["config.yaml", "loop_state.json", "model.safetensors",
                             "pytorch_model/zero_pp_rank_1_optim_states.pt"]
    assert files["model.safetensors"]["size"] == len(b"weights 4")
    assert ckpt.checkpoint_problem(folder) is None
    model, shard = folder / "model.safetensors", folder / "pytorch_model" / "zero_pp_rank_1_optim_states.pt"

    model.write_bytes(b"weig")
    assert ckpt.checkpoint_problem(folder) == "is damaged (model.safetensors: 4 bytes, 9 recorded)"
    model.write_bytes(b"weights 5")  # same size, other bytes: only the hash tells
    assert ckpt.checkpoint_problem(folder) == ("is damaged (model.safetensors: its sha256 differs from the one "
                                               "recorded at save)")
    model.unlink()
    model.mkdir()
    assert ckpt.checkpoint_problem(folder) == "is damaged (model.safetensors: a directory in place of the file)"
    model.rmdir()
    assert ckpt.checkpoint_problem(folder) == "is damaged (model.safetensors: missing)"
    model.write_bytes(b"weights 4")
    shard.write_bytes(b"rank 1's shard, grown")
    assert "pytorch_model/zero_pp_rank_1_optim_states.pt: 21 bytes, 14 recorded" in ckpt.checkpoint_problem(folder)
    shard.write_bytes(b"rank 1's shard")
    assert ckpt.checkpoint_problem(folder) is None
    # A file added since the save, which Accelerate or DeepSpeed might load: anywhere in the folder.
    (folder / "random_states_1.pkl").write_bytes(b"not saved by this run")
    assert ckpt.checkpoint_problem(folder) == ("is damaged (random_states_1.pkl: not in the manifest written "
                                               "at save)")
    (folder / "random_states_1.pkl").unlink()
    (folder / "pytorch_model" / "zero_pp_rank_2_optim_states.pt").write_bytes(b"")
    assert ckpt.checkpoint_problem(folder) == ("is damaged (pytorch_model/zero_pp_rank_2_optim_states.pt: not in "
                                               "the manifest written at save)")
    (folder / "pytorch_model" / "zero_pp_rank_2_optim_states.pt").unlink()
    (folder / ckpt.ABANDONED).write_text("a restart\n")  # the markers, written after the manifest, are not files of it
    assert ckpt.checkpoint_problem(folder) is None
    (folder / ckpt.MANIFEST).write_text("{not json")
    assert ckpt.checkpoint_problem(folder) == "is damaged (manifest.json is unreadable (JSONDecodeError))"


def test_a_checkpoint_without_manifest_loads_unless_deepspeed_wrote_it(tmp_path):
    """Written before the manifest existed: nothing to compare. DeepSpeed loads with
    weights_only=False, so its unverifiable checkpoints are refused."""
    (plain,) = _saved(tmp_path / "plain", 2)
    (deepspeed,) = _saved(tmp_path / "ds", 2, deepspeed=True)
    assert ckpt.checkpoint_problem(deepspeed) is None  # with its manifest: verified, fine
    for folder in (plain, deepspeed):
        (folder / ckpt.MANIFEST).unlink()
    assert ckpt.checkpoint_problem(plain) is None
    assert ckpt.checkpoint_problem(deepspeed).startswith("is refused (a DeepSpeed checkpoint without manifest.json")
    with pytest.raises(ckpt.ResumeError, match=r"train.resume=.*step-000002 is refused .*weights_only=False"):
        ckpt.resolve_resume(str(deepspeed), tmp_path / "ds")


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    two, four, six = _saved(root, 2, 4, 6)
    (six / "model.safetensors").write_bytes(b"w")
    verified = []

    def check_loads(folder):
        verified.append(folder.name)
        return "is damaged (random_states_0.pkl does not load)" if folder == four else None

    with caplog.at_level("WARNING", logger="emotrain.train"):
        assert ckpt.resolve_resume("auto", root, check_loads=check_loads) == two
    assert verified == ["step-000004", "step-000002"]  # six failed before its loads were checked
    assert [record.getMessage() for record in caplog.records] == [
        "checkpoint step-000006 is damaged (model.safetensors: 1 bytes, 9 recorded): resuming from step-000002 instead",
        "checkpoint step-000004 is damaged (random_states_0.pkl does not load): resuming from step-000002 instead",
        "checkpoints step-000004, step-000006 belong to an abandoned branch (damaged, train.resume=auto resumed "
        "from step-000002 instead): never resumed, deleted at the next save",
    ]
    # Falling back is choosing step 2: the damaged ones are abandoned, so the next start (killed
    # before a save) neither hashes nor warns about them again ...
    assert _steps(root) == [(2, False), (4, True), (6, True)]
    verified.clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="emotrain.train"):
        assert ckpt.resolve_resume("auto", root, check_loads=check_loads) == two
    assert verified == ["step-000002"] and caplog.records == []
    # ... an explicit choice of one is still refused, naming the damage ...
    with pytest.raises(ckpt.ResumeError, match=r"train.resume=.*step-000006 is damaged \(model.safetensors.*"
                                               r"train.resume=never or in another output_dir"):
        ckpt.resolve_resume(str(six), root)
    # ... and the next save (step 4 again, as the run resumed from step 2 goes on) rotates step 6 away.
    _saved(root, 4)
    ckpt.rotate(root, keep_last=3)
    assert _steps(root) == [(2, False), (4, False)] and ckpt.checkpoint_problem(four) is None


def test_resume_auto_with_no_intact_checkpoint_names_each_and_changes_nothing(tmp_path):
    root = tmp_path / "checkpoints"
    two, four, six = _saved(root, 2, 4, 6)
    (six / "model.safetensors").write_bytes(b"w")
    (two / "optimizer.bin").mkdir()  # an empty folder: no file the manifest would list
    assert ckpt.checkpoint_problem(two) is None
    (two / "model.safetensors").unlink()
    with pytest.raises(ckpt.ResumeError) as refused:
        ckpt.resolve_resume("auto", root, check_loads=lambda folder: (
            "is damaged (random_states_0.pkl does not load)" if folder == four else None))
    assert str(refused.value) == (
        f"no checkpoint in {root} can be resumed: checkpoint step-000006 is damaged (model.safetensors: 1 bytes, "
        "9 recorded); checkpoint step-000004 is damaged (random_states_0.pkl does not load); checkpoint "
        "step-000002 is damaged (model.safetensors: missing). Start afresh with train.resume=never (they are "
        "then abandoned and deleted) or use another output_dir")
    assert not any(ckpt.is_abandoned(folder) for folder in (two, four, six))  # refusing changes nothing


def _die_in_rmtree(die):
    ckpt.shutil.rmtree = lambda *args, **kwargs: die()


def test_a_deletion_cut_short_is_finished(tmp_path):
    """A deletion renames the folder to `.deleting-<name>` first: killed while removing it, only that
    name is left, which nothing but a deletion makes. Recovery and rotation finish it."""
    root = tmp_path / "checkpoints"
    _saved(root, 2, 4)
    assert die_in_child(lambda die: ckpt.rotate(root, keep_last=1), fault=_die_in_rmtree) == KILLED
    assert sorted(child.name for child in root.iterdir()) == [".deleting-step-000002", "step-000004"]
    assert ckpt.recover(root) == ["deleted .deleting-step-000002: its deletion was cut short"]
    assert sorted(child.name for child in root.iterdir()) == ["step-000004"]

    _saved(root, 6)  # the same kill, then the next save's rotation finishes it
    assert die_in_child(lambda die: ckpt.rotate(root, keep_last=1), fault=_die_in_rmtree) == KILLED
    _saved(root, 8)
    assert ckpt.rotate(root, keep_last=2) == [root / ".deleting-step-000004"]
    assert sorted(child.name for child in root.iterdir()) == ["step-000006", "step-000008"]

    ckpt.partial_dir(root, 10).mkdir()  # a save killed while the ranks wrote; its deletion killed too
    assert die_in_child(lambda die: ckpt.rotate(root, keep_last=2), fault=_die_in_rmtree) == KILLED
    assert ckpt.rotate(root, keep_last=2) == [root / ".deleting-.partial-step-000010"]
    assert sorted(child.name for child in root.iterdir()) == ["step-000006", "step-000008"]


def test_a_step_folder_that_is_not_a_complete_checkpoint_is_left_alone_and_said_once(tmp_path, caplog):
    """Not one of ours half-deleted (those are renamed away first): one being copied in, or whose
    marker a sync tool skipped, or whose marker is damaged. Never resumed, never deleted."""
    root = tmp_path / "checkpoints"
    copying, unsynced, damaged, _ = _saved(root, 2, 4, 6, 8)
    (copying / ckpt.COMPLETE).unlink()
    (copying / ckpt.LOOP_STATE).unlink()
    (unsynced / ckpt.LOOP_STATE).unlink()
    (damaged / ckpt.COMPLETE).write_text("{garbage")
    before = {folder: sorted(p.name for p in folder.rglob("*")) for folder in (copying, unsynced, damaged)}
    with caplog.at_level("WARNING", logger="emotrain.train"):
        assert ckpt.recover(root) == []
    assert [record.getMessage() for record in caplog.records] == [
        f"{copying} is not a complete checkpoint (no COMPLETE marker): ignored, never resumed nor rotated away "
        "(copy it in whole, or delete it yourself)",
        f"{unsynced} is not a complete checkpoint (no loop_state.json): ignored, never resumed nor rotated away "
        "(copy it in whole, or delete it yourself)",
        f"{damaged} is not a complete checkpoint (its COMPLETE marker is unreadable): ignored, never resumed "
        "nor rotated away (copy it in whole, or delete it yourself)",
    ]
    assert ckpt.rotate(root, keep_last=1) == []
    _saved(root, 10)
    assert ckpt.rotate(root, keep_last=1) == [root / "step-000008"]
    assert ckpt.resolve_resume("auto", root) == root / "step-000010"
    assert {folder: sorted(p.name for p in folder.rglob("*")) for folder in before} == before
