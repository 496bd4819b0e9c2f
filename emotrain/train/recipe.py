"""The training recipe, top to bottom: setup → data → model → resume → train loop → best model → test.

    emotrain train configs/smoke.yaml                                   # one process
    accelerate launch --config_file launch/ddp.yaml -m emotrain.cli train configs/paper.yaml
    sbatch slurm/train.sbatch configs/paper.yaml data.fold=3            # Slurm, requeued on preemption

One optimizer step = `train.gradient_accumulation_steps` micro-batches on every rank. The epoch
plan gives every rank the same number of batches (`emotrain.data.plan`), so every rank takes the
same steps and the epoch ends everywhere at once, with no collective to agree on it. Each
micro-batch's loss is a sum over its utterances scaled by the step's utterance count over all
ranks (`emotrain.train.loss`): every utterance of a step weighs the same, whatever the batch sizes.

After each step, `emotrain.train.schedule.step_end` decides what happens, always in the same order:
log → validate → checkpoint → exit on a stop request → finish. A stop request (SIGTERM, SIGUSR1
or the flag file) is agreed on by all ranks at the step boundary, in the step's one small all-reduce
(`emotrain.train.step`: outside logging steps a step makes one host read and one collective besides
DDP's gradient buckets); they save a checkpoint and exit
with EXIT_PREEMPTED (75), deferring a due validation to the resumed run. Rerunning the same command
(`train.resume=auto`) continues from the newest checkpoint this run wrote — model, optimizer,
scheduler, scaler, RNG of every rank, the data stream's exact position on every rank and this
loop's state — and ends with the same weights and metrics as an uninterrupted run. Under DDP it may
resume on another number of processes: the rest of the interrupted epoch is planned over the new
ranks (every utterance not yet seen in it is seen exactly once).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DynamoBackend,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)
from tqdm.auto import tqdm

from emotrain import provenance
from emotrain.config import Config, ConfigError, read_provenance, save_config
from emotrain.data.evaluation import build_eval_dataloader, build_eval_datasets
from emotrain.data.folds import check_config_fits_dataset, split_from_config
from emotrain.data.shards import read_dataset_info
from emotrain.data.stream import build_train_stream
from emotrain.model import build_model, build_processors
from emotrain.model.encoders import check_data_fits_model
from emotrain.train import tracking
from emotrain.train.checkpoint import (
    COMPLETE,
    LoopState,
    ResumeError,
    check_resumable,
    checkpoint_name,
    load_checkpoint,
    read_loop_state,
    read_stream_states,
    resolve_resume,
    save_checkpoint,
)
from emotrain.train.deepspeed_config import (
    check_skips_nonfinite_steps,
    fill_deepspeed_auto,
    model_construction,
    zero_stage,
)
from emotrain.train.evaluation import evaluate, model_inputs
from emotrain.train.loss import balanced_class_weights, micro_batch_loss, utterance_losses
from emotrain.train.optim import build_optimizer_and_scheduler
from emotrain.train.preemption import EXIT_PREEMPTED, PreemptionWatcher, default_flag_file
from emotrain.train.run_folder import RunFolderLock, check_run_folder
from emotrain.train.schedule import step_end
from emotrain.train.step import finish_optimizer_step
from emotrain.train.telemetry import flops_per_utterance as count_flops_per_utterance
from emotrain.train.telemetry import matmul_peak_flops, peak_host_memory_gib, peak_memory_gib

TYPICAL_TOKENS = 24
"""Transcript length the FLOP count assumes (IEMOCAP's transcripts: about 12 words, 16 WordPiece tokens)."""


class TooManyNonFiniteSteps(RuntimeError):
    pass


def train(cfg: Config) -> int:
    """Run one fold's training; returns the process exit code (0, or EXIT_PREEMPTED)."""
    # ---------------------------------------------------------------------------------- setup
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several CPU processes (the tests): gloo. Without it DeepSpeed's processes each train alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    history = tracking.HistoryTracker(cfg.output_dir)  # the run folder's own curves, whatever report_to says
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=[*cfg.logging.report_to, history],
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,  # we step it once per applied optimizer step
        kwargs_handlers=handlers,
    )
    output_dir = Path(cfg.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.state.deepspeed_plugin is not None:  # the launch config's JSON: "auto" values, and a safety check
        fill_deepspeed_auto(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)
        check_skips_nonfinite_steps(accelerator.state.deepspeed_plugin.deepspeed_config)
    world_size, accumulation = accelerator.num_processes, cfg.train.gradient_accumulation_steps

    def decided_by_main(decide):
        """`decide()` on the main process; every rank gets its result, or raises its error (a rank
        must never wait alone in a collective because the main process failed)."""
        outcome = [None]
        if accelerator.is_main_process:
            try:
                outcome = [("result", decide())]
            except ConfigError as err:
                outcome = [("config", err.key, str(err).split(": ", 1)[1])]
            except (ResumeError, FileNotFoundError, ValueError) as err:
                outcome = [("resume", str(err))]
        broadcast_object_list(outcome)
        kind, *value = outcome[0]
        if kind == "config":
            raise ConfigError(*value)
        if kind == "resume":
            raise ResumeError(value[0])
        return value[0]

    # One training per folder (rank 0 holds the lock for the whole run), and a folder holding a run
    # whose config would change the result is refused, before anything is written.
    decided_by_main(lambda: check_run_folder(output_dir, cfg))
    folder_lock = RunFolderLock(output_dir)
    decided_by_main(folder_lock.acquire)

    log = tracking.setup_logging(output_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        run_provenance = provenance.merge_with_earlier(
            provenance.collect(world_size=world_size, distributed_type=accelerator.distributed_type.value,
                               mixed_precision=accelerator.mixed_precision),
            read_provenance(output_dir / "config.yaml"))
        save_config(cfg, output_dir / "config.yaml", provenance=run_provenance)
        log.info("resolved config:\n%s", cfg.to_yaml().rstrip())
        log.info("%d process(es), %s, mixed precision %s", world_size, accelerator.distributed_type,
                 accelerator.mixed_precision)

    # A stale flag from an earlier stop must not stop this run at once.
    stop_flag = default_flag_file(output_dir)
    if accelerator.is_main_process:
        stop_flag.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    watcher = PreemptionWatcher(stop_flag).install()
    set_seed(cfg.train.seed)

    # What to resume: the main process decides (it also completes a replacement a crash interrupted),
    # so every rank loads the same folder. Strategy and world size are checked before anything loads.
    resume_from = decided_by_main(lambda: resolve_resume(cfg.train.resume, checkpoints_dir))
    if resume_from is not None:
        try:
            loop = read_loop_state(resume_from)
        except (OSError, ValueError) as err:
            raise ResumeError(f"cannot read the loop state of {resume_from}: {err}") from None
        check_resumable(loop, accelerator.distributed_type.value, world_size, zero_stage(accelerator))
    else:
        loop = LoopState(run_id=tracking.new_run_id())

    # ----------------------------------------------------------------------------------- data
    # The data decides the label set (and whether this variant can train on it at all).
    check_config_fits_dataset(cfg.data, cfg.model, read_dataset_info(cfg.data.path))
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    labels = split.label_names
    log.info("fold %d: %s", cfg.data.fold, json.dumps(split.summary()))
    for note in split.notes:
        log.warning("fold %d: %s", cfg.data.fold, note)
    feature_extractor, tokenizer = build_processors(cfg.model)
    stream = build_train_stream(
        cfg, split, feature_extractor=feature_extractor, tokenizer=tokenizer,
        rank=accelerator.process_index, world_size=world_size,
        # Decided once: every rank plans every rank's batches with it (ranks may see other cores).
        num_workers=decided_by_main(lambda: cfg.data.workers()),
    )
    if resume_from is not None:
        try:
            stream.load_state_dicts(read_stream_states(resume_from, loop.world_size))
        except (OSError, ValueError) as err:  # a rank's file is missing, or the data or settings changed
            raise ResumeError(f"cannot resume from {resume_from}: {err}") from None
    validation_set, test_set = build_eval_datasets(split, sampling_rate=cfg.data.sampling_rate)
    eval_loader_args = dict(feature_extractor=feature_extractor, tokenizer=tokenizer,
                            rank=accelerator.process_index, world_size=world_size)
    validation_loader = build_eval_dataloader(validation_set, cfg.data, **eval_loader_args)
    test_loader = build_eval_dataloader(test_set, cfg.data, **eval_loader_args) if test_set else None

    # Steps are known from the plans: those taken, the rest of this epoch, the epochs after it.
    steps_left = stream.steps_in_epoch() - stream.steps_done if loop.epoch < cfg.train.max_epochs else 0
    steps_left += sum(stream.steps_in_epoch(e) for e in range(loop.epoch + 1, cfg.train.max_epochs))
    total_steps = loop.step + steps_left
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    if stream.consumed is None and loop.stop_reason is None and stream.steps_in_epoch() == 0:
        raise ConfigError("train.gradient_accumulation_steps", (
            f"is {accumulation} but each of the {world_size} rank(s) has {stream.num_batches()} batch(es) per epoch: "
            "lower it, or the batch budget (data.max_batch_audio_seconds, train.batch_size)"))
    log.info("%d optimizer steps (%d in this epoch, %d micro-batch(es) per step on each of %d rank(s))",
             total_steps, stream.steps_in_epoch(), accumulation, world_size)
    class_weights = (balanced_class_weights(split.meta.label[split.train_mask()], len(labels))
                     if cfg.train.class_weights == "balanced" else None)

    # ---------------------------------------------------------------------------------- model
    with model_construction(accelerator):  # ZeRO-3: no zero.Init (it breaks Wav2Vec2's weight norm)
        model = build_model(cfg.model, labels)
    check_data_fits_model(cfg.data, model, feature_extractor, tokenizer)
    model.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg.train, cfg.model, total_steps)
    # The training stream is NOT prepared: it is sharded across ranks already (see data/stream.py).
    # The evaluation loaders are not prepared either: each rank has its own part (data/evaluation.py).
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    group_names = [group["name"] for group in optimizer.param_groups]
    dynamo = accelerator.state.dynamo_plugin
    if dynamo.backend != DynamoBackend.NO:  # the launch config's dynamo_config (or ACCELERATE_DYNAMO_*)
        log.info("model compiled by torch.compile: backend %s, mode %s, dynamic shapes %s%s",
                 dynamo.backend.value.lower(), dynamo.mode, dynamo.dynamic,
                 "" if cfg.data.length_ladder else " (data.length_ladder=0: batch shapes vary freely)")

    # --------------------------------------------------------------------------------- resume
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)
        log.info("resumed from %s (epoch %d, step %d)", resume_from, loop.epoch, loop.step)
    else:
        log.info("starting fresh in %s", output_dir)
    history.keep_until(loop.step if resume_from is not None else None)
    tracking.start(accelerator, cfg, loop.run_id)

    def summed_over_ranks(values: list[float]) -> list[float]:
        """A collective (every rank calls it): element-wise sums over ranks, in float64."""
        tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
        return accelerator.reduce(tensor, reduction="sum").tolist()

    # Training figures summed since the last log line. The loss stays on the device until a log
    # step (no host sync per step); a checkpoint stores the sums over ranks, which rank 0 restores.
    window_keys = ("loss", "valid", "utterances", "audio_seconds", "padded_seconds", "data_seconds", "steps")
    window = dict.fromkeys(window_keys, 0.0)
    window["loss"] = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    if loop.log_window and accelerator.is_main_process:
        window.update({key: value for key, value in loop.log_window.items() if key != "loss"})
        window["loss"] += loop.log_window["loss"]
    timer = {"started": time.perf_counter(), "paused": 0.0}  # evaluating and saving is not training

    def checkpoint() -> Path:
        totals = summed_over_ranks([float(window[key]) for key in window_keys])
        loop.log_window = dict(zip(window_keys, totals))
        return save_checkpoint(
            accelerator, checkpoints_dir, loop.step, stream_state=stream.state_dict(), loop_state=loop,
            config_yaml=cfg.to_yaml(), keep_last=cfg.train.keep_last_checkpoints,
        )

    def validate() -> None:
        """Evaluate on validation, track the best UA and early stopping, log."""
        metrics = evaluate(accelerator, model, validation_loader, label_names=labels)
        improved = metrics["ua"] > loop.best_ua
        if improved:
            loop.best_ua, loop.best_step, loop.best_validation = metrics["ua"], loop.step, metrics
            loop.evaluations_without_improvement = 0
        else:
            loop.evaluations_without_improvement += 1
        loop.pending_evaluation, loop.last_evaluation_step = False, loop.step
        patience = cfg.train.early_stopping_patience
        if patience and loop.evaluations_without_improvement >= patience and loop.stop_reason is None:
            loop.stop_reason = "early_stopping"
        log.info("step %d validation: WA %.4f UA %.4f macro-F1 %.4f%s", loop.step, metrics["wa"], metrics["ua"],
                 metrics["macro_f1"], " (best)" if improved else "")
        tracking.log(accelerator, {f"validation/{k}": metrics[k] for k in ("wa", "ua", "macro_f1")}
                     | {f"validation/recall_{name}": r for name, r in metrics["per_class_recall"].items()
                        if r is not None}, loop.step)
        tracking.log_confusion(accelerator, cfg, "validation", metrics["confusion"], labels, loop.step)

    def log_training(grad_norm) -> None:
        """The window's figures, summed over ranks (a collective), to the trackers and the console."""
        totals = dict(zip(window_keys, summed_over_ranks([float(window[key]) for key in window_keys])))
        skipped = int(summed_over_ranks([len(stream.skipped)])[0])
        elapsed = max(time.perf_counter() - timer["started"] - timer["paused"], 1e-9)
        values = {
            "train/epoch": loop.epoch,
            "train/utterances_per_second": totals["utterances"] / elapsed,
            "train/audio_seconds_per_second": totals["audio_seconds"] / elapsed,
            "train/padding_efficiency": totals["audio_seconds"] / max(totals["padded_seconds"], 1e-9),
            "train/nonfinite_steps": loop.nonfinite_steps,
            "train/skipped_utterances": skipped,
            # Where the time goes (perf/: timings, which differ from one run to the next).
            "perf/step_seconds": elapsed * world_size / max(totals["steps"], 1),
            "perf/data_wait_share": totals["data_seconds"] / (elapsed * world_size),
        }
        if flops_per_utterance is not None:  # forward + backward ≈ 3 x forward, per device
            achieved = 3 * flops_per_utterance * totals["utterances"] / elapsed / world_size
            values["perf/tflops_per_device"] = achieved / 1e12
            if peak_flops:
                values["perf/mfu"] = achieved / peak_flops
        if (memory := peak_memory_gib(accelerator.device)) is not None:
            values["perf/peak_memory_gib"] = memory
        values["perf/peak_host_memory_gib"] = peak_host_memory_gib()  # this rank's (rank 0 logs)
        loss = "-"  # a window of skipped steps only has no loss to report
        if totals["valid"]:
            values["train/loss"] = totals["loss"] / totals["valid"]  # mean per utterance of the applied steps
            loss = f"{values['train/loss']:.4f}"
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        for name, lr in zip(group_names, scheduler.get_last_lr()):
            values[f"train/lr_{name}"] = lr
        tracking.log(accelerator, values, loop.step)
        progress.set_postfix(loss=loss, utt_s=f"{values['train/utterances_per_second']:.1f}")
        log.info("step %d epoch %d loss %s | %.1f utt/s, %.1f audio s/s, padding efficiency %.2f, %.3f s/step "
                 "(%.0f%% waiting for data)%s", loop.step, loop.epoch, loss, values["train/utterances_per_second"],
                 values["train/audio_seconds_per_second"], values["train/padding_efficiency"],
                 values["perf/step_seconds"], 100 * values["perf/data_wait_share"],
                 f", MFU {values['perf/mfu']:.1%}" if "perf/mfu" in values else "")
        window.update(dict.fromkeys(window_keys[1:], 0.0))
        window["loss"].zero_()
        timer.update(started=time.perf_counter(), paused=0.0)

    def end_step(*, epoch_ended: bool, stop_requested: bool, grad_norm=None, may_log: bool = True) -> bool:
        """Carry out `step_end`'s decision for the step just taken; True: exit for a stop request."""
        end = step_end(
            loop.step, epoch_ended=epoch_ended, epochs_done=loop.epoch, max_epochs=cfg.train.max_epochs,
            max_steps=cfg.train.max_steps, eval_every_steps=cfg.train.eval_every_steps,
            checkpoint_every_steps=cfg.train.checkpoint_every_steps,
            log_every_steps=cfg.logging.log_every_steps, stop_requested=stop_requested,
        )
        if end.finish:
            loop.stop_reason = end.finish
        if end.log and may_log:
            log_training(grad_norm)
        paused = time.perf_counter()
        if end.evaluate and loop.last_evaluation_step != loop.step:
            validate()  # may decide on early stopping
        if end.defer_evaluation and loop.last_evaluation_step != loop.step:
            loop.pending_evaluation = True
        if end.exit_preempted:
            log.warning("stop requested (%s): saving step %d and exiting with %d%s", watcher.reason(), loop.step,
                        EXIT_PREEMPTED, " (its validation runs first on resume)" if loop.pending_evaluation else "")
        if end.checkpoint:
            checkpoint()
        timer["paused"] += time.perf_counter() - paused
        return end.exit_preempted

    if loop.pending_evaluation:  # the stop request came on a step whose validation was due
        validate()
        checkpoint()

    # Telemetry, measured once on the main process (it alone logs): the model's FLOPs per utterance of
    # the split's mean cropped length, and on a GPU the matmul peak in the training precision.
    flops_per_utterance = peak_flops = None
    if accelerator.is_main_process and zero_stage(accelerator) != 3:  # ZeRO-3: no whole model on one rank
        mean_seconds = float(np.mean(np.minimum(split.meta.duration[split.train_mask()], cfg.data.max_audio_seconds)))
        flops_per_utterance = count_flops_per_utterance(accelerator.unwrap_model(model, keep_torch_compile=False),
                                                        feature_extractor, tokenizer,
                                                        seconds=mean_seconds,
                                                        tokens=min(cfg.data.max_text_tokens, TYPICAL_TOKENS))
        if accelerator.device.type == "cuda":
            peak_flops = matmul_peak_flops(accelerator.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                cfg.train.mixed_precision, torch.float32))
            log.info("model: %.2f GFLOP per utterance forward; %s matmul peak %.0f TFLOP/s", flops_per_utterance / 1e9,
                     cfg.train.mixed_precision, peak_flops / 1e12)

    # ----------------------------------------------------------------------------- train loop
    progress = tqdm(total=total_steps, initial=loop.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and cfg.logging.progress_bar))
    grad_norm = None
    model.train()
    while loop.stop_reason is None:
        stream.set_epoch(loop.epoch)  # a no-op when resuming inside this epoch
        step_sizes = stream.step_utterances()  # utterances per step, all ranks: the loss's denominator
        if len(step_sizes) == 0:
            # Only the rest of an epoch resumed on more ranks can be too small for one step on each
            # (a fresh epoch with no step is a config error, above): it ends at the step it was
            # stopped at, and its few utterances are counted as dropped.
            log.warning("epoch %d: the %d utterance(s) left cannot fill a step on %d rank(s): the epoch ends here",
                        loop.epoch, sum(plan.dropped for plan in stream.plans()), world_size)
            loop.epoch += 1
            stream.set_epoch(loop.epoch)
            if end_step(epoch_ended=True, stop_requested=False, may_log=False):
                break  # (never: no stop request)
            continue
        batches = iter(stream)
        for k in range(stream.steps_done, len(step_sizes)):
            # One optimizer step: `accumulation` micro-batches, gradients synchronised on the last.
            step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
            step_valid = 0
            for micro in range(accumulation):
                waited = time.perf_counter()
                batch = next(batches)
                window["data_seconds"] += time.perf_counter() - waited  # the host waiting for data
                with accelerator.accumulate(model):
                    if accelerator.sync_gradients != (micro == accumulation - 1):
                        raise RuntimeError("Accelerate's accumulation boundary drifted from the step's micro-batches")
                    logits = model(**model_inputs(batch, accelerator.device)).logits  # [B, C]
                    losses = utterance_losses(logits, batch["labels"], valid=batch["valid"],
                                              class_weights=class_weights,
                                              label_smoothing=cfg.train.label_smoothing)  # [B]
                    accelerator.backward(micro_batch_loss(losses, int(step_sizes[k]), world_size=world_size,
                                                          accumulation=accumulation))
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                                cfg.train.max_grad_norm or float("inf"))
                        # The step's one collective and one host read: finite gradients? a stop request?
                        applied, stop_requested = finish_optimizer_step(
                            accelerator, optimizer, scheduler, grad_norm, stop_requested=watcher.requested())
                step_loss += losses.detach().sum()  # on the device until a log step
                step_valid += batch["num_valid"]
                window["utterances"] += len(batch["ids"])
                window["audio_seconds"] += batch["audio_seconds"]
                window["padded_seconds"] += batch["padded_audio_seconds"]
            loop.step += 1  # skipped steps count too: the step number is a position in the data
            window["steps"] += 1
            progress.update(1)
            if applied:  # the logged loss is that of the updates made
                window["loss"] += step_loss
                window["valid"] += step_valid
                loop.consecutive_nonfinite = 0
            else:
                loop.consecutive_nonfinite += 1
                loop.nonfinite_steps += 1
                log.warning("step %d: non-finite gradients (norm %s), step skipped (%d in a row)",
                            loop.step, float(grad_norm) if grad_norm is not None else "?", loop.consecutive_nonfinite)
                if loop.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                    raise TooManyNonFiniteSteps(
                        f"{loop.consecutive_nonfinite} steps in a row with non-finite gradients at step {loop.step}: "
                        "lower train.lr / head_lr, use bf16 instead of fp16, or check the data"
                    )

            epoch_ended = k == len(step_sizes) - 1
            if epoch_ended:  # the stream moves on before the checkpoint, which resumes the next epoch
                if next(batches, None) is not None:
                    raise RuntimeError(f"epoch {loop.epoch}: the stream holds more batches than its plan")
                loop.epoch += 1
                stream.set_epoch(loop.epoch)
            if end_step(epoch_ended=epoch_ended, stop_requested=stop_requested, grad_norm=grad_norm):
                progress.close()
                watcher.uninstall()
                accelerator.end_training()
                folder_lock.release()
                return EXIT_PREEMPTED
            if loop.stop_reason is not None:
                break
    progress.close()
    stream.close()  # the training's data workers (and what they prefetched) are not needed for the test
    log.info("training stopped: %s after %d steps (best validation UA %.4f at step %s)",
             loop.stop_reason, loop.step, loop.best_ua, loop.best_step)

    # ------------------------------------------------------------------- best model and test
    # Every rank loads the best checkpoint: this restores the best weights under any strategy (ZeRO-3 too).
    # It is this run's, or the run it was started from (train.resume=<another run's checkpoint>).
    best_name = checkpoint_name(loop.best_step)
    best_folder = next((folder for folder in (checkpoints_dir / best_name,
                                              resume_from.parent / best_name if resume_from else None)
                        if folder is not None and (folder / COMPLETE).is_file()), None)
    if best_folder is None:
        raise ResumeError(f"the best checkpoint (step {loop.best_step}) is no longer in {checkpoints_dir}")
    load_checkpoint(accelerator, best_folder)
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3 (gathers the partitions)
    if accelerator.is_main_process:  # (under ZeRO-3 only rank 0 receives the gathered weights)
        # A compiled model (Accelerate's dynamo config) names every key `_orig_mod.<name>`: keep the model's own.
        state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
        best_model = accelerator.unwrap_model(model, keep_torch_compile=False)
        best_model.preprocessing.update(sampling_rate=cfg.data.sampling_rate, max_text_tokens=cfg.data.max_text_tokens,
                                        max_audio_seconds=cfg.data.max_audio_seconds)
        best_model.save_pretrained(output_dir / "best", processors=(feature_extractor, tokenizer), state_dict=state_dict)
        save_config(cfg, output_dir / "best" / "config.yaml", provenance=run_provenance)
    skipped_total = int(summed_over_ranks([len(stream.skipped)])[0])
    results = {"validation": loop.best_validation, "best_step": loop.best_step,
               "stop_reason": loop.stop_reason, "steps": loop.step,
               "nonfinite_steps": loop.nonfinite_steps, "skipped_training_utterances": skipped_total}
    if test_loader is not None:
        results["test"] = evaluate(accelerator, model, test_loader, label_names=labels)
        tracking.log(accelerator, {f"test/{k}": results["test"][k] for k in ("wa", "ua", "macro_f1")}, loop.step)
        tracking.log_confusion(accelerator, cfg, "test", results["test"]["confusion"], labels, loop.step)
    if accelerator.is_main_process:
        # Atomically: a run killed while writing must not leave half a file that says "finished".
        partial = output_dir / "metrics.json.partial"
        partial.write_text(json.dumps(results, indent=2))
        os.replace(partial, output_dir / "metrics.json")
        log.info("results (WA = accuracy, UA = mean per-class recall):\n%s", format_results(results))
    tracking.summarize(accelerator, cfg, {
        "best/validation_ua": loop.best_ua, "best/step": loop.best_step,
        **({"test/wa": results["test"]["wa"], "test/ua": results["test"]["ua"]} if "test" in results else {}),
    })
    watcher.uninstall()
    accelerator.end_training()
    folder_lock.release()
    return 0


def format_results(results: dict) -> str:
    """A small table: WA, UA, macro-F1 and recall per class for validation and test."""
    labels = next((list(results[s]["per_class_recall"]) for s in ("validation", "test") if results.get(s)), [])
    width = max(9, *(len(name) + 1 for name in labels)) if labels else 9
    header = f"{'split':<11}{'n':>6}{'WA':>8}{'UA':>8}{'F1':>8}" + "".join(f"{name:>{width}}" for name in labels)
    lines = [header]
    for split in ("validation", "test"):
        m = results.get(split)
        if not m:
            continue
        recalls = "".join(
            f"{m['per_class_recall'][name]:>{width}.3f}" if m["per_class_recall"][name] is not None else f"{'-':>{width}}"
            for name in labels
        )
        lines.append(f"{split:<11}{m['n']:>6}{m['wa']:>8.3f}{m['ua']:>8.3f}{m['macro_f1']:>8.3f}{recalls}")
    return "\n".join(lines) + "\n(recall per class on the right)"
