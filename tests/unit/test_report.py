"""`emotrain report` on run folders written by hand: the numbers, the comparison, what is missing;
the run folder's history file; provenance; `emotrain cv`'s plan."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from emotrain.config import ConfigError, load_config, save_config
from emotrain.report import ReportError, build_report, paired_difference, read_experiment
from emotrain.train.tracking import HISTORY_FILE, HistoryTracker, read_history

REPO = Path(__file__).resolve().parents[2]
LABELS = ("neutral", "happy", "sad", "angry")


def _run(folder: Path, *, experiment: str, variant: str, fold: int, seed: int, recalls: list[float] | None,
         n: int = 40) -> None:
    """A run folder as the recipe leaves it; recalls None: unfinished (config and a checkpoint only)."""
    cfg = load_config(None, [f"experiment={experiment}", f"model.variant={variant}", f"data.fold={fold}",
                             f"train.seed={seed}", f"output_dir={folder}", f"data.path={folder.parent}/never-prepared"])
    save_config(cfg, folder / "config.yaml", provenance={"git_commit": "abc123", "packages": {"torch": "2.13.0"},
                                                         "world_size": 2})
    if recalls is None:
        (folder / "checkpoints" / "step-000010").mkdir(parents=True)
        return
    per_class = n // 4
    confusion = np.zeros((4, 4), dtype=int)
    for c, r in enumerate(recalls):
        right = int(round(r * per_class))
        confusion[c, c] = right
        confusion[c, (c + 1) % 4] = per_class - right
    wa = float(np.trace(confusion) / confusion.sum())
    test = {"wa": wa, "ua": float(np.mean(recalls)), "macro_f1": float(np.mean(recalls)) - 0.01,
            "per_class_recall": dict(zip(LABELS, recalls)), "confusion": confusion.tolist(), "n": n, "n_skipped": 0}
    (folder / "metrics.json").write_text(json.dumps({"validation": test, "test": test, "best_step": 7}))


def _plan(folder: Path, experiment: str, variant: str, folds, seeds) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cv.json").write_text(json.dumps({"experiment": experiment, "variant": variant, "config": "x.yaml",
                                                "folds": list(folds), "seeds": list(seeds)}))


RECALLS = {  # experiment -> fold -> per-class recalls (multiples of 0.1: exact with 10 per class)
    "fusion": {1: [0.8, 0.7, 0.9, 0.6], 2: [0.7, 0.7, 0.8, 0.8], 3: [0.9, 0.6, 0.7, 0.8]},
    "audio": {1: [0.5, 0.4, 0.6, 0.7], 2: [0.8, 0.8, 0.9, 0.9], 3: [0.4, 0.5, 0.6, 0.5]},
}


@pytest.fixture
def two_experiments(tmp_path):
    dirs = {}
    for variant, folds in RECALLS.items():
        name = "exp" if variant == "fusion" else f"exp-{variant}"
        dirs[variant] = tmp_path / name
        _plan(dirs[variant], name, variant, folds=[1, 2, 3], seeds=[42])
        for fold, recalls in folds.items():
            _run(dirs[variant] / f"fold{fold}", experiment=name, variant=variant, fold=fold, seed=42, recalls=recalls)
    return dirs


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_summary_is_mean_and_sample_sd_over_folds_with_paired_differences(two_experiments, tmp_path):
    report = build_report([two_experiments["fusion"], two_experiments["audio"]], tmp_path / "out", plots=False)
    summary = {row["experiment"]: row for row in _rows(tmp_path / "out" / "summary.csv")}
    ua = {v: [float(np.mean(r)) for r in folds.values()] for v, folds in RECALLS.items()}
    for variant, name in (("fusion", "exp"), ("audio", "exp-audio")):
        assert float(summary[name]["ua_mean"]) == pytest.approx(np.mean(ua[variant]))
        assert float(summary[name]["ua_sd"]) == pytest.approx(np.std(ua[variant], ddof=1))
        happy = [recalls[1] for recalls in RECALLS[variant].values()]
        assert float(summary[name]["recall_happy_mean"]) == pytest.approx(np.mean(happy))
    differences = np.array(ua["audio"]) - np.array(ua["fusion"])
    assert float(summary["exp-audio"]["delta_ua_mean"]) == pytest.approx(differences.mean())
    assert float(summary["exp-audio"]["delta_ua_sd"]) == pytest.approx(differences.std(ddof=1))
    assert int(summary["exp-audio"]["delta_ua_wins"]) == int((differences > 0).sum()) == 1  # audio wins fold 2
    assert summary["exp"]["delta_ua_mean"] == ""  # the reference
    # The Markdown table shows the same, in percent.
    table = report["table"]
    fusion_row = next(line for line in table.splitlines() if line.startswith("| exp |"))
    assert f"{np.mean(ua['fusion']) * 100:.1f} ± {np.std(ua['fusion'], ddof=1) * 100:.1f}" in fusion_row
    audio_row = next(line for line in table.splitlines() if line.startswith("| exp-audio |"))
    assert f"| {differences.mean() * 100:+.1f} ± {differences.std(ddof=1) * 100:.1f} | 1/3 |" in audio_row
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| exp-audio | 1 | 42 | abc123 |" in text  # each run's commit
    assert "no prepare report at" in text  # the data of these hand-made runs was never prepared: said so
    assert len(_rows(tmp_path / "out" / "runs.csv")) == 6


def test_several_seeds_average_within_a_fold_first(tmp_path):
    folder = tmp_path / "exp"
    _plan(folder, "exp", "fusion", folds=[1, 2], seeds=[1, 2])
    recalls = {(1, 1): [0.8] * 4, (1, 2): [0.6] * 4, (2, 1): [0.5] * 4, (2, 2): [0.7] * 4}
    for (fold, seed), r in recalls.items():
        _run(folder / f"fold{fold}-seed{seed}", experiment="exp", variant="fusion", fold=fold, seed=seed, recalls=r)
    experiment = read_experiment(folder)
    assert experiment.fold_values("ua") == pytest.approx({1: 0.7, 2: 0.6})
    report = build_report([folder], tmp_path / "out", plots=False)
    assert f"{65.0:.1f} ± {np.std([0.7, 0.6], ddof=1) * 100:.1f}" in report["table"]
    assert "| 1 | session 1 | 1,2 | 40 |" in (tmp_path / "out" / "report.md").read_text()


def test_missing_and_unfinished_runs_are_named_and_not_counted(two_experiments, tmp_path):
    fusion = two_experiments["fusion"]
    for path in (fusion / "fold3").iterdir():
        path.unlink()
    (fusion / "fold3").rmdir()
    (fusion / "fold2" / "metrics.json").unlink()
    (fusion / "fold2" / "checkpoints").mkdir()
    report = build_report([fusion, two_experiments["audio"]], tmp_path / "out", plots=False)
    assert report["status"] == ["- exp: fold 3 is missing (no run folder)",
                                f"- exp: fold 2 is unfinished ({fusion / 'fold2'}: no test metrics yet)"]
    assert "| exp | fusion | 1/3 |" in report["table"]
    # The paired difference uses the folds both finished: fold 1 only.
    delta = paired_difference(read_experiment(two_experiments["audio"]), read_experiment(fusion), "ua")
    assert delta["folds"] == 1 and delta["sd"] is None
    assert delta["mean"] == pytest.approx(np.mean(RECALLS["audio"][1]) - np.mean(RECALLS["fusion"][1]))


def test_nothing_finished_or_a_wrong_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no such experiment folder"):
        build_report([tmp_path / "nope"], tmp_path / "out")
    _plan(tmp_path / "exp", "exp", "fusion", folds=[1], seeds=[42])
    with pytest.raises(ReportError, match="nothing finished to report for exp: exp: fold 1 is missing"):
        build_report([tmp_path / "exp"], tmp_path / "out")


def test_history_of_a_resumed_run_drops_what_the_interrupted_run_logged_later(tmp_path):
    first = HistoryTracker(tmp_path)
    first.keep_until(None)
    first.start()
    for step in (1, 2, 3, 4):
        first.log({"train/loss": 1.0 / step, "train/step": step})
    first.log({"eval/ua": 0.5, "train/step": 4})
    first.finish()
    with open(tmp_path / HISTORY_FILE, "a") as handle:
        handle.write('{"train/loss": 0.1, "train/st')  # killed mid-line
    resumed = HistoryTracker(tmp_path)
    resumed.keep_until(2)  # the checkpoint it resumed from
    resumed.start()
    resumed.log({"train/loss": 0.3, "train/step": 3})
    resumed.finish()
    assert [(r["train/step"], r["train/loss"]) for r in read_history(tmp_path / HISTORY_FILE)] == [
        (1, 1.0), (2, 0.5), (3, 0.3)]
    fresh = HistoryTracker(tmp_path)
    fresh.keep_until(None)  # resume=never: a new history
    fresh.start()
    fresh.finish()
    assert read_history(tmp_path / HISTORY_FILE) == []


def test_provenance_is_saved_with_the_config_and_ignored_when_loaded(tmp_path):
    from emotrain import provenance

    current = provenance.collect(world_size=2, distributed_type="MULTI_GPU", mixed_precision="bf16")
    assert current["packages"]["torch"].startswith("2.") and current["world_size"] == 2
    assert len(current["git_commit"].split("+")[0]) == 40  # this checkout's commit
    cfg = load_config(REPO / "configs" / "smoke.yaml")
    save_config(cfg, tmp_path / "config.yaml", provenance=current)
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()  # still a loadable config
    # A run resumed under other code remembers where it started.
    later = {**current, "git_commit": "f" * 40}
    merged = provenance.merge_with_earlier(later, current)
    assert merged["git_commit"] == "f" * 40 and merged["earlier"][0]["git_commit"] == current["git_commit"]
    assert "earlier" not in provenance.merge_with_earlier(current, current)


def test_cv_plans_one_folder_per_variant_seed_and_fold(tmp_path):
    from emotrain import cv

    runs = cv.plan_runs([str(REPO / "configs" / "smoke.yaml")], [f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}"],
                        folds=[1, 3], seeds=[1, 2], variants=["fusion", "text"])
    assert [(r.experiment, r.seed, r.fold) for r in runs] == [
        ("smoke", 1, 1), ("smoke", 1, 3), ("smoke", 2, 1), ("smoke", 2, 3),
        ("smoke-text", 1, 1), ("smoke-text", 1, 3), ("smoke-text", 2, 1), ("smoke-text", 2, 3)]
    assert runs[5].output_dir == tmp_path / "smoke-text" / "fold3-seed1"
    cfg = load_config(runs[5].config, runs[5].overrides)
    assert (cfg.model.variant, cfg.data.fold, cfg.train.seed, cfg.logging.group) == ("text", 3, 1, "smoke")
    # Without --seeds: the config's seed and the plain folder, as `emotrain train` writes it.
    (plain,) = cv.plan_runs([str(REPO / "configs" / "paper.yaml")], [], folds=[2])
    assert plain.output_dir == Path("runs/paper/fold2") and plain.experiment == "paper"
    with pytest.raises(ConfigError, match="--folds"):
        cv.plan_runs([str(REPO / "configs" / "smoke.yaml")], [], folds=[0, 6])
    with pytest.raises(ConfigError, match="--variants"):
        cv.plan_runs([str(REPO / "configs" / "smoke.yaml")], [], variants=["video"])
    with pytest.raises(ConfigError, match="train.nope"):  # a bad key fails before any training
        cv.plan_runs([str(REPO / "configs" / "smoke.yaml")], ["train.nope=1"])
    with pytest.raises(ConfigError, match="share a folder"):
        cv.plan_runs([str(REPO / "configs" / "smoke.yaml")] * 2, [])


def test_with_wandb_the_report_is_one_summary_run_in_the_runs_group(two_experiments, tmp_path):
    import os
    import re
    import subprocess
    import sys

    from tests.wandb_offline import read_records, run_history

    for folder in two_experiments.values():
        for config in folder.glob("fold*/config.yaml"):
            text = config.read_text().replace("report_to: []", "report_to:\n  - wandb").replace("group: null", "group: exp")
            config.write_text(text)
    report = build_report([two_experiments["fusion"], two_experiments["audio"]], tmp_path / "out")
    assert report["wandb"] is True
    # `emotrain report` in a process of its own, as users run it: W&B's client keeps per-process state
    # (its service, the run in progress) that other tests of this session must not share.
    proc = subprocess.run([sys.executable, "-m", "emotrain.cli", "report", str(two_experiments["fusion"]),
                           str(two_experiments["audio"]), "--out", str(tmp_path / "out")], cwd=REPO,
                          env={**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_id,) = re.findall(r"W&B: the table and figures are in the summary run (\S+)", proc.stdout)
    (run_dir,) = (tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}")
    _, rows = run_history(run_dir)
    logged = {key.rsplit("/", 1)[0] for row in rows for key in row if key.endswith("/_type")}  # media: nested keys
    assert "results" in logged  # the comparison table
    assert {f"figures/{p.relative_to(tmp_path / 'out').with_suffix('').as_posix()}" for p in report["images"]} <= logged
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == len(report["images"])
    (table_file,) = (run_dir / "files" / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == ["exp", "exp-audio"]
    ua_mean = table["columns"].index("ua_mean")
    assert table["data"][0][ua_mean] == pytest.approx(np.mean([np.mean(r) for r in RECALLS["fusion"].values()]))
    runs = [r.run for r in read_records(next(run_dir.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_group == "exp" and runs[0].job_type == "report"


def test_cv_refuses_a_finished_run_of_another_config_before_training_anything(tmp_path):
    from emotrain import cv
    from emotrain.train.run_folder import RunFolderConflict

    runs = cv.plan_runs([str(REPO / "configs" / "smoke.yaml")], [f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}"],
                        folds=[1, 2])
    finished = runs[1].output_dir  # fold 2 finished earlier, with another learning rate
    save_config(load_config(runs[1].config, [*runs[1].overrides, "train.lr=1e-3"]), finished / "config.yaml")
    (finished / "metrics.json").write_text(json.dumps({"test": {"ua": 0.5}}))
    launched = tmp_path / "launched"
    with pytest.raises(RunFolderConflict, match="train.lr: 0.001 there, 5e-05 now"):
        cv.run_sequentially(runs, launcher=["sh", "-c", f"touch {launched}"], say=lambda line: None)
    assert not launched.exists()  # fold 1 was not trained first
    # Without the conflict, fold 1 is launched (the stand-in launcher "trains" it) and fold 2 skipped.
    save_config(load_config(runs[1].config, runs[1].overrides), finished / "config.yaml")
    said = []
    code, failed = cv.run_sequentially(runs, launcher=["sh", "-c", f"touch {launched}"], say=said.append)
    assert launched.exists() and code == 0 and not failed
    assert said[-2].endswith(f"finished, skipped ({finished}/metrics.json)") and said[-1] == "[cv] 2/2 runs finished"


def test_runs_outside_the_plan_or_unreadable_are_named_not_counted(two_experiments, tmp_path):
    fusion = two_experiments["fusion"]
    _plan(fusion, "exp", "fusion", folds=[1, 2], seeds=[42])  # a later cv planned folds 1-2 only
    _run(fusion / "fold1-seed7", experiment="exp", variant="fusion", fold=1, seed=7, recalls=[0.1] * 4)
    (fusion / "fold2" / "metrics.json").write_text('{"test": {"wa": 0.5, "ua"')  # cut short
    experiment = read_experiment(fusion)
    assert sorted((r.fold, r.seed) for r in experiment.finished) == [(1, 42)]
    assert experiment.fold_values("ua") == pytest.approx({1: np.mean(RECALLS["fusion"][1])})
    reasons = "\n".join(experiment.ignored)
    assert "fold 3 seed 42 is not in cv.json (folds [1, 2], seeds [42]): not counted" in reasons
    assert "fold 1 seed 7 is not in cv.json" in reasons and "fold2: unreadable run (JSONDecodeError" in reasons
    report = build_report([fusion], tmp_path / "out", plots=False)
    assert "| exp | fusion | 1/2 |" in report["table"]
    assert any("not in cv.json" in line for line in report["status"]) and "- exp: fold 2 is missing" in "\n".join(report["status"])
    # Two finished runs claiming the same fold and seed cannot both be counted.
    _run(fusion / "again" / "fold1", experiment="exp", variant="fusion", fold=1, seed=42, recalls=[0.2] * 4)
    with pytest.raises(ReportError, match="two runs of fold 1 seed 42"):
        read_experiment(fusion)


def test_the_protocol_describes_the_data_it_was_given(two_experiments, tmp_path):
    from dataclasses import replace

    from emotrain.data.shards import IEMOCAP_INFO, write_dataset_info

    data = two_experiments["fusion"] / "never-prepared"
    protocol = (tmp_path / "out" / "report.md")
    build_report([two_experiments["fusion"]], tmp_path / "out", plots=False)
    assert "which of the source's codes each class holds was not recorded" in protocol.read_text()  # no dataset.json
    data.mkdir()
    single_codes = {"neutral": ("neu",), "happy": ("hap",), "sad": ("sad",), "angry": ("ang",)}
    write_dataset_info(data, replace(IEMOCAP_INFO, source="emotrain's synthetic corpus (not IEMOCAP recordings)",
                                     codes_per_label=single_codes))
    build_report([two_experiments["fusion"]], tmp_path / "out", plots=False)
    text = protocol.read_text()
    assert "Data: emotrain's synthetic corpus (not IEMOCAP recordings)." in text
    assert "merged" not in text and "excited" not in text  # no exc among the kept rows: no merge claimed

    write_dataset_info(data, replace(IEMOCAP_INFO, codes_per_label={**single_codes, "happy": ("exc", "hap")}))
    build_report([two_experiments["fusion"]], tmp_path / "out", plots=False)
    assert "- Classes: 4 (neutral, happy, sad, angry); merged from the data's own codes: *happy* = `exc` + `hap`." \
        in protocol.read_text()


def test_figures_compare_and_read_well(two_experiments, tmp_path, monkeypatch):
    """Alt texts are unique; row-normalised confusions share the 0-1 scale; the legend sits below the curves."""
    import re

    from matplotlib.figure import Figure

    drawn = []
    real_savefig = Figure.savefig

    def inspect_then_save(fig, path, *args, **kwargs):
        renderer = fig.canvas.get_renderer()
        legends = [(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
                   for ax in fig.axes if ax.get_legend() is not None]
        drawn.append((Path(path).name, [im.get_clim() for ax in fig.axes for im in ax.images], legends))
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", inspect_then_save)
    history = HistoryTracker(two_experiments["fusion"] / "fold1")
    history.keep_until(None)
    history.start()
    for step in range(1, 21):  # a loss falling through the whole plot: no corner inside is free
        history.log({"train/loss": 2.0 - step / 10, "train/step": step})
    history.finish()
    report = build_report([two_experiments["fusion"], two_experiments["audio"]], tmp_path / "out")
    alts = re.findall(r"!\[([^\]]*)\]\(([^)]*)\)", (tmp_path / "out" / "report.md").read_text())
    assert len(alts) == len(report["images"]) == 2 * (2 * 3 + 1) + 1
    assert len({alt for alt, _ in alts}) == len(alts), "every image has its own alt text"
    assert {path for _, path in alts} == {str(p.relative_to(tmp_path / "out")) for p in report["images"]}

    confusions = [clims for name, clims, _ in drawn if name.startswith("confusion")]
    assert len(confusions) == 2 * 4
    assert all(clims[1] == (0, 1.0) for clims in confusions), "row-normalised panels share one colour scale"
    assert len({clims[0] for clims in confusions}) > 1, "counts keep their own scale"
    legends = [legend for name, _, legends in drawn if name.startswith("curves") for legend in legends]
    assert len(legends) == 1  # the one run with a history
    (legend, axes), = legends
    assert legend.y1 <= axes.y0, "the legend sits below the axes, off the curves"


def test_a_model_card_that_cannot_be_written_is_named_and_the_report_still_written(two_experiments, tmp_path,
                                                                                   monkeypatch, capsys):
    from emotrain.report import say_report
    from emotrain.train import model_card

    cards = []
    (two_experiments["fusion"] / "fold3" / "metrics.json").unlink()  # unfinished: named in the cards, no path
    for fold in (1, 2):
        card = two_experiments["fusion"] / f"fold{fold}" / "best" / "README.md"
        card.parent.mkdir()
        card.write_text("# model\n<!-- emotrain:cross-validation -->\n<!-- /emotrain:cross-validation -->\n")
        cards.append(card)
    real_write = model_card._write_atomically

    def read_only_fold2(path, text):
        if "fold2" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_write(path, text)

    monkeypatch.setattr(model_card, "_write_atomically", read_only_fold2)
    report = build_report([two_experiments["fusion"]], tmp_path / "out", plots=False)
    assert (tmp_path / "out" / "report.md").is_file()
    assert "This model is fold 1" in cards[0].read_text() and "This model is fold" not in cards[1].read_text()
    assert "fold 3 is unfinished (fold3: no test metrics yet)" in cards[0].read_text()
    assert str(tmp_path) not in cards[0].read_text()
    say_report(report, tmp_path / "out", wandb=False)
    assert f"the model card {cards[1]} was not updated (Permission denied)" in capsys.readouterr().out


def test_curves_read_the_validation_names_of_runs_trained_before_eval(two_experiments):
    from emotrain.report import curves

    experiment = read_experiment(two_experiments["fusion"])
    run = next(r for r in experiment.finished if r.fold == 1)
    history = HistoryTracker(run.folder)
    history.keep_until(None)
    history.start()
    history.log({"train/loss": 1.0, "train/step": 1})
    history.log({"validation/ua": 0.5, "validation/wa": 0.6, "train/step": 2})  # an older run's names
    history.log({"eval/ua": 0.7, "eval/loss": 0.9, "train/step": 4})
    history.finish()
    assert curves(run) == {"train/loss": [(1, 1.0)], "eval/ua": [(2, 0.5), (4, 0.7)], "eval/wa": [(2, 0.6)],
                           "eval/loss": [(4, 0.9)]}
