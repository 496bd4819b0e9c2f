"""The checkpoint store when a run restarts from an explicitly chosen checkpoint: the chosen branch
is current again, and its best checkpoint survives rotation."""

from __future__ import annotations

from emotrain.train import checkpoint as ckpt


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
