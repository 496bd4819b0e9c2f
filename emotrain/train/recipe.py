"""The training recipe — start reading here: `setup` → `fit` → `finish` over one training state.

    emotrain train configs/smoke.yaml                                   # one process
    accelerate launch --config_file launch/ddp.yaml -m emotrain.cli train configs/paper.yaml
    sbatch slurm/train.sbatch configs/paper.yaml data.fold=3            # Slurm, requeued on preemption

`setup(cfg)` builds the run's parts (`Training`): the accelerator, the run folder (checked, locked),
the data (the training stream, validation and test loaders), the model and optimizer, and the
training state (`emotrain.train.state`), restored from a checkpoint in one call when resuming.
`fit` is the loop. `finish` loads the best checkpoint, exports `best/`, tests it and writes
`metrics.json`, then deletes the checkpoints (unless `train.keep_checkpoints_after_finish`).
Tests drive these same parts (tests/integration/scripts/train_probe.py wraps them).

One optimizer step = `train.gradient_accumulation_steps` micro-batches on every rank. The epoch
plan gives every rank the same number of batches (`emotrain.data.plan`), so every rank takes the
same steps and the epoch ends everywhere at once, with no collective to agree on it. Each
micro-batch's loss is a sum over its utterances scaled by the step's utterance count over all
ranks (`emotrain.train.loss`): every utterance of a step weighs the same, whatever the batch sizes.
The learning rate is a function of the run's progress, the share of its data seen
(`emotrain.train.optim`), set before each step, so it is the same curve on any number of processes.

After each step, the loop logs, validates and carries out `StepRule.step_end`
(`emotrain.train.step_end`), which owns every reason to stop. A stop request (SIGTERM, SIGUSR1 or
the flag file) is agreed on by all ranks at the step boundary, in the step's one small all-reduce
(`emotrain.train.step`: outside logging steps a step makes one host read and one collective besides
DDP's gradient buckets); they save a checkpoint and exit with EXIT_PREEMPTED (75), deferring a due
validation to the resumed run; a stop request before the first step ends the run at once, nothing
to save (`emotrain.train.preemption`). Rerunning the same command (`train.resume=auto`) continues
from the newest checkpoint this run wrote and ends with the same weights and metrics as an
uninterrupted run; rerunning a finished run does nothing (`finished_run`; `train.resume=never` or a
checkpoint folder start it afresh or restart it from there).
Under DDP it may resume on another number of processes: the rest of the interrupted epoch is
planned over the new ranks (every utterance not yet seen in it is seen exactly once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DynamoBackend,
    InitProcessGroupKwargs,
    broadcast_object_list,
    parse_flag_from_env,
    set_seed,
)
from tqdm.auto import tqdm

from emotrain import provenance
from emotrain.config import Config, ConfigError, launcher_main_rank, read_provenance, save_config
from emotrain.data.evaluation import build_eval_dataloader, build_eval_datasets, check_validation_set
from emotrain.data.folds import FoldSplit, check_config_fits_dataset, split_from_config
from emotrain.data.shards import read_dataset_info
from emotrain.data.stream import build_train_stream, steps_ahead
from emotrain.metrics import format_results
from emotrain.model import build_model, build_processors
from emotrain.model.encoders import check_data_fits_model
from emotrain.train import tracking
from emotrain.train.checkpoint import (
    COMPLETE,
    ResumeError,
    checkpoint_name,
    checkpoint_problem,
    is_abandoned,
    resolve_resume,
)
from emotrain.train.deepspeed_config import (
    check_precision_available,
    check_skips_nonfinite_steps,
    fill_deepspeed_auto,
    model_construction,
    name_deepspeed_accelerator,
    training_precision,
    zero_stage,
)
from emotrain.train.evaluation import evaluate, model_inputs
from emotrain.train.launch_check import check_launch
from emotrain.train.loss import StepLoss, balanced_class_weights
from emotrain.train.model_card import write_model_card
from emotrain.train.optim import (
    build_optimizer,
    current_learning_rates,
    set_learning_rates,
    step_lr_factor,
    stream_epoch_shares,
)
from emotrain.train.preemption import (
    EXIT_PREEMPTED,
    PreemptionWatcher,
    StoppedBeforeFirstStep,
    default_flag_file,
    remove_stale_stop_flag,
    say_stopped_before_first_step,
)
from emotrain.data.state import data_fingerprint
from emotrain.train.run_folder import CONFIG_FILE, RunFolder, RunFolderLock
from emotrain.train.state import LogWindow, Progress, TrainingState, load_checkpoint, rng_state_problem
from emotrain.train.step import StepOutcome, finish_optimizer_step
from emotrain.train.step_end import StepEnd, StepFacts, StepRule
from emotrain.train.telemetry import flops_per_utterance, matmul_peak_flops, peak_host_memory_gib, peak_memory_gib

TYPICAL_TOKENS = 24
"""Transcript length the FLOP count assumes (IEMOCAP's transcripts: about 12 words, 16 WordPiece tokens)."""


class TooManyNonFiniteSteps(RuntimeError):
    pass


@dataclass
class Training:
    """Everything `setup` builds for `fit` and `finish`. Each part can be wrapped by a test."""

    cfg: Config
    accelerator: Accelerator
    run: RunFolder
    """The run folder: its layout, and what "finished" means."""
    log: logging.Logger
    state: TrainingState
    rule: StepRule
    loss: StepLoss
    split: FoldSplit
    validation_loader: Any
    test_loader: Any | None
    processors: tuple
    """(feature extractor, tokenizer)."""
    watcher: PreemptionWatcher
    lock: RunFolderLock
    resumed_from: Path | None
    run_provenance: dict | None
    flops_per_utterance: float | None = None
    peak_flops: float | None = None
    steps_left: int = 0
    """The optimizer steps the plans held when setup ended (`_steps_left`, counted once: the log's
    step count and the progress bar's total)."""
    progress_bar: Any = None
    """The console's progress bar while `fit` runs."""

    @property
    def labels(self) -> list[str]:
        return self.split.label_names

    def save(self) -> Path:
        """A checkpoint of the whole state (a collective: every rank)."""
        return self.state.save(self.accelerator, self.run.checkpoints, config_yaml=self.cfg.to_yaml(),
                               keep_last=self.cfg.train.keep_last_checkpoints)

    def close(self, ended: bool = True) -> None:
        """Release what setup took: signal handlers, the folder lock, and when the run `ended` (0 or a
        stop request), the trackers and the process group."""
        self.watcher.uninstall()
        if ended:
            self.accelerator.end_training()
        self.lock.release()


def train(cfg: Config, wrap: Callable[[Training], None] | None = None) -> int:
    """Run one fold's training; returns the process exit code (0, or EXIT_PREEMPTED).
    `wrap(training)`, if given, may wrap the parts after setup (the tests' probes do).

    A finished run (this config, this data) is done: one line says so, and nothing is built,
    evaluated or written."""
    finished = finished_run(cfg)
    if finished is not None:
        if launcher_main_rank():
            print(finished, file=sys.stderr)
        return 0
    try:
        training = setup(cfg)
    except StoppedBeforeFirstStep as stop:
        say_stopped_before_first_step(str(stop))
        return EXIT_PREEMPTED
    try:
        if wrap is not None:
            wrap(training)
        exit_code = fit(training)
        if exit_code == 0:
            finish(training)
    except BaseException:
        training.close(ended=False)  # the trackers see the process fail, not a finished run
        raise
    training.close()
    return exit_code


def finished_run(cfg: Config) -> str | None:
    """The line saying that `cfg.output_dir` holds this very run, finished (`RunFolder.is_finished`:
    the same config up to result-neutral keys, the same data), and where its results are; None when
    it holds no finished run. A finished run that another config or other data would continue is
    refused as setup refuses it (RunFolderConflict): a longer run (max_steps, max_epochs) is such a
    config, as its learning rate schedule differs from the start.

    Only `train.resume=auto` ("continue this run", the rerun of the same command) finds a finished
    run done: `never` asks to start afresh and a checkpoint folder to restart from it, and setup
    does what they say (None here)."""
    run = RunFolder(cfg.output_dir)
    if cfg.train.resume != "auto" or not run.is_finished():
        return None
    said = run.check_finished(cfg, lambda: data_fingerprint(split_from_config(cfg.data, seed=cfg.train.seed)))
    if launcher_main_rank():  # a kill cut its end short (after metrics.json): finish what it had left to do
        if cfg.train.keep_checkpoints_after_finish:
            run.finish_dropping_checkpoints()
        else:
            run.drop_checkpoints()
    return said


# ------------------------------------------------------------------------------------------- setup


def setup(cfg: Config) -> Training:
    """Every part of the run, and its state restored when resuming (see the module docstring).

    A stop request during setup raises StoppedBeforeFirstStep at once (nothing to save yet:
    `emotrain.train.preemption`); whatever setup raises, it gives back the signal handlers and the
    folder lock it took."""
    check_launch(cfg)  # a launch that contradicts itself or the config: one line, before Accelerate fails on it
    run = RunFolder(cfg.output_dir)
    run.check_writable()  # one line naming output_dir, before anything is built
    lock = RunFolderLock(run.path)
    watcher = PreemptionWatcher(at_once=True).install()
    try:
        training = _build_training(cfg, run, lock, watcher)
    except BaseException:
        watcher.uninstall()
        lock.release()
        raise
    watcher.steps_begin()
    return training


def _build_training(cfg: Config, run: RunFolder, lock: RunFolderLock, watcher: PreemptionWatcher) -> Training:
    history = tracking.HistoryTracker(cfg.output_dir)  # the run folder's own curves, whatever report_to says
    accelerator = _build_accelerator(cfg, history)
    # The data decides the label set (and whether this variant can train on it at all).
    check_config_fits_dataset(cfg.data, cfg.model, read_dataset_info(cfg.data.path))
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    log, run_provenance = _claim_run_folder(cfg, accelerator, run, lock, split)
    log.info("fold %d: %s", cfg.data.fold, json.dumps(split.summary()))
    for note in split.notes:
        log.warning("fold %d: %s", cfg.data.fold, note)
    # A stale flag (an earlier stop's) is removed; a fresh one, touched while this run started up
    # (Slurm's USR1 trap), stops it at once, as a signal would.
    stop_flag = default_flag_file(run.path)
    if decided_by_main(accelerator, lambda: remove_stale_stop_flag(stop_flag, watcher.since)):
        raise StoppedBeforeFirstStep(f"flag file {stop_flag}")
    watcher.watch_flag_file(stop_flag)
    set_seed(cfg.train.seed)
    # What to resume: the main process decides (it also completes a replacement a crash interrupted,
    # and passes over a damaged checkpoint), so every rank loads the same folder.
    resume_from = decided_by_main(
        accelerator, lambda: resolve_resume(cfg.train.resume, run.checkpoints, check_loads=rng_state_problem))

    feature_extractor, tokenizer = build_processors(cfg.model)
    world_size = accelerator.num_processes
    stream = build_train_stream(cfg, split, feature_extractor=feature_extractor, tokenizer=tokenizer,
                                rank=accelerator.process_index, world_size=world_size,
                                # Decided once: workers only share out the decoding, never the plan.
                                num_workers=decided_by_main(accelerator, cfg.data.workers))
    validation_set, test_set = build_eval_datasets(split, sampling_rate=cfg.data.sampling_rate)
    check_validation_set(validation_set, fold=cfg.data.fold)  # before an epoch is spent finding out
    loader_args = dict(feature_extractor=feature_extractor, tokenizer=tokenizer,
                       rank=accelerator.process_index, world_size=world_size)
    validation_loader = build_eval_dataloader(validation_set, cfg.data, **loader_args)
    test_loader = build_eval_dataloader(test_set, cfg.data, **loader_args) if test_set else None

    with model_construction(accelerator):  # ZeRO-3: no zero.Init (it breaks Wav2Vec2's weight norm)
        model = build_model(cfg.model, split.label_names)
    check_data_fits_model(cfg.data, model, feature_extractor, tokenizer)
    model.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    # The training stream and the evaluation loaders are NOT prepared: each rank has its own part
    # already (data/stream.py, data/evaluation.py), and Accelerate would shard them again.
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.train, cfg.model))
    state = TrainingState(model, optimizer, stream, Progress(run_id=tracking.new_run_id()),
                          LogWindow(accelerator.device))
    if resume_from is not None:
        state.restore(accelerator, resume_from)
        log.info("resumed from %s (epoch %d, step %d)", resume_from, state.progress.epoch, state.progress.step)
    else:
        log.info("starting fresh in %s", run.path)
    history.keep_until(state.progress.step if resume_from is not None else None)
    tracking.start(accelerator, cfg, state.progress.run_id)

    class_weights = (balanced_class_weights(split.meta.label[split.train_mask()], len(split.label_names))
                     if cfg.train.class_weights == "balanced" else None)
    training = Training(
        cfg=cfg, accelerator=accelerator, run=run, log=log, state=state, rule=StepRule.from_config(cfg),
        loss=StepLoss(world_size=world_size, accumulation=cfg.train.gradient_accumulation_steps,
                      class_weights=class_weights, label_smoothing=cfg.train.label_smoothing),
        split=split, validation_loader=validation_loader, test_loader=test_loader,
        processors=(feature_extractor, tokenizer), watcher=watcher, lock=lock, resumed_from=resume_from,
        run_provenance=run_provenance,
    )
    _check_steps_per_epoch(training)
    _describe_run(training)
    return training


def _build_accelerator(cfg: Config, history: tracking.HistoryTracker) -> Accelerator:
    name_deepspeed_accelerator(cuda=torch.cuda.is_available())  # before Accelerate imports DeepSpeed
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several CPU processes (the tests): gloo. Without it DeepSpeed's processes each train alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        # No GPU: a GPU launch config (launch/cpu_ddp.yaml is MULTI_GPU) runs its processes on the CPU over
        # gloo, as ACCELERATE_USE_CPU=true would make it; without this, rank 1 dies inside Accelerate.
        # Never under DeepSpeed: `cpu=True` silently drops it (DeepSpeed's own CPU accelerator runs it).
        cpu=not torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"),
        mixed_precision=training_precision(cfg.train.mixed_precision, cuda=torch.cuda.is_available()),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=[*cfg.logging.report_to, history],
        project_dir=cfg.output_dir,
        kwargs_handlers=handlers,
    )
    if accelerator.state.deepspeed_plugin is not None:  # the launch config's JSON: "auto" values, and a safety check
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        fill_deepspeed_auto(ds_config, cfg, mixed_precision=accelerator.mixed_precision)
        check_skips_nonfinite_steps(ds_config)
        check_precision_available(ds_config, cuda=torch.cuda.is_available())
    return accelerator


def decided_by_main(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()` on the main process; every rank gets its result, or raises its error (a rank must
    never wait alone in a collective because the main process failed)."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("result", decide())]
        except ConfigError as err:
            outcome = [("config", err.key, str(err).split(": ", 1)[1])]
        except (ResumeError, FileNotFoundError, ValueError) as err:
            outcome = [("resume", str(err))]
        except OSError as err:  # a full disk, a folder it may not write: the CLI says it in one line
            outcome = [("os", err.errno, err.strerror or str(err), err.filename)]
    broadcast_object_list(outcome)
    kind, *value = outcome[0]
    if kind == "config":
        raise ConfigError(*value)
    if kind == "resume":
        raise ResumeError(value[0])
    if kind == "os":
        raise OSError(*value)
    return value[0]


def _claim_run_folder(cfg: Config, accelerator: Accelerator, run: RunFolder, lock: RunFolderLock,
                      split: FoldSplit) -> tuple[logging.Logger, dict | None]:
    """One training per folder (rank 0 holds the lock for the whole run), and a folder holding a run
    whose config would change the result, or that trained on other data (`data.path` may move, the
    data not), is refused, before anything is written; an export of best/ a crash cut short is
    finished or undone. Then the resolved config is printed once and saved with how this run was
    produced."""
    decided_by_main(accelerator, lambda: run.check_config(cfg))
    decided_by_main(accelerator, lock.acquire)
    unchecked = decided_by_main(accelerator, lambda: run.check_data(cfg.data.path, lambda: data_fingerprint(split)))
    log = tracking.setup_logging(run.path, accelerator.is_main_process)
    run_provenance = None
    if accelerator.is_main_process:
        if unchecked:
            log.warning("%s", unchecked)
        for line in run.recover():
            log.warning("run folder recovery: %s", line)
        if run.metrics.exists():  # a finished run restarted (train.resume=never or a checkpoint): not finished
            run.metrics.unlink()  # while it trains again, nor if it is stopped (`emotrain cv`, report, a rerun)
            log.warning("%s restarts a finished run (train.resume=%s): its metrics.json is removed until this run "
                        "writes its own", run.path, cfg.train.resume)
        run_provenance = provenance.merge_with_earlier(
            provenance.collect(world_size=accelerator.num_processes,
                               distributed_type=accelerator.distributed_type.value,
                               mixed_precision=accelerator.mixed_precision),
            read_provenance(run.config))
        save_config(cfg, run.config, provenance=run_provenance)
        log.info("resolved config:\n%s", cfg.to_yaml().rstrip(),
                 extra=None if cfg.logging.print_config else tracking.FILE_ONLY)
        log.info("%d process(es), %s, mixed precision %s", accelerator.num_processes, accelerator.distributed_type,
                 accelerator.mixed_precision)
        if training_precision(cfg.train.mixed_precision, cuda=torch.cuda.is_available()) != cfg.train.mixed_precision:
            log.warning("train.mixed_precision=%s needs a CUDA GPU, and this machine has none: training in fp32 "
                        "(mixed precision no; bf16 works on a CPU)", cfg.train.mixed_precision)
    return log, run_provenance


def _check_steps_per_epoch(t: Training) -> None:
    """A fresh epoch must hold at least one optimizer step on every rank."""
    stream, progress = t.state.stream, t.state.progress
    if stream.consumed is None and progress.stop_reason is None and stream.steps_in_epoch() == 0:
        raise ConfigError("train.gradient_accumulation_steps", (
            f"is {t.cfg.train.gradient_accumulation_steps} but each of the {t.accelerator.num_processes} rank(s) "
            f"has {stream.num_batches()} batch(es) per epoch: lower it, or the batch budget "
            "(data.max_batch_audio_seconds, train.batch_size)"))


def _describe_run(t: Training) -> None:
    """Log the plan's step count and how the model runs; measure its FLOPs once (main process: it
    alone logs), and on a GPU the matmul peak in the training precision."""
    cfg, accelerator, stream, progress = t.cfg, t.accelerator, t.state.stream, t.state.progress
    t.steps_left, exact = _steps_left(t)
    t.log.info("%s%d optimizer steps (%d in this epoch, %d micro-batch(es) per step on each of %d rank(s))",
               "" if exact else "about ", progress.step + t.steps_left, stream.steps_in_epoch(),
               cfg.train.gradient_accumulation_steps, accelerator.num_processes)
    dynamo = accelerator.state.dynamo_plugin
    if dynamo.backend != DynamoBackend.NO:  # the launch config's dynamo_config (or ACCELERATE_DYNAMO_*)
        t.log.info("model compiled by torch.compile: backend %s, mode %s, dynamic shapes %s%s",
                   dynamo.backend.value.lower(), dynamo.mode, dynamo.dynamic,
                   "" if cfg.data.length_ladder else " (data.length_ladder=0: batch shapes vary freely)")
    if not accelerator.is_main_process or zero_stage(accelerator) == 3:  # ZeRO-3: no whole model on one rank
        return
    train_seconds = t.split.meta.duration[t.split.train_mask()]
    t.flops_per_utterance = flops_per_utterance(
        accelerator.unwrap_model(t.state.model, keep_torch_compile=False), *t.processors,
        seconds=float(np.mean(np.minimum(train_seconds, cfg.data.max_audio_seconds))),
        tokens=min(cfg.data.max_text_tokens, TYPICAL_TOKENS))
    if accelerator.device.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)
        t.peak_flops = matmul_peak_flops(accelerator.device, dtype)
        t.log.info("model: %.2f GFLOP per utterance forward; %s matmul peak %.0f TFLOP/s",
                   t.flops_per_utterance / 1e9, cfg.train.mixed_precision, t.peak_flops / 1e12)


def _steps_left(t: Training) -> tuple[int, bool]:
    """(steps the plans still hold: the rest of this epoch, then the epochs after it, within
    max_steps; whether that count is exact, see `steps_ahead`)."""
    progress, train_cfg = t.state.progress, t.cfg.train
    if progress.stop_reason is not None:
        return 0, True
    return steps_ahead(t.state.stream, max_epochs=train_cfg.max_epochs,
                       max_steps_left=train_cfg.max_steps - progress.step if train_cfg.max_steps else None)


# --------------------------------------------------------------------------------------------- fit


def fit(t: Training) -> int:
    """The training loop. Returns 0 when training is done, EXIT_PREEMPTED after a stop request."""
    progress, stream = t.state.progress, t.state.stream
    if _stop_requested_before_first_step(t):
        say_stopped_before_first_step(t.watcher.reason())
        return EXIT_PREEMPTED
    if progress.pending_evaluation:  # a stop request came on a step whose validation was due: do it now
        with t.state.window.pause():
            validate(t)
            decide_step_end(t, StepFacts(progress.step))
    bar = t.progress_bar = tqdm(
        total=progress.step + (0 if progress.stop_reason is not None else t.steps_left), initial=progress.step,
        desc="train", unit="step", dynamic_ncols=True,
        disable=not (t.accelerator.is_main_process and t.cfg.logging.progress_bar))
    t.state.window.restart_clock()  # training time starts here (not at setup, nor the trackers' start)
    t.state.model.train()
    while progress.stop_reason is None:
        stream.set_epoch(progress.epoch)  # a no-op when resuming inside this epoch
        step_sizes = stream.step_utterances()  # [steps] utterances per step, all ranks: the loss's denominator
        if len(step_sizes) == 0:
            # Only the rest of an epoch resumed on more ranks can be too small for one step on each
            # (a fresh epoch with no step is a config error, checked at setup): it ends at the step it
            # was stopped at, and its few utterances are counted as dropped.
            t.log.warning("epoch %d: the %d utterance(s) left cannot fill a step on %d rank(s): the epoch ends here",
                          progress.epoch, sum(plan.dropped for plan in stream.plans()), t.accelerator.num_processes)
            progress.epoch += 1
            stream.set_epoch(progress.epoch)
            end_of_step(t, StepFacts(progress.step, epoch_ended=True, epochs_done=progress.epoch))
            continue
        shares = stream_epoch_shares(stream)  # [steps + 1] share of the epoch done before each step
        batches = iter(stream)
        for k in range(stream.steps_done, len(step_sizes)):
            set_learning_rates(t.state.optimizer, step_lr_factor(
                t.cfg.train, epoch=progress.epoch, step=progress.step,
                share_before=float(shares[k]), share_after=float(shares[k + 1])))
            outcome = train_step(t, batches, int(step_sizes[k]))
            progress.record_step(outcome.applied)
            bar.update(1)
            if not outcome.applied:
                t.log.warning("step %d: non-finite gradients (norm %s), step skipped (%d in a row)", progress.step,
                              _plain_norm(t.state.window.grad_norm), progress.consecutive_nonfinite)
            epoch_ended = k == len(step_sizes) - 1
            if epoch_ended:  # the stream moves on before the checkpoint, which resumes the next epoch
                if next(batches, None) is not None:
                    raise RuntimeError(f"epoch {progress.epoch}: the stream holds more batches than its plan")
                progress.epoch += 1
                stream.set_epoch(progress.epoch)
            end = end_of_step(t, StepFacts(progress.step, epoch_ended=epoch_ended, epochs_done=progress.epoch,
                                           stop_requested=outcome.stop_requested,
                                           consecutive_nonfinite=progress.consecutive_nonfinite))
            if end.exit_preempted:
                bar.close()
                return EXIT_PREEMPTED
            if end.finish:
                break
    bar.close()
    stream.close()  # the training's data workers (and what they prefetched) are not needed for the test
    t.log.info("training stopped: %s after %d steps (best validation UA %.4f at step %s)",
               progress.stop_reason, progress.step, progress.best_ua, progress.best_step)
    return 0


def _stop_requested_before_first_step(t: Training) -> bool:
    """A stop request that came after setup and before the first step (the flag file, a signal),
    agreed on by every rank (a collective): nothing new to save since setup."""
    requested = torch.tensor([float(t.watcher.requested())], device=t.accelerator.device)
    return bool(t.accelerator.reduce(requested, reduction="sum").item() > 0)


def _plain_norm(grad_norm) -> float | str:
    return float(grad_norm) if grad_norm is not None else "?"


def train_step(t: Training, batches, step_utterances: int) -> StepOutcome:
    """One optimizer step: `accumulation` micro-batches, gradients synchronised on the last. Ends
    with the step's one collective and host read (finite gradients? a stop request?)."""
    accelerator, model, window = t.accelerator, t.state.model, t.state.window
    accumulation = t.cfg.train.gradient_accumulation_steps
    step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # on the device until a log step
    step_valid = 0
    for micro in range(accumulation):
        waited = time.perf_counter()
        batch = next(batches)
        window.add_batch(batch, waited_seconds=time.perf_counter() - waited)  # the host waiting for data
        with accelerator.accumulate(model):
            if accelerator.sync_gradients != (micro == accumulation - 1):
                raise RuntimeError("Accelerate's accumulation boundary drifted from the step's micro-batches")
            logits = model(**model_inputs(batch, accelerator.device)).logits  # [B, C]
            loss, losses = t.loss(logits, batch, step_utterances)  # scalar, [B]
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.cfg.train.max_grad_norm or float("inf"))
                outcome = finish_optimizer_step(accelerator, t.state.optimizer, grad_norm,
                                                stop_requested=t.watcher.requested())
        step_loss += losses.detach().sum()
        step_valid += batch["num_valid"]
    window.grad_norm = grad_norm
    window.add_step(step_loss if outcome.applied else None, step_valid)  # the logged loss is that of the updates made
    return outcome


def end_of_step(t: Training, facts: StepFacts) -> StepEnd:
    """Carry out the end of step `facts.step`, in `emotrain.train.step_end`'s order: log → validate →
    the step-end decision."""
    progress, rule = t.state.progress, t.rule
    if rule.log_due(facts) and progress.last_log_step != progress.step:  # logged once, whatever leads here twice
        log_training(t)
    with t.state.window.pause():  # validating and saving is not training time
        if rule.evaluation_due(facts) and not facts.stop_requested and progress.last_evaluation_step != progress.step:
            validate(t)
        return decide_step_end(t, facts)


def decide_step_end(t: Training, facts: StepFacts) -> StepEnd:
    """`StepRule.step_end` with this step's validation counted, carried out: abort, finish, defer a
    validation, checkpoint, exit for a stop request."""
    progress = t.state.progress
    end = t.rule.step_end(dataclasses.replace(
        facts, validated=progress.last_evaluation_step == progress.step,
        evaluations_without_improvement=progress.evaluations_without_improvement))
    if end.abort:
        raise TooManyNonFiniteSteps(end.abort)
    progress.stop_reason = progress.stop_reason or end.finish
    if end.defer_evaluation:
        progress.pending_evaluation = True
    if end.exit_preempted:
        t.log.warning("stop requested (%s): saving step %d and exiting with %d%s", t.watcher.reason(), progress.step,
                      EXIT_PREEMPTED, " (its validation runs first on resume)" if progress.pending_evaluation else "")
    if end.checkpoint:
        t.save()
    return end


def validate(t: Training) -> None:
    """Evaluate on validation (with the training's loss); count it towards the best step and early
    stopping; log it under the HF Trainer's names (`eval/loss`, `eval/ua`, ...)."""
    progress = t.state.progress
    metrics = evaluate(t.accelerator, t.state.model, t.validation_loader, label_names=t.labels,
                       utterance_losses=t.loss.per_utterance)
    improved = progress.record_validation(metrics["ua"], metrics)
    t.log.info("step %d validation: WA %.4f UA %.4f macro-F1 %.4f loss %s%s", progress.step, metrics["wa"],
               metrics["ua"], metrics["macro_f1"], _plain_loss(metrics["loss"]), " (best)" if improved else "")
    tracking.log(t.accelerator, tracking.evaluation_scalars("eval", metrics), progress.step)
    tracking.log_confusion(t.accelerator, t.cfg, "eval", metrics["confusion"], t.labels, progress.step)


def _plain_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def _skipped_over_ranks(t: Training) -> int:
    """Training utterances skipped as undecodable, over every rank (a collective)."""
    count = torch.tensor([len(t.state.stream.skipped)], dtype=torch.float64, device=t.accelerator.device)
    return int(t.accelerator.reduce(count, reduction="sum").item())


def log_training(t: Training) -> None:
    """The window's figures, summed over ranks (a collective), to the trackers and the console."""
    accelerator, progress, window = t.accelerator, t.state.progress, t.state.window
    totals, skipped, elapsed = window.totals(accelerator), _skipped_over_ranks(t), window.elapsed()
    world_size = accelerator.num_processes
    values = {
        "train/epoch": progress.epoch,
        "train/utterances_per_second": totals["utterances"] / elapsed,
        "train/audio_seconds_per_second": totals["audio_seconds"] / elapsed,
        "train/padding_efficiency": totals["audio_seconds"] / max(totals["padded_seconds"], 1e-9),
        "train/nonfinite_steps": progress.nonfinite_steps,
        "train/skipped_utterances": skipped,
        # Where the time goes (perf/: timings, which differ from one run to the next).
        "perf/step_seconds": elapsed * world_size / max(totals["steps"], 1),
        "perf/data_wait_share": totals["data_seconds"] / (elapsed * world_size),
        "perf/peak_host_memory_gib": peak_host_memory_gib(),  # this rank's (rank 0 logs)
    }
    if t.flops_per_utterance is not None:  # forward + backward ≈ 3 x forward, per device
        achieved = 3 * t.flops_per_utterance * totals["utterances"] / elapsed / world_size
        values["perf/tflops_per_device"] = achieved / 1e12
        if t.peak_flops:
            values["perf/mfu"] = achieved / t.peak_flops
    if (memory := peak_memory_gib(accelerator.device)) is not None:
        values["perf/peak_memory_gib"] = memory
    if totals["valid"]:  # a window of skipped steps only has no loss to report
        values["train/loss"] = totals["loss"] / totals["valid"]  # mean per utterance of the applied steps
    if window.grad_norm is not None:
        values["train/grad_norm"] = float(window.grad_norm)
    for part, lr in current_learning_rates(t.state.optimizer).items():  # the lr the step just logged was taken with
        values[f"train/lr_{part}"] = lr
    tracking.log(accelerator, values, progress.step)
    progress.last_log_step = progress.step
    loss = _plain_loss(values.get("train/loss"))
    if t.progress_bar is not None:
        t.progress_bar.set_postfix(loss=loss, utt_s=f"{values['train/utterances_per_second']:.1f}")
    t.log.info("step %d epoch %d loss %s | %.1f utt/s, %.1f audio s/s, padding efficiency %.2f, %.3f s/step "
               "(%.0f%% waiting for data)%s", progress.step, progress.epoch, loss,
               values["train/utterances_per_second"], values["train/audio_seconds_per_second"],
               values["train/padding_efficiency"], values["perf/step_seconds"], 100 * values["perf/data_wait_share"],
               f", MFU {values['perf/mfu']:.1%}" if "perf/mfu" in values else "")
    window.reset()


# ------------------------------------------------------------------------------------------ finish


def finish(t: Training) -> dict:
    """Load the best checkpoint, export it as `best/`, test it, write `metrics.json`; returns the results."""
    accelerator, progress = t.accelerator, t.state.progress
    # Every rank loads the best checkpoint: this restores the best weights under any strategy (ZeRO-3 too).
    # The main process finds and verifies it (once, not on every rank).
    load_checkpoint(accelerator, decided_by_main(accelerator, lambda: _best_checkpoint(t)))
    _export_best(t)
    results = {"validation": progress.best_validation, "best_step": progress.best_step,
               "stop_reason": progress.stop_reason, "steps": progress.step,
               "nonfinite_steps": progress.nonfinite_steps, "skipped_training_utterances": _skipped_over_ranks(t)}
    if t.test_loader is not None:
        results["test"] = evaluate(accelerator, t.state.model, t.test_loader, label_names=t.labels)
        tracking.log(accelerator, tracking.evaluation_scalars("test", results["test"]), progress.step)
        tracking.log_confusion(accelerator, t.cfg, "test", results["test"]["confusion"], t.labels, progress.step)
    if accelerator.is_main_process:
        _write_model_card(t, results)  # before metrics.json: a finished run's best/ has its card
        # last, atomically: with it the run is finished (with the data it trained on)
        t.run.write_metrics(results, data_path=t.cfg.data.path, split=t.split)
        t.log.info("results (WA = accuracy, UA = mean per-class recall):\n%s", format_results(results))
    tracking.summarize(accelerator, t.cfg, {
        "best/validation_ua": progress.best_ua, "best/step": progress.best_step,
        **(tracking.evaluation_scalars("test", results["test"]) if "test" in results else {}),
    })
    _drop_checkpoints(t)
    return results


def _drop_checkpoints(t: Training) -> None:
    """A finished run keeps best/, its metrics and logs; its resume checkpoints (the whole training
    state, each as large as the model and its optimizer) only with `train.keep_checkpoints_after_finish`.
    Every rank is done with them first (the best one loaded, the test run); the main process deletes."""
    if t.cfg.train.keep_checkpoints_after_finish:
        return
    t.accelerator.wait_for_everyone()
    if t.accelerator.is_main_process and t.run.drop_checkpoints():
        t.log.info("the run is finished: its checkpoints are deleted (best/ and %s hold its results; "
                   "train.keep_checkpoints_after_finish=true keeps them)", t.run.metrics.name)


def _best_checkpoint(t: Training) -> Path:
    """The best step's checkpoint: this run's, or the run it was started from (train.resume=<folder>)."""
    best_name = checkpoint_name(t.state.progress.best_step)
    for folder in (t.run.checkpoints / best_name, t.resumed_from.parent / best_name if t.resumed_from else None):
        # (an abandoned folder of the same step is another attempt's, not this run's best)
        if folder is not None and (folder / COMPLETE).is_file() and not is_abandoned(folder):
            if problem := checkpoint_problem(folder):  # (hashing it: reads the checkpoint once more, once a run)
                raise ResumeError(f"the best checkpoint {folder} {problem}: best/ cannot be exported nor tested; "
                                  "train this run again in another output_dir")
            return folder
    raise ResumeError(f"the best checkpoint (step {t.state.progress.best_step}) is no longer in {t.run.checkpoints}")


def _write_model_card(t: Training, results: dict) -> None:
    """best/README.md: the data, protocol, fold, metrics and config of this run (`emotrain.train.model_card`)."""
    config = yaml.safe_load((t.run.best / CONFIG_FILE).read_text())
    write_model_card(t.run.best, config=config, results=results, split=t.split.summary(),
                     dataset=read_dataset_info(t.cfg.data.path))


def _export_best(t: Training) -> None:
    """`best/`, written aside and swapped in atomically: the best weights under the model's own names,
    its processors and preprocessing, the config."""
    accelerator, cfg = t.accelerator, t.cfg
    state_dict = accelerator.get_state_dict(t.state.model)  # a collective under ZeRO-3 (gathers the partitions)
    if not accelerator.is_main_process:  # (under ZeRO-3 only rank 0 receives the gathered weights)
        return
    # A compiled model (Accelerate's dynamo config) names every key `_orig_mod.<name>`: keep the model's own.
    state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
    best_model = accelerator.unwrap_model(t.state.model, keep_torch_compile=False)
    best_model.preprocessing.update(sampling_rate=cfg.data.sampling_rate, max_text_tokens=cfg.data.max_text_tokens,
                                    max_audio_seconds=cfg.data.max_audio_seconds)
    with t.run.writing_best() as folder:
        best_model.save_pretrained(folder, processors=t.processors, state_dict=state_dict)
        save_config(cfg, folder / CONFIG_FILE, provenance=t.run_provenance)
