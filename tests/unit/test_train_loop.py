"""The loop's parts: per-utterance loss weighting, the end-of-step decisions, skipping a bad step."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from emotrain.train.loss import balanced_class_weights, micro_batch_loss, utterance_losses
from emotrain.train.step_end import StepEnd, StepFacts, StepRule
from emotrain.train.step import finish_optimizer_step
from tests.faults import nan_gradient


@pytest.fixture
def accelerator_factory():
    """A fresh single-process Accelerator per call (Accelerate keeps its state in singletons)."""

    def make(**kwargs) -> Accelerator:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _data(n=10, features=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# Loss weighting.


def test_one_step_of_unequal_micro_batches_has_the_gradient_of_one_big_batch(accelerator_factory):
    """1 process, accumulation 2, micro-batches of 3 and 7 utterances: the step's gradient is the
    mean over the 10 utterances, as if they were one batch (not the mean of two batch means)."""
    x, y = _data()
    torch.manual_seed(0)
    reference = nn.Linear(6, 4)
    model = copy.deepcopy(reference)

    accelerator = accelerator_factory(gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    micro_batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    for i, (xb, yb) in enumerate(micro_batches):
        with accelerator.accumulate(model):
            assert accelerator.sync_gradients == (i == 1)
            losses = utterance_losses(model(xb), yb)
            accelerator.backward(micro_batch_loss(losses, 10, world_size=1, accumulation=2))
    got = [p.grad.clone() for p in model.parameters()]

    F.cross_entropy(reference(x), y).backward()  # one big batch, mean over its 10 utterances
    expected = [p.grad for p in reference.parameters()]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)

    # What a mean per micro-batch (today's F.cross_entropy per batch) would have given instead.
    naive = copy.deepcopy(reference)
    naive.zero_grad()
    sum(F.cross_entropy(naive(xb), yb) / 2 for xb, yb in micro_batches).backward()
    assert not torch.allclose(naive.weight.grad, expected[0], atol=1e-4)


def test_stand_ins_weigh_nothing_class_weights_and_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [float("nan")] * 4])
    labels = torch.tensor([0, 1, 2])
    valid = torch.tensor([True, True, False])
    plain = utterance_losses(logits, labels, valid=valid)
    assert plain[2] == 0 and torch.isfinite(plain).all()  # a NaN stand-in does not poison the sum
    torch.testing.assert_close(plain[:2], F.cross_entropy(logits[:2], labels[:2], reduction="none"))

    weights = balanced_class_weights(np.array([0, 0, 0, 1, 2, 2]), 4)
    torch.testing.assert_close(weights, torch.tensor([6 / 12, 6 / 4, 6 / 8, 0.0]))  # N / (C n_c); absent: 0
    weighted = utterance_losses(logits, labels, valid=valid, class_weights=weights)
    torch.testing.assert_close(weighted[:2], plain[:2] * torch.tensor([0.5, 1.5]))

    smoothed = utterance_losses(logits[:2], labels[:2], label_smoothing=0.1)
    torch.testing.assert_close(smoothed, F.cross_entropy(logits[:2], labels[:2], reduction="none",
                                                         label_smoothing=0.1))
    assert (smoothed > plain[:2]).all()  # confident right answers cost more with smoothing

    assert micro_batch_loss(torch.tensor([1.0, 3.0]), 8, world_size=2, accumulation=2).item() == 2.0
    with pytest.raises(ValueError):
        micro_batch_loss(torch.tensor([1.0]), 0, world_size=1, accumulation=1)


# ---------------------------------------------------------------------------------------------
# The end-of-step decision.

RULE = StepRule(max_epochs=3, max_steps=0, eval_every_steps=5, checkpoint_every_steps=4, log_every_steps=2,
                early_stopping_patience=2, max_consecutive_nonfinite=3)


def _due(step, rule=RULE, **facts):
    facts = StepFacts(step, **facts)
    return {"log": rule.log_due(facts), "evaluate": rule.evaluation_due(facts)}


def _end(step, rule=RULE, **facts):
    return rule.step_end(StepFacts(step, **facts))


def test_an_ordinary_step_does_what_its_cadences_say():
    assert _due(1) == {"log": False, "evaluate": False} and _end(1) == StepEnd()
    assert _due(2) == {"log": True, "evaluate": False} and _end(2) == StepEnd()
    assert _end(4) == StepEnd(checkpoint=True)
    assert _due(5) == {"log": False, "evaluate": True}
    assert _end(5, validated=True) == StepEnd(checkpoint=True)  # every validation is followed by a checkpoint
    quiet = dataclasses.replace(RULE, eval_every_steps=0, checkpoint_every_steps=0)
    assert _due(5, quiet) == {"log": False, "evaluate": False} and _end(5, quiet) == StepEnd()


def test_an_epoch_end_on_an_evaluation_step_evaluates_once():
    assert _due(10, epoch_ended=True, epochs_done=1) == {"log": True, "evaluate": True}
    assert _end(10, epoch_ended=True, epochs_done=1, validated=True) == StepEnd(checkpoint=True)


def test_the_last_step_evaluates_and_finishes():
    assert _due(7, dataclasses.replace(RULE, max_steps=7))["evaluate"]
    assert _end(7, dataclasses.replace(RULE, max_steps=7), validated=True) == StepEnd(checkpoint=True, finish="max_steps")
    assert _due(9, epoch_ended=True, epochs_done=3)["evaluate"]
    assert _end(9, epoch_ended=True, epochs_done=3, validated=True) == StepEnd(checkpoint=True, finish="max_epochs")
    assert _end(9, epoch_ended=True, epochs_done=2, validated=True).finish is None


def test_a_stop_request_saves_at_once_and_defers_a_due_evaluation():
    assert _end(3, stop_requested=True) == StepEnd(checkpoint=True, exit_preempted=True)
    # On an evaluation step (and an epoch end): checkpoint first, the resumed run validates this step.
    end = _end(10, epoch_ended=True, epochs_done=1, stop_requested=True)
    assert end == StepEnd(defer_evaluation=True, checkpoint=True, exit_preempted=True)
    end = _end(7, dataclasses.replace(RULE, max_steps=7), stop_requested=True)
    assert end == StepEnd(defer_evaluation=True, checkpoint=True, exit_preempted=True, finish="max_steps")
    # A step validated already (the rest of an epoch too small for a step) is not deferred again.
    assert _end(10, epoch_ended=True, epochs_done=1, stop_requested=True, validated=True).defer_evaluation is False


def test_early_stopping_is_decided_by_the_step_end_after_a_validation():
    # The patience-th validation without improvement finishes the run at that step, after its checkpoint.
    assert _end(5, validated=True, evaluations_without_improvement=1).finish is None
    assert _end(5, validated=True, evaluations_without_improvement=2) == StepEnd(checkpoint=True, finish="early_stopping")
    # Only a validation counts: a step without one never stops early, whatever the count says.
    assert _end(6, evaluations_without_improvement=2).finish is None
    # A limit reached at the same step is the reason given; patience 0 never stops early.
    assert _end(7, dataclasses.replace(RULE, max_steps=7), validated=True,
                evaluations_without_improvement=2).finish == "max_steps"
    assert _end(5, dataclasses.replace(RULE, early_stopping_patience=0), validated=True,
                evaluations_without_improvement=9).finish is None


def test_too_many_non_finite_steps_in_a_row_abort_before_anything_else():
    assert _end(4, consecutive_nonfinite=2).abort is None
    end = _end(4, consecutive_nonfinite=3, stop_requested=True)
    assert end.abort and "3 steps in a row with non-finite gradients at step 4" in end.abort
    assert not (end.checkpoint or end.exit_preempted or end.finish)  # no checkpoint of a diverged run


# ---------------------------------------------------------------------------------------------
# A bad step leaves nothing behind.


def _one_step(accelerator, model, optimizer, x, y, poison: bool):
    for i, (xb, yb) in enumerate(((x[:4], y[:4]), (x[4:], y[4:]))):
        with accelerator.accumulate(model):
            losses = utterance_losses(model(xb), yb)
            if poison and i == 0:  # finite loss, NaN gradient, first micro-batch of the accumulation
                losses = losses + 0 * nan_gradient(losses)
            accelerator.backward(micro_batch_loss(losses, len(y), world_size=1, accumulation=2))
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                applied, stop = finish_optimizer_step(accelerator, optimizer, norm, stop_requested=poison)
                assert stop is poison  # the stop request travels with the verdict
    return applied


def test_a_step_with_non_finite_gradients_is_skipped_whole(accelerator_factory):
    x, y = _data(n=8)
    torch.manual_seed(0)
    accelerator = accelerator_factory(gradient_accumulation_steps=2)
    model = nn.Linear(6, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    assert _one_step(accelerator, model, optimizer, x, y, poison=False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = copy.deepcopy(optimizer.state_dict())

    assert not _one_step(accelerator, model, optimizer, x, y, poison=True)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # nothing applied
    after = optimizer.state_dict()
    for key, state in moments["state"].items():  # Adam's moments and step count untouched
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(value)), name
    assert all(p.grad is None for p in model.parameters())  # nothing left for the next step

    # The next step is exactly the step a run without the bad one would take.
    clean = copy.deepcopy(model)
    clean_optimizer = torch.optim.AdamW(clean.parameters(), lr=0.1)
    clean_optimizer.load_state_dict(moments)
    assert _one_step(accelerator, model, optimizer, x, y, poison=False)
    losses = utterance_losses(clean(x[:4]), y[:4]).sum() + utterance_losses(clean(x[4:]), y[4:]).sum()
    (losses / len(y)).backward()
    torch.nn.utils.clip_grad_norm_(clean.parameters(), 1.0)
    clean_optimizer.step()
    for a, b in zip(model.parameters(), clean.parameters()):
        torch.testing.assert_close(a, b)
    assert all(math.isfinite(v) for p in model.parameters() for v in p.detach().flatten().tolist())


def test_flops_are_counted_on_a_forward_without_touching_the_rng():
    from emotrain.config import ModelConfig
    from emotrain.model import EmotionModel
    from emotrain.train.telemetry import flops_per_utterance, matmul_peak_flops

    model = EmotionModel(ModelConfig(variant="fusion", text_encoder="tiny", hidden_size=32, classifier_hidden_size=32)).train()
    fe, tok = model.processors()
    state = torch.random.get_rng_state()
    short = flops_per_utterance(model, fe, tok, seconds=1.0, tokens=8)
    long = flops_per_utterance(model, fe, tok, seconds=4.0, tokens=8)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert 0 < short < long and 3.0 < long / short < 5.0  # mostly linear in the audio's length
    assert flops_per_utterance(model, fe, tok, seconds=1.0, tokens=32) > short  # and grows with the text
    state = torch.random.get_rng_state()
    assert matmul_peak_flops(torch.device("cpu"), torch.float32, size=256, seconds=0.05) > 1e8
    assert torch.equal(torch.random.get_rng_state(), state)  # its own generator: training's RNG untouched
