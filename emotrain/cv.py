"""`emotrain cv`: cross-validation over the prepared dataset's folds (IEMOCAP: leave-one-session-out), every (variant, seed, fold) a normal run.

    emotrain cv configs/smoke.yaml --folds 1,2 --variants fusion,audio,text      # one after another
    emotrain cv configs/paper.yaml --variants fusion,audio,text \
        --launcher "accelerate launch --config_file launch/ddp.yaml -m emotrain.cli"      # on all GPUs
    emotrain cv configs/paper.yaml --variants fusion,audio,text --slurm --sbatch=--gpus-per-node=4   # Slurm

Each run is `emotrain train CONFIG ... data.fold=k train.seed=s model.variant=v` in its own
folder, from the config's `output_dir` template (`runs/{experiment}/fold{fold}`; with `--seeds`,
`...-seed{seed}` is added unless the template names `{seed}`). A variant other than the config's
own is its own experiment, `<experiment>-<variant>` (`paper` + `--variants audio` trains
`paper-audio`, exactly what configs/audio_only.yaml names). Each experiment folder gets `cv.json`
(the folds and seeds it expects), which `emotrain report` reads.

Rerunning the same command skips finished runs (`RunFolder.is_finished`: their `metrics.json` holds
the results written at their end; their saved config is checked against the new one, and the data they trained on
against `data.path`'s) and resumes an unfinished one from its newest checkpoint. Runs are subprocesses: a crash in one does not end the others (the exit code says so).
A stop request (SIGTERM, SIGINT, SIGUSR1, SIGHUP) is passed on to the running training as SIGTERM:
it saves and exits with 75, and so does `cv`. If `cv` itself is killed, the training gets SIGTERM
from the kernel (parent-death signal) and saves the same way; a rerun waits for it to finish saving
(every training holds its run folder's lock, `.lock`, for its whole life).

With `--slurm` the unfinished runs are submitted as one array job (`slurm/cv.sbatch`, each task
through `slurm/train.sbatch`: preemption and requeue included) and `slurm/report.sbatch` as a job
that depends on the whole array (afterany), so the table is written once every task has ended.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from emotrain.config import Config, ConfigError, load_config, load_config_data, our_overrides
from emotrain.data.folds import Metadata, read_metadata, split_from_config
from emotrain.data.shards import read_dataset_info
from emotrain.data.state import data_fingerprint
from emotrain.report import CV_PLAN_FILE
from emotrain.train.preemption import EXIT_PREEMPTED
from emotrain.train.run_folder import RunFolder, wait_until_free
from emotrain.train.tracking import WANDB_ENV

TASKS_FILE = "cv-tasks.json"
"""With --slurm: the array's tasks (config and overrides of each), read by slurm/cv.sbatch; one file
per submission, `cv-tasks-<time>-<pid>.json`."""
DEFAULT_LAUNCHER = (sys.executable, "-m", "emotrain.cli")
VARIANTS = ("fusion", "audio", "text")


@dataclass(frozen=True)
class PlannedRun:
    """One training run of the cross-validation: `emotrain train config *overrides`."""

    config: str
    overrides: tuple[str, ...]
    experiment: str
    variant: str
    fold: int
    seed: int
    output_dir: Path

    @property
    def experiment_dir(self) -> Path:
        return self.output_dir.parent

    def describe(self) -> str:
        return f"{self.experiment} fold {self.fold} seed {self.seed}"


def cross_validate(configs: list[str], overrides: list[str], *, folds: list[int] | None = None,
                   seeds: list[int] | None = None, variants: list[str] | None = None,
                   launcher: list[str] | None = None, report_dir: Path | None = None, slurm: bool = False,
                   sbatch_args: list[str] = (), report_sbatch_args: list[str] = (), verbose: bool = False) -> int:
    """`emotrain cv`: plan, train every unfinished run (or submit them to Slurm), print the report.
    Returns the exit code (0; 1 when a run failed; EXIT_PREEMPTED after a stop request; 2 when the
    Slurm submission failed)."""
    from emotrain.data.folds import check_config_fits_dataset, check_prepared
    from emotrain.report import ReportError, build_report, say_report

    runs = plan_runs(configs, overrides, folds=folds, seeds=seeds, variants=variants)
    experiment_dirs = write_plans(runs)
    report_out = report_dir or experiment_dirs[0] / "report"
    print(f"cross-validation: {len(runs)} run(s) in {', '.join(map(str, experiment_dirs))}", flush=True)
    if slurm:
        try:
            submit_to_slurm(runs, experiment_dirs, report_out, sbatch_args=list(sbatch_args),
                            report_sbatch_args=list(report_sbatch_args))
        except RuntimeError as err:
            print(f"emotrain cv: error: {err}", file=sys.stderr)
            return 2
        return 0
    for run in runs:  # every variant: fusion on data without transcripts is refused before any training
        cfg = load_config(run.config, run.overrides)
        check_config_fits_dataset(cfg.data, cfg.model, check_prepared(cfg.data.path))
    code, _ = run_sequentially(runs, launcher=list(launcher or DEFAULT_LAUNCHER), say=lambda line: print(line, flush=True),
                               verbose=verbose)
    if code == EXIT_PREEMPTED:
        return code
    try:
        report = build_report(experiment_dirs, report_out)
    except ReportError as err:
        print(f"emotrain cv: no report: {err}", file=sys.stderr)
        return 1
    print(f"\n{report['table']}\n")
    say_report(report, report_out)
    return code


def parse_list(text: str | None, kind, what: str) -> list | None:
    """`"1,2,3"` → [1, 2, 3]; None stays None."""
    if text is None:
        return None
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(what, f"expected a comma-separated list, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise ConfigError(what, f"expected distinct values, got {text!r}")
    return values


def plan_runs(
    configs: list[str],
    overrides: list[str],
    *,
    folds: list[int] | None = None,
    seeds: list[int] | None = None,
    variants: list[str] | None = None,
) -> list[PlannedRun]:
    """Every run of the cross-validation, validated (a bad key fails here, before any training).
    The folds are the prepared dataset's (`dataset.json`; IEMOCAP's 1..5 when it has none)."""
    # HF Trainer names as our keys first: cv adds its own train.seed=..., which `seed=3` would clash with.
    overrides = our_overrides(overrides)
    for config in configs:
        path = load_config(config, overrides).data.path
        try:
            available = read_dataset_info(path).fold_numbers()
        except ConfigError:  # storage that cannot be reached: already one line naming data.path
            raise
        except ValueError as err:  # a dataset.json that is not one
            raise ConfigError("data.path", str(err)) from None
        bad = [f for f in folds or () if f not in available]
        if bad:
            raise ConfigError("--folds", f"the prepared dataset at {path} has folds {available}, got {bad}")
        folds = folds or available
    bad = [v for v in variants or () if v not in VARIANTS]
    if bad:
        raise ConfigError("--variants", f"must be among {list(VARIANTS)}, got {bad}")
    runs: list[PlannedRun] = []
    comparison_group = None  # W&B: a comparison (several variants or configs) in one group
    if len(configs) * len(variants or [None]) > 1:
        comparison_group = load_config(configs[0], overrides).experiment
    for config in configs:
        base = load_config(config, overrides)
        data = load_config_data(config, overrides)
        template = data.get("output_dir") or type(base).output_dir
        if seeds and "{seed}" not in template:
            template += "-seed{seed}"
        for variant in variants or [base.model.variant]:
            experiment = base.experiment if variant == base.model.variant else f"{base.experiment}-{variant}"
            extra = [f"experiment={experiment}", f"model.variant={variant}"]
            # W&B's own WANDB_RUN_GROUP, when set, groups the runs instead (`wandb_settings`).
            if comparison_group is not None and base.logging.group is None and not os.environ.get(WANDB_ENV["group"]):
                extra.append(f"logging.group={comparison_group}")
            for seed in seeds or [base.train.seed]:
                for fold in folds:
                    run_overrides = (*overrides, *extra, f"train.seed={seed}", f"data.fold={fold}",
                                     f"output_dir={template}", *_seed_run_name(base, experiment, fold, seed, seeds))
                    cfg = load_config(config, run_overrides)
                    runs.append(PlannedRun(config, run_overrides, experiment, variant, fold, seed, Path(cfg.output_dir)))
    by_experiment: dict[str, set[Path]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, set()).add(run.experiment_dir)
    for experiment, dirs in by_experiment.items():
        if len(dirs) > 1:
            raise ConfigError("output_dir", f"the runs of {experiment} land in {len(dirs)} folders ({sorted(map(str, dirs))}): "
                              "cross-validation needs them side by side in one experiment folder (…/{experiment}/fold{fold})")
    folders = [run.output_dir for run in runs]
    if len(set(folders)) != len(folders):
        raise ConfigError("output_dir", "two runs of the cross-validation would share a folder: "
                          "give each config its own experiment name")
    return runs


def _seed_run_name(base: Config, experiment: str, fold: int, seed: int, seeds: list[int] | None) -> tuple[str, ...]:
    """With --seeds, the trackers' run name says the seed too (`<experiment>-fold<k>-seed<s>`), as the
    run folder does: the runs of one fold are otherwise namesakes in W&B. A config's own run name is kept."""
    if not seeds or base.logging.run_name is not None:
        return ()
    return (f"logging.run_name={experiment}-fold{fold}-seed{seed}",)


def experiments_of(runs: list[PlannedRun]) -> dict[Path, dict]:
    """{experiment folder: its cv.json content}, in the order of the runs."""
    plans: dict[Path, dict] = {}
    for run in runs:
        plan = plans.setdefault(run.experiment_dir, {"experiment": run.experiment, "variant": run.variant,
                                                     "config": run.config, "folds": [], "seeds": []})
        if run.fold not in plan["folds"]:
            plan["folds"].append(run.fold)
        if run.seed not in plan["seeds"]:
            plan["seeds"].append(run.seed)
    return plans


def write_plans(runs: list[PlannedRun]) -> list[Path]:
    dirs = []
    for folder, plan in experiments_of(runs).items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CV_PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
        dirs.append(folder)
    return dirs


class DataFingerprints:
    """The `data_fingerprint` of each planned run's data (its fold's split of `data.path`), computed
    when first asked; the metadata of a `data.path` is read once for all its runs."""

    def __init__(self) -> None:
        self._metadata: dict[str, Metadata] = {}

    def of(self, cfg: Config) -> dict:
        if cfg.data.path not in self._metadata:
            self._metadata[cfg.data.path] = read_metadata(cfg.data.path)
        return data_fingerprint(split_from_config(cfg.data, seed=cfg.train.seed, meta=self._metadata[cfg.data.path]))


def check_finished_run(run: PlannedRun, fingerprints: DataFingerprints) -> str | None:
    """Raise RunFolderConflict for a finished run whose saved config differs in a result-changing key,
    or that trained on other data than this `data.path`'s: it is no result of this cross-validation,
    and skipping it would mix two experiments in the table. Returns a note for a run that cannot be
    checked (`RunFolder.check_data`)."""
    cfg = load_config(run.config, run.overrides)
    folder = RunFolder(run.output_dir)
    folder.check_config(cfg)
    return folder.check_data(cfg.data.path, lambda: fingerprints.of(cfg))


def check_finished_runs(runs: list[PlannedRun], fingerprints: DataFingerprints | None = None) -> None:
    """`check_finished_run` for every finished run, before anything trains."""
    fingerprints = fingerprints or DataFingerprints()
    for run in runs:
        if RunFolder(run.output_dir).is_finished():
            check_finished_run(run, fingerprints)


# ---------------------------------------------------------------------------------------------
# Running the trainings one after another.


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `cv` dies (even by SIGKILL), so the run saves."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Progress:
    """The cross-validation's overall line, said after each run ends: `[cv] 2/6 runs finished, ETA 3 min`.

    The ETA is the mean duration of the runs trained to the end by this invocation times the runs
    left; runs found finished count as done but say nothing about how long one takes, and neither
    does a failed one (it may have failed at once). `clock`: seconds, monotonic (tests pass a fake)."""

    def __init__(self, total: int, clock=time.monotonic):
        self.total, self.clock = total, clock
        self.done, self.failed = 0, 0
        self.durations: list[float] = []
        self._started: float | None = None

    def run_started(self) -> None:
        self._started = self.clock()

    def run_ended(self, *, trained: bool = False, failed: bool = False) -> str:
        """Count one run (`trained`: this invocation trained it to the end; `failed`: it failed;
        neither: it was found finished); returns the line to say."""
        if trained:
            self.durations.append(self.clock() - self._started)
        self.done += 1
        self.failed += failed
        return self.line()

    def line(self) -> str:
        failed = f" ({self.failed} failed)" if self.failed else ""
        left = self.total - self.done
        eta = f", ETA {_minutes(left * sum(self.durations) / len(self.durations))}" if left and self.durations else ""
        return f"[cv] {self.done}/{self.total} runs finished{failed}{eta}"


def _minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "<1 min"
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def run_sequentially(runs: list[PlannedRun], *, launcher: list[str], say=print,
                     verbose: bool = False) -> tuple[int, list[PlannedRun]]:
    """Train every unfinished run, one after another; returns (exit code, failed runs).

    Exit code: 0, or EXIT_PREEMPTED when a stop request ended the cross-validation early
    (rerun the same command to continue), or 1 when some runs failed (the others still ran).
    Each training's resolved config goes to its train.log, and to the console only when `verbose`.
    """
    stop = {"signal": None}
    child: dict[str, subprocess.Popen | None] = {"process": None}

    def forward(signum, frame) -> None:
        stop["signal"] = signum
        process = child["process"]
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the launcher and its workers save and exit with 75

    fingerprints = DataFingerprints()
    check_finished_runs(runs, fingerprints)  # before anything trains: a conflict would otherwise surface hours later
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    failed: list[PlannedRun] = []
    progress = Progress(len(runs))
    quiet = () if verbose else ("logging.print_config=false",)  # (not a result-changing key: logging.*)
    try:
        for i, run in enumerate(runs, 1):
            if stop["signal"] is not None:
                break
            # An earlier cv's training may still be saving here (cv killed, its training not yet
            # done): wait, then its outcome counts.
            wait_until_free(run.output_dir, say)
            if stop["signal"] is not None:
                break
            folder = RunFolder(run.output_dir)
            if folder.is_finished():
                note = check_finished_run(run, fingerprints)
                if note is not None:
                    say(f"[cv {i}/{len(runs)}] {run.describe()}: warning: {note}")
                say(f"[cv {i}/{len(runs)}] {run.describe()}: finished, skipped ({folder.metrics})")
                say(progress.run_ended())
                continue
            resuming = folder.checkpoints.is_dir()
            say(f"[cv {i}/{len(runs)}] {run.describe()}: {'resuming' if resuming else 'training'} in {run.output_dir}")
            started = time.perf_counter()
            progress.run_started()
            process = subprocess.Popen([*launcher, "train", run.config, *run.overrides, *quiet], start_new_session=True,
                                       preexec_fn=_die_with_parent)
            child["process"] = process
            if stop["signal"] is not None:  # a stop request that came while it started
                os.killpg(process.pid, signal.SIGTERM)
            code = process.wait()
            child["process"] = None
            if code == 0 or (folder.is_finished() and stop["signal"] is None):
                # (A non-zero code with the final metrics written: the process failed on its way out,
                # e.g. a gloo abort at interpreter exit, after the run itself had finished.)
                note = "" if code == 0 else f" (it exited with {code} after writing its metrics)"
                say(f"[cv {i}/{len(runs)}] {run.describe()}: done in {time.perf_counter() - started:.0f} s{note}")
                say(progress.run_ended(trained=True))
            elif code == EXIT_PREEMPTED or stop["signal"] is not None:
                say(f"[cv {i}/{len(runs)}] {run.describe()}: stopped (exit {code}); rerun the same command to continue")
                return EXIT_PREEMPTED, failed
            else:
                say(f"[cv {i}/{len(runs)}] {run.describe()}: FAILED with exit code {code} (see {folder.log})")
                failed.append(run)
                say(progress.run_ended(failed=True))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop["signal"] is not None:
        return EXIT_PREEMPTED, failed
    return (1 if failed else 0), failed


# ---------------------------------------------------------------------------------------------
# Slurm: one array job, then the report.


def slurm_script(name: str) -> Path:
    """A script of the source checkout's slurm/ folder (the jobs run from the submit directory)."""
    path = Path(__file__).resolve().parent.parent / "slurm" / name
    if not path.is_file():
        raise RuntimeError(f"{path} not found: --slurm needs emotrain's source checkout (its slurm/ scripts)")
    return path


def submit_to_slurm(runs: list[PlannedRun], report_dirs: list[Path], report_out: Path, *,
                    sbatch_args: list[str], report_sbatch_args: list[str] = (), say=print) -> tuple[int | None, int]:
    """Submit the unfinished runs as an array and the report as a job depending on it.

    Each submission writes its own tasks file (`cv-tasks-<time>.json`), so tasks still pending from
    an earlier submission keep reading theirs. A run submitted twice is safe: the second training to
    start finds the run folder locked and stops at once. The jobs run `emotrain` with this Python
    and these scripts (EMOTRAIN_PYTHON, EMOTRAIN_SLURM_DIR, exported to them). Returns (array job id or None when nothing was left to
    train, report job id).
    """
    check_finished_runs(runs)
    todo = [run for run in runs if not RunFolder(run.output_dir).is_finished()]
    array_id = None
    dependency = []
    if todo:
        tasks_file = report_dirs[0] / f"{TASKS_FILE.removesuffix('.json')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        tasks_file.write_text(json.dumps({"tasks": [
            {"config": run.config, "overrides": list(run.overrides), "output_dir": str(run.output_dir)} for run in todo
        ]}, indent=2) + "\n")
        array_id = _sbatch([f"--array=0-{len(todo) - 1}", *sbatch_args, str(slurm_script("cv.sbatch")), str(tasks_file)])
        say(f"submitted {len(todo)} training run(s) as array job {array_id} ({len(runs) - len(todo)} already finished)")
        dependency = [f"--dependency=afterany:{array_id}"]
    report_id = _sbatch([*dependency, *report_sbatch_args, str(slurm_script("report.sbatch")), "--out", str(report_out),
                         *map(str, report_dirs)])
    say(f"submitted the report as job {report_id}" + (f" (after every task of {array_id})" if array_id else "")
        + f": {report_out}/report.md")
    return array_id, report_id


def _sbatch(args: list[str]) -> int:
    command = ["sbatch", "--parsable", *args]
    # sbatch exports its environment to the job: the jobs find this Python and these scripts.
    env = {**os.environ, "EMOTRAIN_PYTHON": sys.executable, "EMOTRAIN_SLURM_DIR": str(slurm_script("cv.sbatch").parent)}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise RuntimeError("sbatch not found: --slurm submits jobs from a Slurm login node") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return int(proc.stdout.strip().split(";")[0])
