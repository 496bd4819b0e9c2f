"""The training recipe, top to bottom: setup → train loop → evaluate → save.

    emotrain train configs/smoke.yaml                                   # one process
    accelerate launch --config_file launch/ddp.yaml -m emotrain.cli train configs/paper.yaml
    sbatch slurm/train.sbatch configs/paper.yaml data.fold=3            # Slurm, requeued on preemption

One optimizer step = `train.gradient_accumulation_steps` micro-batches per rank. Every rank must
have that many left in its stream, or the epoch ends on all ranks together (ranks stream different
shards and may hold different numbers of batches; a rank waiting alone in an all-reduce would hang).
Evaluation on the validation set happens at every epoch end (and every `train.eval_every_steps`)
and is always followed by a checkpoint, so the best step always has one. At the end the best
checkpoint is reloaded, exported with `save_pretrained` to `best/` and scored on the test session.

A stop request (SIGTERM, SIGUSR1, or the flag file) is agreed on by all ranks at the next step
boundary; they save a checkpoint and exit with EXIT_PREEMPTED (75). Rerunning the same command
(`train.resume=auto`) continues from the newest complete checkpoint: model, optimizer, scheduler,
scaler, RNG of every rank, the data stream's exact position on every rank, and this loop's state.
"""

from __future__ import annotations

import json
import os
import time
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast_object_list,
    set_seed,
)
from tqdm.auto import tqdm

from emotrain.config import LABEL_NAMES, Config, save_config
from emotrain.data.evaluation import build_eval_dataloader, build_eval_datasets
from emotrain.data.folds import split_from_config
from emotrain.data.stream import build_train_stream
from emotrain.distributed import all_ranks_true, min_over_ranks, sum_over_ranks
from emotrain.model import build_model, build_processors
from emotrain.train import tracking
from emotrain.train.checkpoint import (
    LoopState,
    checkpoint_name,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from emotrain.train.deepspeed_config import fill_deepspeed_auto, model_construction
from emotrain.train.evaluation import evaluate, model_inputs
from emotrain.train.optim import build_optimizer_and_scheduler
from emotrain.train.preemption import (
    EXIT_PREEMPTED,
    PreemptionWatcher,
    default_flag_file,
)


class TooManyNonFiniteLosses(RuntimeError):
    pass


def train(cfg: Config) -> int:
    """Run one fold's training; returns the process exit code (0, or EXIT_PREEMPTED)."""
    # ---------------------------------------------------------------------------------- setup
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several CPU processes (the tests): gloo. Without it DeepSpeed's processes each train alone.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=list(cfg.logging.report_to) or None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        kwargs_handlers=handlers,
    )
    output_dir = Path(cfg.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    log = tracking.setup_logging(output_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(cfg, output_dir / "config.yaml")
        log.info("resolved config:\n%s", cfg.to_yaml().rstrip())
        log.info("%d process(es), %s, mixed precision %s", accelerator.num_processes,
                 accelerator.distributed_type, accelerator.mixed_precision)

    # A stale flag from an earlier stop must not stop this run at once.
    stop_flag = default_flag_file(output_dir)
    if accelerator.is_main_process:
        stop_flag.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    watcher = PreemptionWatcher(stop_flag).install()
    set_seed(cfg.train.seed)

    # ----------------------------------------------------------------------------------- data
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    log.info("fold %d: %s", cfg.data.fold, json.dumps(split.summary()))
    feature_extractor, tokenizer = build_processors(cfg.model)
    stream = build_train_stream(
        cfg, split, feature_extractor=feature_extractor, tokenizer=tokenizer,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    validation_set, test_set = build_eval_datasets(split, sampling_rate=cfg.data.sampling_rate)
    eval_loader_args = dict(feature_extractor=feature_extractor, tokenizer=tokenizer)
    validation_loader = build_eval_dataloader(validation_set, cfg.data, **eval_loader_args)
    test_loader = build_eval_dataloader(test_set, cfg.data, **eval_loader_args) if test_set else None

    # Optimizer steps per epoch: the epoch ends when the first rank runs out of micro-batches.
    accumulation = cfg.train.gradient_accumulation_steps
    batches_per_epoch = min_over_ranks([stream.num_batches(e) for e in range(cfg.train.max_epochs)], accelerator)
    steps_per_epoch = [n // accumulation for n in batches_per_epoch]
    total_steps = sum(steps_per_epoch)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    if total_steps == 0:
        raise ValueError(
            f"no optimizer step fits in an epoch ({min(batches_per_epoch)} batches per rank, "
            f"{accumulation} per step): use a smaller train.gradient_accumulation_steps or batch budget"
        )
    log.info("%d optimizer steps (%s per epoch, %d micro-batch(es) per step)",
             total_steps, steps_per_epoch[0], accumulation)

    # ---------------------------------------------------------------------------------- model
    with model_construction(accelerator):  # ZeRO-3: no zero.Init (it breaks Wav2Vec2's weight norm)
        model = build_model(cfg.model)
    model.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg.train, total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        fill_deepspeed_auto(accelerator.state.deepspeed_plugin.deepspeed_config, cfg)
    # The training stream is NOT prepared: it is sharded across ranks already (see data/stream.py).
    model, optimizer, scheduler, validation_loader = accelerator.prepare(model, optimizer, scheduler, validation_loader)
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    group_names = [group["name"] for group in optimizer.param_groups]

    # --------------------------------------------------------------------------------- resume
    resume_from = [resolve_resume(cfg.train.resume, checkpoints_dir) if accelerator.is_main_process else None]
    broadcast_object_list(resume_from)  # the main process decides, so all ranks load the same folder
    if resume_from[0] is not None:
        loop, stream_state = load_checkpoint(accelerator, resume_from[0])
        stream.load_state_dict(stream_state)
        log.info("resumed from %s (epoch %d, step %d)", resume_from[0], loop.epoch, loop.step)
    else:
        loop = LoopState(run_id=tracking.new_run_id())
        log.info("starting fresh in %s", output_dir)
    tracking.start(accelerator, cfg, loop.run_id)

    def checkpoint() -> Path:
        return save_checkpoint(
            accelerator, checkpoints_dir, loop.step, stream_state=stream.state_dict(), loop_state=loop,
            config_yaml=cfg.to_yaml(), keep_last=cfg.train.keep_last_checkpoints,
        )

    def validate() -> None:
        """Evaluate on validation, track the best UA and early stopping, log, then checkpoint."""
        metrics = evaluate(accelerator, model, validation_loader)
        improved = metrics["ua"] > loop.best_ua
        if improved:
            loop.best_ua, loop.best_step, loop.best_validation = metrics["ua"], loop.step, metrics
            loop.evaluations_without_improvement = 0
        else:
            loop.evaluations_without_improvement += 1
        patience = cfg.train.early_stopping_patience
        if patience and loop.evaluations_without_improvement >= patience and loop.stop_reason is None:
            loop.stop_reason = "early_stopping"
        log.info("step %d validation: WA %.4f UA %.4f macro-F1 %.4f%s", loop.step, metrics["wa"], metrics["ua"],
                 metrics["macro_f1"], " (best)" if improved else "")
        tracking.log(accelerator, {f"validation/{k}": metrics[k] for k in ("wa", "ua", "macro_f1")}
                     | {f"validation/recall_{name}": r for name, r in metrics["per_class_recall"].items()
                        if r is not None}, loop.step)
        tracking.log_confusion(accelerator, cfg, "validation", metrics["confusion"], LABEL_NAMES, loop.step)
        checkpoint()

    # ----------------------------------------------------------------------------- train loop
    progress = tqdm(total=total_steps, initial=loop.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and cfg.logging.progress_bar))
    window = {"loss": 0.0, "micro_batches": 0, "utterances": 0, "audio_seconds": 0.0, "padded_seconds": 0.0}
    window_started = time.perf_counter()
    grad_norm = None
    model.train()
    while loop.stop_reason is None and loop.epoch < cfg.train.max_epochs:
        stream.set_epoch(loop.epoch)  # a no-op when resuming inside this epoch
        batches = iter(stream)
        while True:
            micro_batches = list(islice(batches, accumulation))
            if not all_ranks_true(len(micro_batches) == accumulation, accelerator):
                break  # some rank ran out: the epoch ends everywhere (leftover micro-batches are dropped)

            # One optimizer step. A non-finite loss on any rank skips the whole step on all ranks.
            skip_step = False
            for batch in micro_batches:
                with accelerator.accumulate(model):
                    loss = model(**model_inputs(batch, accelerator.device),
                                 labels=batch["labels"].to(accelerator.device)).loss
                    if not all_ranks_true(bool(torch.isfinite(loss.detach()).item()), accelerator):
                        skip_step = True
                    if not skip_step:
                        accelerator.backward(loss)
                        window["loss"] += loss.detach().float().item()
                        window["micro_batches"] += 1
                    if accelerator.sync_gradients and not skip_step:
                        max_norm = cfg.train.max_grad_norm or float("inf")
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped it
                            scheduler.step()
                    optimizer.zero_grad(set_to_none=True)  # acts only at the end of an accumulation
                window["utterances"] += len(batch["ids"])
                window["audio_seconds"] += batch["audio_seconds"]
                window["padded_seconds"] += batch["padded_audio_seconds"]
            if skip_step:
                loop.consecutive_nonfinite += 1
                loop.nonfinite_steps += 1
                log.warning("step %d: non-finite loss, step skipped (%d in a row)", loop.step + 1,
                            loop.consecutive_nonfinite)
                if loop.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                    raise TooManyNonFiniteLosses(
                        f"{loop.consecutive_nonfinite} non-finite losses in a row at step {loop.step + 1}: "
                        "lower train.lr / head_lr, use bf16 instead of fp16, or check the data"
                    )
                continue
            loop.consecutive_nonfinite = 0
            loop.step += 1
            progress.update(1)

            if loop.step % cfg.logging.log_every_steps == 0:
                totals = dict(zip(window, sum_over_ranks(list(window.values()), accelerator)))
                elapsed = time.perf_counter() - window_started
                values = {
                    "train/loss": totals["loss"] / max(1, totals["micro_batches"]),
                    "train/epoch": loop.epoch,
                    "train/utterances_per_second": totals["utterances"] / elapsed,
                    "train/audio_seconds_per_second": totals["audio_seconds"] / elapsed,
                    "train/padding_efficiency": totals["audio_seconds"] / max(totals["padded_seconds"], 1e-9),
                    "train/nonfinite_steps": loop.nonfinite_steps,
                    "train/skipped_examples": len(stream.skipped),
                }
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                for name, lr in zip(group_names, scheduler.get_last_lr()):
                    values[f"train/lr_{name}"] = lr
                tracking.log(accelerator, values, loop.step)
                progress.set_postfix(loss=f"{values['train/loss']:.3f}",
                                     utt_s=f"{values['train/utterances_per_second']:.1f}")
                log.info("step %d epoch %d loss %.4f | %.1f utt/s, %.1f audio s/s, padding efficiency %.2f",
                         loop.step, loop.epoch, values["train/loss"], values["train/utterances_per_second"],
                         values["train/audio_seconds_per_second"], values["train/padding_efficiency"])
                window = dict.fromkeys(window, 0.0)
                window_started = time.perf_counter()

            if cfg.train.max_steps and loop.step >= cfg.train.max_steps:
                loop.stop_reason = "max_steps"
                validate()
                break
            if watcher.requested():
                accelerator.set_trigger()
            if accelerator.check_trigger():  # a collective: every rank reaches it at every step
                log.warning("stop requested (%s): saving step %d and exiting with %d",
                            watcher.reason(), loop.step, EXIT_PREEMPTED)
                checkpoint()
                progress.close()
                accelerator.end_training()
                return EXIT_PREEMPTED
            if cfg.train.eval_every_steps and loop.step % cfg.train.eval_every_steps == 0:
                validate()  # may decide on early stopping
                if loop.stop_reason is not None:
                    break
            elif cfg.train.checkpoint_every_steps and loop.step % cfg.train.checkpoint_every_steps == 0:
                checkpoint()
        if loop.stop_reason is not None:
            break  # stopped inside the epoch, validated and saved already
        # Epoch end: the stream moves to the next epoch before the checkpoint is taken.
        loop.epoch += 1
        stream.set_epoch(loop.epoch)
        if stream.skipped:
            log.warning("%d training utterances could not be decoded so far and were skipped: %s",
                        len(stream.skipped), ", ".join(stream.skipped[:20]))
        validate()
    if loop.stop_reason is None:
        loop.stop_reason = "max_epochs"
    progress.close()
    log.info("training stopped: %s after %d steps (best validation UA %.4f at step %s)",
             loop.stop_reason, loop.step, loop.best_ua, loop.best_step)

    # ------------------------------------------------------------------- best model and test
    # Every rank loads the best checkpoint: this restores the best weights under any strategy (ZeRO-3 too).
    load_checkpoint(accelerator, checkpoints_dir / checkpoint_name(loop.best_step))
    state_dict = accelerator.get_state_dict(model)  # a collective under ZeRO-3 (gathers the partitions)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(
            output_dir / "best", processors=(feature_extractor, tokenizer), state_dict=state_dict)
        save_config(cfg, output_dir / "best" / "config.yaml")
    results = {"validation": loop.best_validation, "best_step": loop.best_step,
               "stop_reason": loop.stop_reason, "steps": loop.step,
               "nonfinite_steps": loop.nonfinite_steps, "skipped_training_utterances": len(stream.skipped)}
    if test_loader is not None:
        results["test"] = evaluate(accelerator, model, test_loader)
        tracking.log(accelerator, {f"test/{k}": results["test"][k] for k in ("wa", "ua", "macro_f1")}, loop.step)
        tracking.log_confusion(accelerator, cfg, "test", results["test"]["confusion"], LABEL_NAMES, loop.step)
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        log.info("results (WA = accuracy, UA = mean per-class recall):\n%s", format_results(results))
    tracking.summarize(accelerator, cfg, {
        "best/validation_ua": loop.best_ua, "best/step": loop.best_step,
        **({"test/wa": results["test"]["wa"], "test/ua": results["test"]["ua"]} if "test" in results else {}),
    })
    watcher.uninstall()
    accelerator.end_training()
    return 0


def format_results(results: dict) -> str:
    """A small table: WA, UA, macro-F1 and recall per class for validation and test."""
    header = f"{'split':<11}{'n':>6}{'WA':>8}{'UA':>8}{'F1':>8}" + "".join(f"{name:>9}" for name in LABEL_NAMES)
    lines = [header]
    for split in ("validation", "test"):
        m = results.get(split)
        if not m:
            continue
        recalls = "".join(
            f"{m['per_class_recall'][name]:>9.3f}" if m["per_class_recall"][name] is not None else f"{'-':>9}"
            for name in LABEL_NAMES
        )
        lines.append(f"{split:<11}{m['n']:>6}{m['wa']:>8.3f}{m['ua']:>8.3f}{m['macro_f1']:>8.3f}{recalls}")
    return "\n".join(lines) + "\n(recall per class on the right)"

