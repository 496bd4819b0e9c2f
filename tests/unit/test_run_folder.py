"""A run folder refuses a config that would change its result, and accepts neutral changes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from emotrain.config import ConfigError, load_config, save_config
from emotrain.train.run_folder import (
    RESULT_NEUTRAL_KEYS,
    RunFolderConflict,
    check_run_folder,
    config_differences,
)
from tests.faults import KILLED, die_in_child


def _earlier_run(folder, cfg) -> None:
    """What a run that got as far as results leaves: its config.yaml and metrics.json."""
    save_config(cfg, folder / "config.yaml")
    (folder / "metrics.json").write_text("{}")


def _config(*overrides: str):
    return load_config(None, ["output_dir=runs/x", *overrides])


def test_a_new_or_unstarted_folder_passes(tmp_path):
    check_run_folder(tmp_path / "missing", _config())
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty", _config())


def test_the_same_config_passes(tmp_path):
    _earlier_run(tmp_path, _config("train.lr=3e-5"))
    check_run_folder(tmp_path, _config("train.lr=3e-5"))


@pytest.mark.parametrize(
    "override",
    [
        "output_dir=elsewhere", "train.resume=never", "data.path=/mnt/copy", "data.num_workers=8",
        "train.gradient_checkpointing=true", "train.checkpoint_every_steps=17",
        "train.keep_last_checkpoints=5", "train.max_consecutive_nonfinite=3", "logging.report_to=[wandb]",
        "logging.run_name=retry", "logging.progress_bar=false",
    ],
)
def test_result_neutral_differences_pass(tmp_path, override):
    _earlier_run(tmp_path, _config())
    check_run_folder(tmp_path, _config(override))


def test_a_result_changing_difference_is_refused_naming_every_key(tmp_path):
    _earlier_run(tmp_path, _config("train.lr=2e-5"))
    with pytest.raises(RunFolderConflict) as err:
        check_run_folder(tmp_path, _config("train.lr=3e-5", "model.variant=audio", "logging.tags=[x]",
                                           "data.eval_batch_size=64"))
    assert isinstance(err.value, ConfigError) and err.value.key == "output_dir"
    message = str(err.value)
    assert "train.lr: 2e-05 there, 3e-05 now" in message
    assert "model.variant: 'fusion' there, 'audio' now" in message
    assert "data.eval_batch_size: 8 there, 64 now" in message  # padding: float rounding, and data2vec-audio sees it
    assert "logging.tags" not in message
    assert "choose another output_dir" in message and "delete" in message
    assert "\n" not in message


def test_config_differences_counts_missing_keys_and_types():
    saved = {"train": {"lr": 1e-3, "seed": 1, "old": 5}, "logging": {"project": "a"}, "output_dir": "a"}
    new = {"train": {"lr": 1e-3, "seed": 1.0, "class_weights": "none"}, "logging": {"project": "b"}, "output_dir": "b"}
    assert config_differences(saved, new) == [
        ("train.class_weights", "<missing>", "none"),
        ("train.old", 5, "<missing>"),
        ("train.seed", 1, 1.0),
    ]
    assert config_differences(new, new) == []
    # A key added since the saved run, at its default (which does what emotrain did before it): the same run.
    defaults = {"train": {"class_weights": "none"}}
    assert config_differences(saved, new, defaults) == [("train.old", 5, "<missing>"), ("train.seed", 1, 1.0)]
    other = {"train": {**new["train"], "class_weights": "balanced"}, "output_dir": "b"}
    assert ("train.class_weights", "<missing>", "balanced") in config_differences(saved, other, defaults)


def test_a_folder_without_results_takes_the_new_config(tmp_path):
    """A run that failed before its first checkpoint (say on data.sampling_rate, checked at model
    build) left only its config.yaml: the corrected command must not be refused."""
    save_config(_config("data.sampling_rate=8000"), tmp_path / "config.yaml")
    check_run_folder(tmp_path, _config())
    (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)  # a save that never completed
    check_run_folder(tmp_path, _config())
    (tmp_path / "checkpoints" / "step-000010" / "loop_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-000010" / "COMPLETE").write_text('{"step": 10, "sequence": 1}')
    with pytest.raises(RunFolderConflict, match="data.sampling_rate: 8000 there, 16000 now"):
        check_run_folder(tmp_path, _config())


def test_another_seed_is_pointed_to_its_own_folder(tmp_path):
    _earlier_run(tmp_path, _config())
    with pytest.raises(RunFolderConflict, match=r"seed\{seed\}"):
        check_run_folder(tmp_path, _config("train.seed=7"))


def test_an_unreadable_saved_config_is_a_conflict(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RunFolderConflict, match="cannot read"):
        check_run_folder(tmp_path, _config())
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(RunFolderConflict, match="does not hold a config"):
        check_run_folder(tmp_path, _config())


def test_neutral_keys_are_real_config_keys():
    cfg = _config().to_dict()
    flat = {f"{section}.{key}" for section, values in cfg.items() if isinstance(values, dict) for key in values}
    flat |= {key for key, value in cfg.items() if not isinstance(value, dict)}
    for key in RESULT_NEUTRAL_KEYS:
        assert key in flat or (key.endswith(".") and any(k.startswith(key) for k in flat)), key
    saved = yaml.safe_load(_config().to_yaml())
    assert config_differences(saved, cfg) == []


def test_the_neutral_keys_and_plan_fields_are_the_config_fields_marks():
    """Declared on the fields themselves (`neutral(...)`, `plan_shaping(...)` in emotrain.config)."""
    from emotrain.config import DataConfig, neutral_reason, result_neutral_keys
    from emotrain.data.plan import PLAN_FIELDS, StreamSettings

    assert RESULT_NEUTRAL_KEYS == result_neutral_keys() == {
        "output_dir", "train.resume", "data.path", "data.num_workers", "train.gradient_checkpointing",
        "train.fused_optimizer", "model.attention", "train.checkpoint_every_steps", "train.keep_last_checkpoints",
        "train.keep_checkpoints_after_finish",
        "train.max_consecutive_nonfinite", "logging.",
    }
    assert neutral_reason("logging.tags") == neutral_reason("logging.") and neutral_reason("train.lr") is None
    assert PLAN_FIELDS == DataConfig.plan_fields()
    assert set(PLAN_FIELDS) == {"batching", "max_batch_audio_seconds", "bucket_buffer_size", "shuffle_buffer_size",
                                "max_audio_seconds", "random_crop", "max_text_tokens", "sampling_rate", "length_ladder"}
    assert [f for f in StreamSettings.__dataclass_fields__ if f not in ("seed", "batch_size")] == list(PLAN_FIELDS)


# ---------------------------------------------------------------------------------------------
# best/ is replaced atomically: a crash at any moment leaves the old whole folder or the new one.


def _model_files(tag: str) -> dict[str, str]:
    """What an export writes (EmotionModel.save_pretrained writes several files and folders)."""
    return {"emotion_model.json": tag, "model.safetensors": tag * 100, "tokenizer/vocab.txt": tag, "config.yaml": tag}


def _export(folder, tag: str, die=None) -> None:
    for i, (name, text) in enumerate(_model_files(tag).items()):
        if die is not None and i == 2:
            die()  # half the files written
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _contents(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path):
    """A finished run: its best/ (written by an earlier export) and its metrics."""
    from emotrain.train.run_folder import RunFolder

    run = RunFolder(tmp_path / "run")
    with run.writing_best() as folder:
        _export(folder, "old")
    run.metrics.write_text(json.dumps({"test": {"ua": 0.5}}))
    assert _contents(run.best) == _model_files("old") and run.is_finished()
    return run


def test_a_run_is_finished_by_what_it_wrote_at_its_end_whatever_the_fold(tmp_path):
    from emotrain.train.run_folder import RunFolder

    run = RunFolder(tmp_path)
    # Fold 0 trains on everything: its metrics.json holds no test metrics, and it is finished.
    run.metrics.write_text(json.dumps({"validation": {"ua": 0.5}, "best_step": 2, "stop_reason": "max_steps",
                                       "steps": 2, "nonfinite_steps": 0}))
    assert run.is_finished() and run.finished_metrics() is not None
    assert run.finished_metrics(tested=True) is None  # `emotrain report` counts only runs with test metrics
    run.metrics.write_text(json.dumps({"test": {"ua": 0.5}, "stop_reason": "max_steps"}))
    assert run.is_finished() and run.finished_metrics(tested=True) is not None
    run.metrics.write_text("{}")  # not what a run writes at its end
    assert not run.is_finished()


def _rename_dies_on_call(number: int):
    def fault(die):
        real, calls = os.rename, []

        def rename(*args):
            calls.append(args)
            if len(calls) == number:
                die()
            real(*args)
        os.rename = rename
    return fault


def test_a_crash_while_writing_best_leaves_the_old_best(finished_run):
    run = finished_run

    def reexport(die):
        with run.writing_best() as folder:
            _export(folder, "new", die)
    assert die_in_child(reexport) == KILLED
    assert _contents(run.best) == _model_files("old") and run.is_finished()
    assert run.recover() == ["deleted .partial-best (an export cut short)"]
    assert sorted(p.name for p in run.path.iterdir()) == ["best", "metrics.json"]


def test_a_first_export_cut_short_leaves_no_best(tmp_path):
    from emotrain.train.run_folder import RunFolder

    run = RunFolder(tmp_path)

    def export(die):
        with run.writing_best() as folder:
            _export(folder, "new", die)
    assert die_in_child(export) == KILLED
    assert not run.best.exists() and not run.holds_results()
    with run.writing_best() as folder:  # the resumed run exports again (it cleans up first)
        _export(folder, "new")
    assert _contents(run.best) == _model_files("new") and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_crash_between_the_renames_rolls_back_to_the_old_best(finished_run):
    run = finished_run

    def reexport(die):
        with run.writing_best() as folder:
            _export(folder, "new")
    assert die_in_child(reexport, fault=_rename_dies_on_call(2)) == KILLED  # old best/ aside, new one not in place
    assert not run.best.exists() and not run.is_finished()  # never counts while the swap is cut short
    assert run.holds_results()  # and the folder still holds that run's result
    assert run.recover()[0] == "renamed .replaced-best back to best (interrupted export rolled back)"
    assert _contents(run.best) == _model_files("old") and run.is_finished()
    assert sorted(p.name for p in run.path.iterdir()) == ["best", "metrics.json"]


def test_a_crash_after_the_swap_keeps_the_new_best(finished_run):
    run = finished_run

    def reexport(die):
        shutil.rmtree = lambda *args, **kwargs: die()  # deleting the old folder
        with run.writing_best() as folder:
            _export(folder, "new")
    assert die_in_child(reexport) == KILLED
    assert _contents(run.best) == _model_files("new") and not run.is_finished()
    assert run.recover() == ["deleted .replaced-best: best had replaced it"]
    assert _contents(run.best) == _model_files("new") and run.is_finished()


def test_an_error_while_writing_best_leaves_it_as_it_was(finished_run):
    run = finished_run
    with pytest.raises(RuntimeError, match="disk full"):
        with run.writing_best() as folder:
            _export(folder, "new")
            raise RuntimeError("disk full")
    assert _contents(run.best) == _model_files("old") and run.is_finished()
    assert sorted(p.name for p in run.path.iterdir()) == ["best", "metrics.json"]


# ---------------------------------------------------------------------------------------------
# A finished run drops its checkpoints (train.keep_checkpoints_after_finish=false): renamed away
# first, so a kill midway never leaves a checkpoints/ holding part of a checkpoint.


def _checkpoint_files(run) -> None:
    for step in (2, 4):
        folder = run.checkpoints / f"step-{step:06d}"
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.bin", "loop_state.json"):
            (folder / name).write_text(name)
        (folder / "COMPLETE").write_text(json.dumps({"step": step, "sequence": step}))


def test_a_finished_run_drops_its_checkpoints_and_stays_finished(finished_run):
    from emotrain.train.checkpoint import holds_checkpoint_state, latest_checkpoint

    run = finished_run
    _checkpoint_files(run)
    assert latest_checkpoint(run.checkpoints) is not None
    assert run.drop_checkpoints() is True
    assert sorted(p.name for p in run.path.iterdir()) == ["best", "metrics.json"]
    assert run.is_finished() and run.holds_results() and not holds_checkpoint_state(run.checkpoints)
    assert run.drop_checkpoints() is False  # nothing left to drop


def test_a_kill_while_dropping_checkpoints_leaves_none_half_deleted(finished_run):
    from emotrain.train.checkpoint import latest_checkpoint

    run = finished_run
    _checkpoint_files(run)

    def half_then_die(die):
        def rmtree(path, *args, **kwargs):  # one file gone, then the process is killed
            os.remove(next(p for p in sorted(Path(path).rglob("*")) if p.is_file()))
            die()
        shutil.rmtree = rmtree

    assert die_in_child(lambda die: run.drop_checkpoints(), fault=half_then_die) == KILLED
    leftover = run.path / ".deleting-checkpoints"
    assert not run.checkpoints.exists() and leftover.is_dir()  # renamed before anything was removed
    assert latest_checkpoint(run.checkpoints) is None and run.is_finished()
    # The next start removes what is left: setup's recover, or a rerun of the finished run.
    assert run.recover() == ["deleted .deleting-checkpoints (a deletion of the finished run's checkpoints cut short)"]
    assert sorted(p.name for p in run.path.iterdir()) == ["best", "metrics.json"]


def test_a_kill_before_the_rename_leaves_every_checkpoint_whole(finished_run):
    run = finished_run
    _checkpoint_files(run)
    before = _contents(run.checkpoints)
    assert die_in_child(lambda die: run.drop_checkpoints(), fault=_rename_dies_on_call(1)) == KILLED
    assert _contents(run.checkpoints) == before and not (run.path / ".deleting-checkpoints").exists()


def test_dropping_checkpoints_clears_an_earlier_leftover_first(finished_run):
    run = finished_run
    (run.path / ".deleting-checkpoints" / "step-000002").mkdir(parents=True)
    _checkpoint_files(run)
    assert run.drop_checkpoints() is True
    assert sorted(p.name for p in run.path.iterdir()) == ["best", "metrics.json"]


def test_a_model_exported_through_writing_best_loads(tmp_path):
    """What the recipe does: EmotionModel.save_pretrained into the folder writing_best gives (it
    exists already, empty), and the run's config beside it."""
    from emotrain.model import EmotionModel, build_model, build_processors
    from emotrain.train.run_folder import RunFolder

    cfg = _config("model.variant=audio", "model.hidden_size=16", "model.classifier_hidden_size=16")
    model = build_model(cfg.model)
    run = RunFolder(tmp_path)
    with run.writing_best() as folder:
        model.save_pretrained(folder, processors=build_processors(cfg.model))
        save_config(cfg, folder / "config.yaml")
    assert EmotionModel.from_pretrained(run.best).config == model.config
    assert load_config(run.best / "config.yaml") == cfg and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# ---------------------------------------------------------------------------------------------
# What a finished run trained on: recorded in metrics.json, compared with the new data's.


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    from tests.toyset import write_toy_prepared

    root = tmp_path_factory.mktemp("corpora")
    return (write_toy_prepared(root / "a", per_session=4, num_shards=1),
            write_toy_prepared(root / "b", per_session=5, num_shards=1, seed=1))


def _fingerprint(data_path):
    from emotrain.data.folds import split_from_config
    from emotrain.data.state import data_fingerprint

    cfg = _config(f"data.path={data_path}")
    return data_fingerprint(split_from_config(cfg.data, seed=cfg.train.seed))


def test_a_finished_run_records_its_data_and_refuses_other_data(tmp_path, two_corpora):
    from emotrain.data.folds import split_from_config
    from emotrain.train.run_folder import RunFolder

    a, b = two_corpora
    run = RunFolder(tmp_path)
    cfg = _config(f"data.path={a}")
    run.write_metrics({"test": {"ua": 0.5}}, data_path=str(a), split=split_from_config(cfg.data, seed=cfg.train.seed))
    recorded = json.loads(run.metrics.read_text())["data"]
    assert recorded["path"] == str(a) and set(recorded) == {"path", "split", "layout", "labels"}
    assert run.check_data(str(a), lambda: _fingerprint(a)) is None
    shutil.copytree(a, tmp_path / "copy")  # the same data, elsewhere: the same run
    assert run.check_data(str(tmp_path / "copy"), lambda: _fingerprint(tmp_path / "copy")) is None
    with pytest.raises(RunFolderConflict) as err:
        run.check_data(str(b), lambda: _fingerprint(b))
    message = str(err.value)
    assert message.startswith(f"output_dir: {tmp_path} holds a run trained on other data ({a}) than data.path={b} "
                              "(the same files hold other rows")
    assert "\n" not in message


def test_an_older_run_is_checked_against_its_checkpoint_or_accepted_with_a_note(tmp_path, two_corpora):
    """Written before metrics.json recorded the data: its newest checkpoint's stream state says what
    it trained on; with its checkpoints gone nothing does, and it is accepted with a note."""
    from emotrain.train.run_folder import RunFolder

    a, b = two_corpora
    run = RunFolder(tmp_path)
    run.metrics.write_text(json.dumps({"test": {"ua": 0.5}}))
    note = run.check_data(str(b), lambda: pytest.fail("nothing to compare with: not computed"))
    assert note == (f"{tmp_path} does not record the data it trained on (written by an older emotrain, its "
                    f"checkpoints gone): not checked against data.path={b}")
    checkpoint = run.checkpoints / "step-000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "stream-rank0.json").write_text(json.dumps({"epoch": 1, "position": 0, **_fingerprint(a)}))
    (checkpoint / "config.yaml").write_text(_config(f"data.path={a}").to_yaml())
    (checkpoint / "loop_state.json").write_text("{}")
    (checkpoint / "COMPLETE").write_text('{"step": 10, "sequence": 1}')
    assert run.check_data(str(a), lambda: _fingerprint(a)) is None
    with pytest.raises(RunFolderConflict, match=f"trained on other data \\({a}\\) than data.path={b}"):
        run.check_data(str(b), lambda: _fingerprint(b))


def test_a_finished_run_asked_again_is_done_unless_another_config_or_data_asks(tmp_path, two_corpora):
    from emotrain.train.run_folder import RunFolder

    first, second = two_corpora
    cfg = _config(f"data.path={first}", f"output_dir={tmp_path}", "train.max_steps=4")
    save_config(cfg, tmp_path / "config.yaml")
    recorded = {"path": str(first), **_fingerprint(first)}
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"ua": 0.5}, "data": recorded}))
    run = RunFolder(tmp_path)
    assert run.is_finished()
    line = run.check_finished(_config(f"data.path={first}", f"output_dir={tmp_path}", "train.max_steps=4",
                                      "logging.progress_bar=false"), lambda: _fingerprint(first))
    assert "finished" in line and str(run.metrics) in line and "another output_dir" in line and "\n" not in line
    with pytest.raises(RunFolderConflict, match="train.max_steps: 4 there, 8 now"):  # a longer run is another run
        run.check_finished(_config(f"data.path={first}", f"output_dir={tmp_path}", "train.max_steps=8"),
                           lambda: _fingerprint(first))
    with pytest.raises(RunFolderConflict, match="other data"):
        run.check_finished(_config(f"data.path={second}", f"output_dir={tmp_path}", "train.max_steps=4"),
                           lambda: _fingerprint(second))


def test_a_finished_run_without_checkpoints_rerun_is_done_and_its_leftover_removed(tmp_path, two_corpora):
    """`emotrain train` on a finished run whose checkpoints were dropped: nothing to do (no retraining,
    no error), and the leftover of a deletion a kill cut short is removed."""
    from emotrain.train.recipe import finished_run

    first, _ = two_corpora
    cfg = _config(f"data.path={first}", f"output_dir={tmp_path}")
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"ua": 0.5}, "data": {"path": str(first),
                                                                                     **_fingerprint(first)}}))
    (tmp_path / ".deleting-checkpoints" / "step-000004").mkdir(parents=True)
    line = finished_run(cfg)
    assert line is not None and "nothing to do" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.json"]

    # Killed after metrics.json, before the deletion: the rerun deletes them, unless they are to be kept.
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    assert "nothing to do" in finished_run(_config(f"data.path={first}", f"output_dir={tmp_path}",
                                                   "train.keep_checkpoints_after_finish=true"))
    assert (tmp_path / "checkpoints" / "step-000004").is_dir()
    assert "nothing to do" in finished_run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "metrics.json"]


def test_an_output_dir_that_cannot_be_written_is_a_config_error(tmp_path, monkeypatch):
    from emotrain.train.run_folder import RunFolder

    RunFolder(tmp_path / "new" / "run").check_writable()  # made later, under a writable folder
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path and real_access(path, mode, **kw))
    for folder in (tmp_path, tmp_path / "new" / "run"):  # the folder itself, or where it would be made
        with pytest.raises(ConfigError, match="read-only") as err:
            RunFolder(folder).check_writable()
        assert err.value.key == "output_dir" and str(folder) in str(err.value)
