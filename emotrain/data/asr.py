"""Speech recognition for data without transcripts, through transformers' ASR pipeline.

Used by `emotrain prepare --asr` (transcripts for the rows a source gave none) and by
`emotrain predict --asr` (a transcript for a model that needs text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


class RecogniserError(ValueError):
    """The speech recogniser cannot be loaded: the message names it and says why."""


class Transcriber:
    """A speech recogniser through transformers' ASR pipeline (CTC or sequence-to-sequence)."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu"):
        import torch  # with transformers: only when a recogniser is wanted (`emotrain prepare` needs neither)
        from transformers import pipeline

        self.name = str(name_or_path)
        try:
            self.pipeline = pipeline("automatic-speech-recognition", model=self.name, device=torch.device(device))
        except Exception as err:  # noqa: BLE001 - OSError, ValueError, KeyError (unknown architecture), ImportError...
            raise RecogniserError(f"cannot load the speech recogniser {self.name!r}: {type(err).__name__}: "
                                  f"{' '.join(str(err).split())}") from None

    def __call__(self, samples: np.ndarray, sampling_rate: int) -> str:
        seconds = len(samples) / sampling_rate
        kwargs = {"chunk_length_s": 30.0} if seconds > 30.0 else {}  # long audio: chunked, with overlap
        result = self.pipeline({"raw": samples, "sampling_rate": sampling_rate}, **kwargs)
        return " ".join(result["text"].split())
