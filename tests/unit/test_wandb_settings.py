"""W&B follows its own environment variables (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR,
WANDB_RUN_GROUP, WANDB_TAGS) unless the config sets the value: resolved in one place
(`emotrain.train.tracking.wandb_settings`), for the training runs, the report's summary run and `emotrain cv`."""

from __future__ import annotations

import os
from pathlib import Path

from emotrain.config import LoggingConfig, load_config
from emotrain.train.tracking import init_kwargs, wandb_settings

REPO = Path(__file__).resolve().parents[2]
WANDB_RUN = ["logging.report_to=wandb", "experiment=paper", "data.fold=2"]


def _settings(environ: dict, **configured):
    return wandb_settings(LoggingConfig(**configured), environ, default_dir="runs/paper/fold2", default_group="paper")


def test_without_config_or_environment_the_defaults_hold():
    settings = _settings({})
    assert (settings.mode, settings.project, settings.entity, settings.dir, settings.group, settings.tags) == (
        "offline", "emotrain", None, "runs/paper/fold2", "paper", [])
    assert set(settings.sources.values()) == {"default"}


def test_the_environment_wins_where_the_config_leaves_a_setting_unset():
    environ = {"WANDB_MODE": "online", "WANDB_PROJECT": "iemocap-ser", "WANDB_ENTITY": "lab",
               "WANDB_RUN_GROUP": "sweep-3", "WANDB_TAGS": "a, b,,c"}
    settings = _settings(environ)
    assert (settings.mode, settings.project, settings.entity, settings.group, settings.tags) == (
        "online", "iemocap-ser", "lab", "sweep-3", ["a", "b", "c"])
    assert settings.sources == {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY",
                                "dir": "default", "group": "WANDB_RUN_GROUP", "tags": "WANDB_TAGS"}
    assert "mode online (WANDB_MODE)" in settings.describe() and "project iemocap-ser (WANDB_PROJECT)" in settings.describe()
    assert _settings({"WANDB_MODE": "  "}).mode == "offline"  # set but empty: unset


def test_a_value_in_the_config_wins_over_the_environment():
    environ = {"WANDB_MODE": "online", "WANDB_PROJECT": "theirs", "WANDB_ENTITY": "them", "WANDB_RUN_GROUP": "g",
               "WANDB_TAGS": "x,y"}
    settings = _settings(environ, wandb_mode="disabled", project="mine", entity="me", group="mine", tags=["t"])
    assert (settings.mode, settings.project, settings.entity, settings.group, settings.tags) == (
        "disabled", "mine", "me", "mine", ["t"])
    assert {settings.sources[name] for name in ("mode", "project", "entity", "group", "tags")} == {"config"}
    assert "mode disabled (config)" in settings.describe()


def test_the_training_run_gets_the_resolved_settings_and_wandb_dir(tmp_path):
    cfg = load_config(None, [*WANDB_RUN, f"output_dir={tmp_path}/run"])
    kwargs = init_kwargs(cfg, "abc123", environ={"WANDB_MODE": "online", "WANDB_TAGS": "a,b"})["wandb"]
    assert (kwargs["mode"], kwargs["project"], kwargs["tags"], kwargs["group"]) == ("online", "emotrain", ["a", "b"], "paper")
    assert (kwargs["id"], kwargs["job_type"], kwargs["dir"]) == ("abc123", "fold2", f"{tmp_path}/run")  # the run folder
    kwargs = init_kwargs(cfg, "abc123", environ={"WANDB_DIR": str(tmp_path / "wandb-files")})["wandb"]
    assert kwargs["dir"] == str(tmp_path / "wandb-files") and (tmp_path / "wandb-files").is_dir()
    explicit = load_config(None, [*WANDB_RUN, "logging.wandb_mode=disabled", "logging.project=p"])
    assert init_kwargs(explicit, "abc123", environ={"WANDB_MODE": "online"})["wandb"]["mode"] == "disabled"
    assert init_kwargs(load_config(None, ["logging.report_to=none"]), "abc123", environ={}) == {}


def test_the_report_summary_run_resolves_its_settings_the_same_way(tmp_path):
    from emotrain.report import report_wandb_settings

    class Finished:
        config = {"logging": {"wandb_mode": None, "project": None, "group": None, "tags": []}}

    class Experiment:
        name = "paper"
        finished = [Finished()]

    report = {"experiments": [Experiment()], "out": tmp_path / "report"}
    settings = report_wandb_settings(report, {"WANDB_PROJECT": "p", "WANDB_DIR": str(tmp_path / "w")})
    assert (settings.project, settings.dir, settings.group, settings.mode) == ("p", str(tmp_path / "w"), "paper", "offline")
    assert report_wandb_settings(report, {}).dir == str(tmp_path / "report")
    # A run saved before these keys could be null (wandb_mode: offline written out) keeps its value.
    Finished.config = {"logging": {"wandb_mode": "offline", "project": "emotrain", "group": "exp"}}
    settings = report_wandb_settings(report, {"WANDB_MODE": "online", "WANDB_RUN_GROUP": "g"})
    assert (settings.mode, settings.group) == ("offline", "exp")


def test_cv_leaves_the_group_to_wandb_run_group(monkeypatch, tmp_path):
    from emotrain import cv

    def groups():
        runs = cv.plan_runs([str(REPO / "configs" / "smoke.yaml")], [f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}"],
                            folds=[1], variants=["fusion", "text"])
        return [wandb_settings(load_config(r.config, r.overrides).logging, dict(os.environ),
                               default_dir=".", default_group=r.experiment).group for r in runs]

    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    assert groups() == ["smoke", "smoke"]  # a comparison: one group, the first experiment's
    monkeypatch.setenv("WANDB_RUN_GROUP", "ablation-7")
    assert groups() == ["ablation-7", "ablation-7"]  # not overridden by cv's logging.group


def test_shipped_configs_leave_mode_and_project_to_the_environment():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        logging = load_config(path).logging
        assert (logging.wandb_mode, logging.project) == (None, None), path.name
