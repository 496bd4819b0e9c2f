"""The processor of a fusion model folder: audio and transcript in, the model's inputs out.

    processor = AutoProcessor.from_pretrained("runs/smoke/fold1/best", trust_remote_code=True)
    inputs = processor(audio=[waveform], text=["I can't believe it"], sampling_rate=16000)
    logits = model(**inputs).logits

Shipped in fusion model folders (`processor_config.json` names it) for transformers users; emotrain's
own data pipeline prepares batches itself (`emotrain.data.batching`). A unimodal folder needs no
processor of its own: AutoProcessor gives its feature extractor (audio) or tokenizer (text).
Imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import ProcessorMixin


class EmotrainProcessor(ProcessorMixin):
    """The folder's feature extractor and tokenizer, called together: `input_values` and
    `attention_mask` (the audio's, as the model's forward names it), `input_ids` and
    `text_attention_mask`."""

    def __init__(self, feature_extractor: Any, tokenizer: Any):
        super().__init__(feature_extractor, tokenizer)

    def __call__(self, audio: Any = None, text: Any = None, sampling_rate: int | None = None,
                 return_tensors: str = "pt", max_length: int | None = None) -> dict:
        """audio: a 16 kHz mono waveform or a list of them; text: a transcript or a list of them;
        max_length: the most tokens per transcript (default: the tokenizer's own limit)."""
        if audio is None or text is None:
            raise ValueError("a fusion model needs both audio and text")
        inputs = dict(self.feature_extractor(audio, sampling_rate=sampling_rate, padding=True,
                                             return_attention_mask=True, return_tensors=return_tensors))
        tokens = self.tokenizer(text, padding=True, truncation=True, max_length=max_length,
                                return_tensors=return_tensors)
        inputs.update(input_ids=tokens["input_ids"], text_attention_mask=tokens["attention_mask"])
        return inputs
