"""The rest of an epoch too small for one step (what a resume onto more ranks can leave), through the
recipe's own setup and fit (tests/integration/test_train_resume.py).

argv: OUT_JSON CONFIG [overrides...]. After setup, the run stands at step 5 of epoch 0, its step 5
logged and saved (as a run stopped there would have left it), and the stream's plan for the rest of
epoch 0 holds no step (the plan of every later epoch is the stream's own). Writes what `fit` did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from emotrain.config import load_config
from emotrain.train.recipe import fit, setup


class NothingLeftInEpochZero:
    """The run's stream, but epoch 0's remaining plan holds no step."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def step_utterances(self, epoch=None):
        epoch = self._stream.epoch if epoch is None else epoch
        return np.zeros(0, dtype=np.int64) if epoch == 0 else self._stream.step_utterances(epoch)

    def steps_in_epoch(self, epoch=None):
        return len(self.step_utterances(epoch))


def main() -> None:
    out = Path(sys.argv[1])
    training = setup(load_config(sys.argv[2], sys.argv[3:]))
    progress = training.state.progress
    progress.step = progress.last_log_step = 5
    training.state.stream = NothingLeftInEpochZero(training.state.stream)
    exit_code = fit(training)
    out.write_text(json.dumps({"exit_code": exit_code, "epoch": progress.epoch, "step": progress.step,
                               "stop_reason": progress.stop_reason,
                               "last_evaluation_step": progress.last_evaluation_step,
                               "stream_epoch": training.state.stream.epoch}))
    training.close()


if __name__ == "__main__":
    main()
