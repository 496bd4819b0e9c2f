"""`emotrain report EXPERIMENT_DIR...`: the results table people publish, from finished runs only.

    emotrain report runs/paper runs/paper-audio runs/paper-text --out runs/paper/report

An experiment folder holds one run folder per (fold, seed) — `runs/<experiment>/fold<k>` or
`fold<k>-seed<s>`, as `emotrain train` and `emotrain cv` write them. A run is *finished* when its
`metrics.json` holds test metrics (`RunFolder.finished_metrics(tested=True)`); anything else there
is *unfinished*, and a fold (or seed) the experiment expects (its `cv.json`, written by `emotrain
cv`, else folds 1-5) without a folder is *missing*. Both are named in the report, and only finished runs are counted.

What is written into `--out`:
    report.md       the side-by-side table (mean ± sd over folds), per-fold tables, the paired
                    per-fold difference of each experiment against the first, the protocol, the
                    utterance counts per session × class, and every run's commit and package versions
    summary.csv     one row per experiment: mean and sd over folds of every metric, paired deltas
    runs.csv        one row per finished run (experiment, fold, seed, WA, UA, macro-F1, recalls)
    <experiment>/confusion_fold<k>.png, confusion_pooled.png, curves_fold<k>.png
    ua_by_experiment.png

With several seeds a fold's figure is the mean over its seeds; mean ± sd are then taken over the
folds (sd: sample standard deviation, n - 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from emotrain import plots as plotting
from emotrain.config import LoggingConfig
from emotrain.data.shards import IEMOCAP_INFO, REPORT_FILE, DatasetInfo, join, read_dataset_info, read_prepare_report
from emotrain.train.model_card import CARD_FILE, CROSS_VALIDATION, replace_card_section, without_local_paths
from emotrain.train.run_folder import BEST_DIR, CONFIG_FILE, RunFolder
from emotrain.train.tracking import WandbSettings, read_history, wandb_settings

CV_PLAN_FILE = "cv.json"
"""Written by `emotrain cv` into each experiment folder: the folds and seeds it expects."""
METRICS = ("wa", "ua", "macro_f1")
METRIC_NAMES = {"wa": "WA", "ua": "UA", "macro_f1": "macro-F1"}


@dataclass
class Run:
    """One run folder of an experiment."""

    folder: Path
    fold: int
    seed: int
    config: dict
    metrics: dict | None
    """metrics.json when the run is finished (`RunFolder.finished_metrics`), else None."""

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def test(self) -> dict:
        return self.metrics["test"]

    def value(self, metric: str) -> float | None:
        """A scalar of the test metrics: `wa`, `ua`, `macro_f1` or `recall/<class>`."""
        if metric.startswith("recall/"):
            return self.test["per_class_recall"].get(metric.split("/", 1)[1])
        return self.test[metric]


@dataclass
class Experiment:
    """The runs of one experiment folder, with what is missing and unfinished."""

    folder: Path
    name: str
    variant: str
    runs: list[Run]
    expected: list[tuple[int, int | None]]
    """(fold, seed) pairs the experiment should hold; seed None: whatever seed the run has."""
    missing: list[tuple[int, int | None]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    """Run folders not counted, and why (not in the plan, unreadable)."""

    @property
    def finished(self) -> list[Run]:
        return [run for run in self.runs if run.finished]

    @property
    def unfinished(self) -> list[Run]:
        return [run for run in self.runs if not run.finished]

    def label_names(self) -> list[str]:
        for run in self.finished:
            return list(run.test["per_class_recall"])
        return []

    def folds(self) -> list[int]:
        return sorted({run.fold for run in self.finished})

    @cached_property
    def dataset(self) -> DatasetInfo:
        """The description of the data the runs trained on (IEMOCAP's when it cannot be read), read
        once: every fold row and figure asks for it, and on object storage each read is a request."""
        for run in self.runs:
            try:
                return read_dataset_info(str(run.config["data"]["path"]))
            except (OSError, ValueError, KeyError, TypeError):
                break
        return IEMOCAP_INFO

    def test_text(self, fold: int) -> str:
        """What fold `fold` tests on: `session 3`, a group's folder name, `test`..."""
        info = self.dataset
        try:
            groups = [info.folder(g) for g in info.fold(fold).test]
        except (KeyError, StopIteration):
            return "?"
        if info.fold_kind == "sessions":
            return ", ".join(name.replace("session", "session ") for name in groups)
        return ", ".join(groups)

    def fold_value(self, fold: int, metric: str) -> float | None:
        """The fold's figure: the mean over its finished seeds (None where a class has no recall)."""
        values = [run.value(metric) for run in self.finished if run.fold == fold]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def fold_values(self, metric: str) -> dict[int, float]:
        values = {fold: self.fold_value(fold, metric) for fold in self.folds()}
        return {fold: v for fold, v in values.items() if v is not None}


class ReportError(ValueError):
    """An experiment folder that cannot be read, or nothing finished to report."""


# ---------------------------------------------------------------------------------------------
# Reading run folders.


def _is_run_folder(folder: Path) -> bool:
    """A folder a training started in; `best/` holds a copy of its config.yaml."""
    return RunFolder(folder).is_started() and folder.name != BEST_DIR


def read_run(folder: Path) -> Run:
    """A run folder's config and, when it finished, its metrics. Raises ReportError when its files
    cannot be read (say, a metrics.json cut short)."""
    run_folder = RunFolder(folder)
    try:
        config = run_folder.read_config()
        fold, seed = int(config["data"]["fold"]), int(config["train"]["seed"])
        metrics = run_folder.finished_metrics(tested=True)  # fold 0 (no test): nothing to report
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as err:
        raise ReportError(f"{folder}: unreadable run ({type(err).__name__}: {' '.join(str(err).split())})") from None
    return Run(folder=folder, fold=fold, seed=seed, config=config, metrics=metrics)


def _expected_folds(runs: list[Run]) -> list[int]:
    """Without a cv.json: every fold of the data the runs trained on."""
    for run in runs:
        try:
            return read_dataset_info(str(run.config["data"]["path"])).fold_numbers()
        except (OSError, ValueError, KeyError, TypeError):
            break
    return IEMOCAP_INFO.fold_numbers()


def read_experiment(folder: str | Path) -> Experiment:
    """The run folders under `folder` (one or two levels down), checked against what it expects:
    its cv.json (folds x seeds), else folds 1-5 with whatever seed each run has. A run the plan does
    not list, or one that cannot be read, is named in `ignored` and not counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such experiment folder")
    candidates = sorted({p.parent for p in folder.glob(f"*/{CONFIG_FILE}")} | {p.parent for p in folder.glob(f"*/*/{CONFIG_FILE}")})
    runs, ignored = [], []
    for candidate in candidates:
        if _is_run_folder(candidate) and not _is_run_folder(candidate.parent):
            try:
                runs.append(read_run(candidate))
            except ReportError as err:
                ignored.append(str(err))
    plan_file = folder / CV_PLAN_FILE
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if plan is None and not runs:
        raise ReportError(f"{folder}: no run folder (with a config.yaml) and no {CV_PLAN_FILE}")
    if plan is not None:
        name, variant = plan["experiment"], plan["variant"]
        expected = [(fold, seed) for seed in plan["seeds"] for fold in plan["folds"]]
        for run in [run for run in runs if (run.fold, run.seed) not in expected]:
            runs.remove(run)
            ignored.append(f"{run.folder}: fold {run.fold} seed {run.seed} is not in {plan_file.name} "
                           f"(folds {plan['folds']}, seeds {plan['seeds']}): not counted")
    else:
        name = runs[0].config.get("experiment", folder.name)
        variant = runs[0].config.get("model", {}).get("variant", "?")
        expected = [(fold, None) for fold in _expected_folds(runs)]
    names = {run.config.get("experiment") for run in runs} - {name}
    if names:
        raise ReportError(f"{folder} mixes experiments {sorted(names | {name})}: give each its own folder")
    seen: dict[tuple[int, int], Path] = {}
    for run in runs:
        if (run.fold, run.seed) in seen:
            raise ReportError(f"{folder}: two runs of fold {run.fold} seed {run.seed} ({seen[(run.fold, run.seed)]}, "
                              f"{run.folder}): keep one")
        seen[(run.fold, run.seed)] = run.folder

    def present(fold: int, seed: int | None) -> bool:
        return any(run.fold == fold and (seed is None or run.seed == seed) for run in runs)

    missing = [(fold, seed) for fold, seed in expected if not present(fold, seed)]
    return Experiment(folder=folder, name=name, variant=variant, runs=runs, expected=expected, missing=missing,
                      ignored=ignored)


# ---------------------------------------------------------------------------------------------
# Statistics.


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def paired_difference(experiment: Experiment, reference: Experiment, metric: str) -> dict | None:
    """Per-fold `experiment - reference` over the folds both finished: mean, sd, wins, folds."""
    mine, theirs = experiment.fold_values(metric), reference.fold_values(metric)
    folds = sorted(set(mine) & set(theirs))
    if not folds:
        return None
    differences = [mine[f] - theirs[f] for f in folds]
    mean, sd = mean_sd(differences)
    return {"mean": mean, "sd": sd, "wins": sum(d > 0 for d in differences), "folds": len(folds),
            "per_fold": dict(zip(folds, differences))}


def summarize(experiment: Experiment, reference: Experiment | None = None) -> dict[str, Any]:
    """Mean and sd over folds of every metric (per-class recalls too), and paired deltas."""
    row: dict[str, Any] = {"experiment": experiment.name, "variant": experiment.variant,
                           "folds": len(experiment.folds()), "runs": len(experiment.finished)}
    for metric in (*METRICS, *(f"recall/{c}" for c in experiment.label_names())):
        values = list(experiment.fold_values(metric).values())
        row[metric] = mean_sd(values) if values else (None, None)
    if reference is not None and reference is not experiment:
        for metric in ("ua", "wa"):
            row[f"delta_{metric}"] = paired_difference(experiment, reference, metric)
    return row


# ---------------------------------------------------------------------------------------------
# Writing.


def _pm(mean: float | None, sd: float | None, scale: float = 100.0, signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean * scale:+.1f}" if signed else f"{mean * scale:.1f}"
    return text + (f" ± {sd * scale:.1f}" if sd is not None else "")


def side_by_side(experiments: list[Experiment]) -> str:
    """The Markdown comparison table (percentages; mean ± sd over folds; Δ against the first)."""
    reference = experiments[0]
    labels = reference.label_names()
    header = ["experiment", "variant", "folds", "WA", "UA", "macro-F1", *(f"recall {c}" for c in labels)]
    if len(experiments) > 1:
        header += [f"Δ UA vs {reference.name}", "folds won (UA)", "Δ WA", "folds won (WA)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for experiment in experiments:
        row = summarize(experiment, reference)
        cells = [experiment.name, experiment.variant, f"{row['folds']}/{len({f for f, _ in experiment.expected})}",
                 *(_pm(*row[m]) for m in METRICS), *(_pm(*row.get(f"recall/{c}", (None, None))) for c in labels)]
        if len(experiments) > 1:
            for metric in ("ua", "wa"):
                delta = row.get(f"delta_{metric}")
                if experiment is reference:
                    cells += ["(reference)" if metric == "ua" else "", ""]
                elif delta is None:
                    cells += ["–", ""]
                else:
                    cells += [_pm(delta["mean"], delta["sd"], signed=True), f"{delta['wins']}/{delta['folds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_fold_table(experiment: Experiment) -> str:
    labels = experiment.label_names()
    header = ["fold", "test", "seeds", "n", "WA", "UA", "macro-F1", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fold in experiment.folds():
        runs = [run for run in experiment.finished if run.fold == fold]
        cells = [str(fold), experiment.test_text(fold), ",".join(str(r.seed) for r in runs), str(runs[0].test["n"])]
        for metric in (*METRICS, *(f"recall/{c}" for c in labels)):
            values = [v for v in (run.value(metric) for run in runs) if v is not None]
            cells.append(_pm(*mean_sd(values)) if values else "–")
        lines.append("| " + " | ".join(cells) + " |")
    row = summarize(experiment)
    cells = ["mean ± sd", "", "", ""] + [_pm(*row[m]) for m in METRICS]
    cells += [_pm(*row.get(f"recall/{c}", (None, None))) for c in labels]
    lines.append("| " + " | ".join(f"**{c}**" if c else "" for c in cells) + " |")
    return "\n".join(lines)


def status_lines(experiment: Experiment) -> list[str]:
    """One line per expected run that is missing or unfinished (the seed named when there are several)."""
    several_seeds = len({seed for _, seed in experiment.expected} | {run.seed for run in experiment.runs}) > 1

    def which(fold: int, seed: int | None) -> str:
        return f"fold {fold}" + (f" seed {seed}" if several_seeds and seed is not None else "")

    lines = [f"- {experiment.name}: {which(fold, seed)} is missing (no run folder)" for fold, seed in experiment.missing]
    lines += [f"- {experiment.name}: {which(run.fold, run.seed)} is unfinished ({run.folder}: no test metrics yet)"
              for run in experiment.unfinished]
    lines += [f"- {experiment.name}: {reason}" for reason in experiment.ignored]
    return lines


def merges_text(codes_per_label: dict[str, tuple[str, ...]]) -> str:
    """"; *happy* = the source's codes exc + hap" for each label that several codes were merged into,
    from what prepare kept (nothing where one code stands behind each label; a note where it was not
    recorded)."""
    if not codes_per_label:  # IEMOCAP prepared then may or may not hold excited among happy: not claimed
        return "; which of the source's codes each class holds was not recorded (prepared by an older emotrain)"
    merged = [f"*{label}* = {' + '.join(f'`{code}`' for code in codes)}"
              for label, codes in codes_per_label.items() if len(codes) > 1]
    return ("; merged from the data's own codes: " + ", ".join(merged)) if merged else ""


def protocol_text(experiments: list[Experiment]) -> str:
    runs = [run for e in experiments for run in e.finished]
    data = runs[0].config["data"]
    labels = experiments[0].label_names()
    info = experiments[0].dataset
    if any(spec.validation for spec in info.folds):
        validation = "the corpus' own validation split"
    elif data.get("validation") == "fraction" or not info.has_speakers:
        validation = (f"a random {data['validation_fraction']:.0%} of the training groups' utterances (seeded)"
                      + ("; the data has no speakers, so it may share speakers with training" if not info.has_speakers else ""))
    else:
        validation = f"{data['validation_speakers']} held-out speaker(s) drawn from the training groups (seeded)"
    folds = {
        "sessions": "- Leave-one-session-out cross-validation: fold k tests on session k and trains on the other sessions.",
        "groups": "- Leave-one-group-out cross-validation: fold k tests on group k and trains on the other groups.",
        "split": "- The corpus' predefined split: one fold, trained on `train`, tested on `test`.",
        "emobox": "- EmoBox's official folds: fold k tests on its fold_k test list and trains on its train list.",
    }[info.fold_kind]
    return "\n".join([
        f"- Classes: {len(labels)} ({', '.join(labels)})" + merges_text(info.codes_per_label) + ".",
        f"- Data: {info.source or '?'}.",
        folds,
        f"- Validation: {validation}; never the test data.",
        "- Model selection: the checkpoint with the best validation UA; the test data is scored once, at the end.",
        "- WA = accuracy over all test utterances; UA = mean of the per-class recalls (unweighted).",
        "- Mean ± sd: over folds (sample sd, n - 1); with several seeds a fold's figure is their mean.",
        "- Paired difference: per fold, the experiment minus the reference, then mean ± sd over the shared folds.",
    ])


def counts_table(experiments: list[Experiment]) -> str:
    """Utterances per group (session) × class, from the prepare report of the data the runs trained on."""
    path_text = experiments[0].finished[0].config["data"]["path"]
    report_file = join(path_text, REPORT_FILE)  # a local folder or a URL (s3://...)
    report = read_prepare_report(path_text)
    if report is None:
        return f"(no prepare report at {report_file}: counts per session × class unavailable)"
    counts = report["counts"]
    labels = experiments[0].label_names()
    lines = ["| group | " + " | ".join(labels) + " | total |", "|" + "---|" * (len(labels) + 2)]
    totals = dict.fromkeys(labels, 0)
    for session, row in counts.items():
        lines.append(f"| {session} | " + " | ".join(str(row.get(c, 0)) for c in labels) + f" | {row['total']} |")
        for c in labels:
            totals[c] += row.get(c, 0)
    lines.append("| **all** | " + " | ".join(f"**{totals[c]}**" for c in labels) + f" | **{sum(totals.values())}** |")
    return f"From `{report_file}` ({report.get('source', '?')}):\n\n" + "\n".join(lines)


def provenance_table(experiments: list[Experiment]) -> str:
    lines = ["| experiment | fold | seed | git commit | emotrain | torch | transformers | accelerate | datasets | deepspeed | processes | precision |",
             "|" + "---|" * 12]
    for experiment in experiments:
        for run in sorted(experiment.finished, key=lambda r: (r.fold, r.seed)):
            p = run.config.get("provenance") or {}
            packages = p.get("packages", {})
            lines.append("| " + " | ".join([
                experiment.name, str(run.fold), str(run.seed), str(p.get("git_commit", "–")),
                *(str(packages.get(name, "–")) for name in ("emotrain", "torch", "transformers", "accelerate", "datasets", "deepspeed")),
                str(p.get("world_size", "–")), str(run.config.get("train", {}).get("mixed_precision", "–")),
            ]) + " |")
    return "\n".join(lines)


def write_csvs(experiments: list[Experiment], out: Path) -> None:
    reference = experiments[0]
    labels = reference.label_names()
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "variant", "fold", "seed", "n", "wa", "ua", "macro_f1",
                         *(f"recall_{c}" for c in labels), "best_step", "folder"])
        for experiment in experiments:
            for run in sorted(experiment.finished, key=lambda r: (r.fold, r.seed)):
                writer.writerow([experiment.name, experiment.variant, run.fold, run.seed, run.test["n"],
                                 *(run.value(m) for m in METRICS),
                                 *(run.value(f"recall/{c}") for c in labels), run.metrics.get("best_step"), run.folder])
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        metrics = (*METRICS, *(f"recall/{c}" for c in labels))
        writer.writerow(["experiment", "variant", "folds", "runs",
                         *(f"{m.replace('/', '_')}_{stat}" for m in metrics for stat in ("mean", "sd")),
                         "delta_ua_mean", "delta_ua_sd", "delta_ua_wins", "delta_wa_mean", "delta_wa_sd", "delta_wa_wins",
                         "paired_folds"])
        for experiment in experiments:
            row = summarize(experiment, reference)
            cells = [experiment.name, experiment.variant, row["folds"], row["runs"]]
            for m in metrics:
                cells += list(row.get(m, (None, None)))
            for key in ("delta_ua", "delta_wa"):
                delta = row.get(key)
                cells += [delta["mean"], delta["sd"], delta["wins"]] if delta else ["", "", ""]
            delta = row.get("delta_ua")
            cells.append(delta["folds"] if delta else "")
            writer.writerow(["" if c is None else c for c in cells])


def build_report(experiment_dirs: list[str | Path], out: str | Path, *, plots: bool = True) -> dict:
    """Read the experiments, write the report files into `out`; returns what was written and found."""
    experiments = [read_experiment(d) for d in experiment_dirs]
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ReportError(f"the same experiment is given twice: {names}")
    empty = [e.name for e in experiments if not e.finished]
    if empty:
        raise ReportError(f"nothing finished to report for {', '.join(empty)}: " + "; ".join(
            line[2:] for e in experiments for line in status_lines(e)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    status = [line for e in experiments for line in status_lines(e)]
    table = side_by_side(experiments)
    sections = [
        "# Results", "",
        f"Test metrics in %, mean ± sd over the folds ({experiments[0].dataset.fold_kind})"
        + (f"; Δ: paired per-fold difference against {experiments[0].name}, folds won = folds where it is higher." if len(experiments) > 1 else "."),
        "", table, "",
    ]
    if status:
        sections += ["**Not counted** (only finished runs are):", "", *status, ""]
    sections += ["## Protocol", "", protocol_text(experiments), "",
                 "## Utterances per group (session) × class", "", counts_table(experiments), ""]
    for experiment in experiments:
        sections += [f"## {experiment.name} per fold", "", per_fold_table(experiment), ""]
        if len(experiments) > 1 and experiment is not experiments[0]:
            delta = paired_difference(experiment, experiments[0], "ua")
            if delta:
                per_fold = ", ".join(f"fold {f}: {d * 100:+.1f}" for f, d in delta["per_fold"].items())
                sections += [f"UA − {experiments[0].name}'s, per fold: {per_fold}.", ""]
    sections += ["## Runs (code and packages)", "", provenance_table(experiments), ""]
    for experiment in experiments:
        status += add_cross_validation_to_model_cards(experiment)[1]
    figures: dict[Path, str] = {}
    if plots:
        figures = write_figures(experiments, out)
        sections += ["## Figures", "", *(f"![{alt}]({path.relative_to(out)})" for path, alt in figures.items()), ""]
    images = list(figures)
    (out / "report.md").write_text("\n".join(sections))
    write_csvs(experiments, out)
    uses_wandb = "wandb" in (experiments[0].finished[0].config.get("logging", {}).get("report_to") or [])
    return {"experiments": experiments, "table": table, "status": status, "images": images, "out": out,
            "wandb": uses_wandb, "files": [out / "report.md", out / "summary.csv", out / "runs.csv", *images]}


def add_cross_validation_to_model_cards(experiment: Experiment) -> tuple[list[Path], list[str]]:
    """Put the experiment's per-fold table into the model card (best/README.md) of each finished run,
    saying which fold the card's model is. Returns the cards written (a card without the section's
    markers, written before they existed, is left as it is) and a status line for each card that
    could not be written (a read-only results tree is still reported on)."""
    table, row, status = per_fold_table(experiment), summarize(experiment), status_lines(experiment)
    written, failed = [], []
    for run in experiment.finished:
        card = run.folder / BEST_DIR / CARD_FILE
        body = "\n".join([
            f"## Cross-validation ({experiment.name}, {experiment.dataset.fold_kind})", "",
            f"This model is fold {run.fold} (seed {run.seed}) of the {len(experiment.folds())} folds below. Test "
            f"metrics in %; mean ± sd over the folds: UA {_pm(*row['ua'])}, WA {_pm(*row['wa'])}.", "", table,
            *(["", "Not counted (only finished runs are):", *map(without_local_paths, status)] if status else []),
        ])
        try:
            if replace_card_section(card, CROSS_VALIDATION, body):
                written.append(card)
        except OSError as err:
            failed.append(f"- {experiment.name}: the model card {card} was not updated ({err.strerror or err})")
    return written, failed


def write_figures(experiments: list[Experiment], out: Path) -> dict[Path, str]:
    """Every figure of the report (see the module docstring): the PNGs written under `out`, each with
    its alt text (its title, which names the experiment and fold, so no two are alike)."""
    figures: dict[Path, str] = {}
    for experiment in experiments:
        folder = out / experiment.name
        folder.mkdir(parents=True, exist_ok=True)
        labels = experiment.label_names()
        pooled = np.zeros((len(labels), len(labels)))
        for fold in experiment.folds():
            runs = [run for run in experiment.finished if run.fold == fold]
            confusion = sum(np.asarray(run.test["confusion"], dtype=np.float64) for run in runs)
            pooled += confusion
            seeds = "" if len(runs) == 1 else f", {len(runs)} seeds summed"
            title = f"{experiment.name}: test confusion, fold {fold} (test {experiment.test_text(fold)}{seeds})"
            figures[plotting.confusion_figure(confusion, labels, title, folder / f"confusion_fold{fold}.png")] = title
            title = f"{experiment.name}: training curves, fold {fold}, seed {runs[0].seed}"
            figures[plotting.curves_figure(curves(runs[0]), title, folder / f"curves_fold{fold}.png")] = title
        title = f"{experiment.name}: test confusion pooled over folds {', '.join(map(str, experiment.folds()))}"
        figures[plotting.confusion_figure(pooled, labels, title, folder / "confusion_pooled.png")] = title
    title = "test UA by experiment: mean ± sd over folds, one dot per fold"
    figures[plotting.ua_bar_figure([e.name for e in experiments], [e.fold_values("ua") for e in experiments],
                                   out / "ua_by_experiment.png")] = title
    return figures


def say_report(report: dict, out: Path, wandb: bool | None = None) -> None:
    """Print what was not counted and where the report is; log it to W&B when the runs did (or asked)."""
    for line in report["status"]:
        print(line)
    print(f"report: {out / 'report.md'} (+ summary.csv, runs.csv, {len(report['images'])} figures)")
    if wandb or (wandb is None and report["wandb"]):
        settings = report_wandb_settings(report)
        print(settings.describe())
        print(f"W&B: the table and figures are in the summary run {log_to_wandb(report, settings)}")


def report_wandb_settings(report: dict, environ: Mapping[str, str] | None = None) -> WandbSettings:
    """The summary run's W&B settings, resolved as the runs' were (`wandb_settings`): the first run's
    logging config, then W&B's environment variables (`environ`: os.environ by default); files in
    the report folder, the group of the first experiment by default."""
    experiments: list[Experiment] = report["experiments"]
    saved = experiments[0].finished[0].config.get("logging") or {}
    logging = LoggingConfig(**{f.name: saved[f.name] for f in fields(LoggingConfig) if f.name in saved})
    return wandb_settings(logging, os.environ if environ is None else environ, default_dir=report["out"],
                          default_group=experiments[0].name)


def log_to_wandb(report: dict, settings: WandbSettings) -> str:
    """One W&B summary run holding the comparison table and the figures, in the runs' group
    (job type `report`), with the runs' project, entity and mode (`settings`). Returns its id."""
    os.environ.setdefault("WANDB_SILENT", "true")  # its console chatter; the caller says where the run is
    import wandb

    experiments: list[Experiment] = report["experiments"]
    group = settings.group
    labels = experiments[0].label_names()
    columns = ["experiment", "variant", "folds", "runs", *(f"{m}_{stat}" for m in (*METRICS, *(f"recall_{c}" for c in labels))
                                                        for stat in ("mean", "sd")), "delta_ua_mean", "delta_ua_sd", "folds_won"]
    rows = []
    for experiment in experiments:
        row = summarize(experiment, experiments[0])
        cells = [experiment.name, experiment.variant, row["folds"], row["runs"]]
        for metric in (*METRICS, *(f"recall/{c}" for c in labels)):
            cells += list(row.get(metric, (None, None)))
        delta = row.get("delta_ua")
        cells += [delta["mean"], delta["sd"], delta["wins"]] if delta else [None, None, None]
        rows.append(cells)
    # One summary run per comparison: the same experiments give the same id, so a rewritten report
    # (a rerun of cv, another `emotrain report`) updates that run instead of adding one.
    run_id = "report-" + hashlib.blake2b("\x1f".join([group, *(e.name for e in experiments)]).encode(),
                                         digest_size=6).hexdigest()
    Path(settings.dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(**settings.init_kwargs(), job_type="report", name=f"{group}-report", id=run_id, resume="allow",
                     config={"experiments": [e.name for e in experiments],
                             "folds": {e.name: e.folds() for e in experiments}})
    run.log({"results": wandb.Table(columns=columns, data=rows),
             **{f"figures/{path.relative_to(report['out']).with_suffix('').as_posix()}": wandb.Image(str(path))
                for path in report["images"]}})
    for experiment, cells in zip(experiments, rows):
        run.summary[f"{experiment.name}/ua_mean"] = cells[columns.index("ua_mean")]
        run.summary[f"{experiment.name}/wa_mean"] = cells[columns.index("wa_mean")]
    run.finish()
    return run_id


CURVES = ("train/loss", "eval/loss", "eval/ua", "eval/wa")
"""The history's keys `curves` reads: training loss, validation loss, WA and UA."""
EARLIER_NAMES = {"validation/ua": "eval/ua", "validation/wa": "eval/wa"}
"""Validation's names in the histories of runs trained before it was logged under the HF Trainer's `eval/`."""


def curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} from the run's history (`CURVES`)."""
    history = read_history(RunFolder(run.folder).history)
    series: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        record = {EARLIER_NAMES.get(key, key): value for key, value in record.items()}
        for key in CURVES:
            value = record.get(key)
            if value is not None and math.isfinite(value):
                series.setdefault(key, []).append((int(record["train/step"]), float(value)))
    return series
