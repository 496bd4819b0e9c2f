"""Real synthetic speech for the built-in corpus: espeak-ng speaks each utterance's words, with
arousal in the voice.

With `--speech espeak` (or `auto` where Debian's `espeak-ng` is installed), `emotrain synth` writes
its corpus through this module instead of the hand-made signal of `emotrain.data.synth`: the same release layout, the same words
(valence lives in them), and audio that is speech a listener would understand.

What carries arousal, relative to each speaker's own calm voice (high = angry, happy/excited):
- pitch: about 6 semitones higher (espeak's pitch setting, measured), with a wider pitch range
  (SSML `prosody range`), so wider accents;
- speaking rate: about 1.35x faster, with no extra gap between words (calm speech gets 0-40 ms);
- vocal effort: about 6 dB louder, and brighter (a high-shelf tilt of a few dB, as pressed voice has).
Every cue is drawn per utterance around its class's value, so each one alone overlaps between the
classes. Nothing else depends on the class: speakers (voice variant, pitch, tempo, recording gain
and microphone colour) are fixed per speaker; the lead-in and trailing silence, the distance to the
microphone (+-3 dB) and the background noise (SNR 25-40 dB) vary per utterance independently of
it. Female voices sit about 12 semitones above male ones (more than arousal moves a voice).

Lengths: the text is chosen for an IEMOCAP-shaped target duration (whole sentences until the
words would fill it at the utterance's rate), so durations do not differ by class much; the wav is
what espeak-ng spoke, plus the silences, padded to the corpus's length quantum.

Reproducible: the same seed gives the same text and settings; the audio is byte-identical for the
same espeak-ng version (the release's `emotrain_synth.json` records it).
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf
import soxr

ESPEAK = "espeak-ng"

# Voice variants of espeak-ng's en-us: five women and seven men (espeak-ng-data/voices/!v).
_VARIANTS = {"F": ("f1", "f2", "f3", "f4", "f5"), "M": ("m1", "m2", "m3", "m4", "m5", "m6", "m7")}
# espeak's pitch setting (0-99) of a calm voice: about 0.14 semitones per unit around 50.
_CALM_PITCH = {"F": 45.0, "M": 40.0}
_CALM_WPM = 150.0
_LEAD_S = (0.05, 0.35)
_SNR_DB = (25.0, 40.0)


@lru_cache(maxsize=1)
def espeak_version() -> str | None:
    """espeak-ng's version line ("eSpeak NG text-to-speech: 1.51 ..."), or None where it is not installed."""
    path = shutil.which(ESPEAK)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().split("  Data at:")[0] or None


@dataclass(frozen=True)
class Speaker:
    """One speaker's voice, none of it depending on arousal."""

    gender: str
    variant: str
    """espeak-ng's en-us voice variant (f1..f5, m1..m7)."""
    pitch: float
    """espeak pitch setting (0-99) of the speaker's calm voice."""
    tempo: float
    """Multiplies every speaking rate: some people talk faster."""
    gain_db: float
    """Recording level of the speaker's microphone (sessions were recorded at different levels)."""
    colour: float
    """The microphone's tilt (-1..1): a dull or a bright recording."""


def speaker(seed: int, session: int, gender: str) -> Speaker:
    rng = np.random.default_rng([seed, session, 0 if gender == "F" else 1, 104729])
    return Speaker(
        gender=gender,
        variant=str(rng.choice(_VARIANTS[gender])),
        pitch=float(np.clip(_CALM_PITCH[gender] + rng.normal(0.0, 5.0), 25.0, 60.0)),
        tempo=float(np.exp(rng.normal(0.0, 0.07))),
        gain_db=float(rng.normal(0.0, 3.0)),
        colour=float(rng.uniform(-1.0, 1.0)),
    )


@dataclass(frozen=True)
class Delivery:
    """How one utterance is spoken: where arousal enters the audio (see the module docstring)."""

    pitch: int  # espeak 0-99
    pitch_range: int  # SSML prosody range, percent of the voice's default
    words_per_minute: int
    word_gap: int  # espeak -g: extra pause between words, 10 ms units
    effort_db: float  # vocal effort: level over the speaker's calm level
    brightness_db: float  # high-shelf gain of pressed voice (dB above 2 kHz)


# Per arousal level: (median, spread) of each setting; spreads are standard deviations.
_DELIVERY = {
    0: {"pitch": (0.0, 6.0), "pitch_range": (70.0, 20.0), "wpm": (1.0, 0.08), "word_gap": (2.0, 1.2),
        "effort_db": (0.0, 2.0), "brightness_db": (0.0, 1.5)},
    1: {"pitch": (28.0, 6.0), "pitch_range": (150.0, 30.0), "wpm": (1.35, 0.08), "word_gap": (0.0, 0.5),
        "effort_db": (6.0, 2.0), "brightness_db": (4.0, 1.5)},
}  # fmt: skip


AROUSAL_CUES = ("pitch", "rate", "loudness", "brightness")
"""What carries arousal (all of them by default); fewer shows what a model hears of each alone."""
_CUE_SETTINGS = {"pitch": ("pitch", "pitch_range"), "rate": ("wpm", "word_gap"), "loudness": ("effort_db",),
                 "brightness": ("brightness_db",)}


def delivery(rng: np.random.Generator, arousal: int, who: Speaker,
             cues: tuple[str, ...] = AROUSAL_CUES) -> Delivery:
    """One utterance's settings around its arousal's medians; a cue left out of `cues` keeps the
    calm median whatever the arousal (its spread stays: only the difference between classes goes)."""
    d = dict(_DELIVERY[arousal])
    for cue in set(AROUSAL_CUES) - set(cues):
        for name in _CUE_SETTINGS[cue]:
            d[name] = (_DELIVERY[0][name][0], d[name][1])

    def draw(name: str) -> float:
        median, spread = d[name]
        return median + float(rng.normal(0.0, spread))

    return Delivery(
        pitch=int(np.clip(round(who.pitch + draw("pitch")), 0, 99)),
        pitch_range=int(np.clip(round(draw("pitch_range")), 20, 250)),
        words_per_minute=int(round(_CALM_WPM * who.tempo * d["wpm"][0] * math.exp(rng.normal(0.0, d["wpm"][1])))),
        word_gap=int(np.clip(round(draw("word_gap")), 0, 6)),
        effort_db=draw("effort_db"),
        brightness_db=draw("brightness_db"),
    )


def spoken_seconds(words: int, how: Delivery) -> float:
    """About how long espeak-ng takes to say `words` words this way, with the recording's silences
    (its rate setting is nominal: measured 1.06-1.12x 60/wpm per word with the clause pauses)."""
    return words * (1.08 * 60.0 / how.words_per_minute + 0.01 * how.word_gap) + sum(_LEAD_S)


def _ssml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def speak(text: str, who: Speaker, how: Delivery) -> tuple[np.ndarray, int]:
    """espeak-ng's rendering of `text` (float samples in [-1, 1], its sampling rate)."""
    ssml = f'<speak><prosody range="{how.pitch_range}%">{_ssml_escape(text)}</prosody></speak>'
    command = [ESPEAK, "-m", "-z", "-v", f"en-us+{who.variant}", "-p", str(how.pitch), "-s",
               str(how.words_per_minute), "-g", str(how.word_gap), "--stdout", ssml]
    try:
        wav = subprocess.run(command, capture_output=True, timeout=60, check=True).stdout
    except FileNotFoundError:
        raise RuntimeError(f"{ESPEAK} is not installed: apt-get install espeak-ng, or write the signal corpus "
                           "(emotrain synth --speech signal)") from None
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{ESPEAK} failed on {text!r}: {err.stderr.decode(errors='replace').strip()}") from None
    samples, rate = sf.read(io.BytesIO(wav), dtype="float64")
    return samples, rate


def _tilt(x: np.ndarray, sr: int, gain_db: float) -> np.ndarray:
    """A first-order high shelf: `gain_db` more above ~2 kHz (negative: duller)."""
    if abs(gain_db) < 1e-3:
        return x
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    shelf = 10.0 ** (gain_db / 20.0 * (freqs**2 / (freqs**2 + 2000.0**2)))
    return np.fft.irfft(spec * shelf, len(x))


def record(rng: np.random.Generator, speech: np.ndarray, source_rate: int, sr: int, step: int,
           who: Speaker, how: Delivery, min_samples: int) -> np.ndarray:
    """What the microphone wrote: `speech` resampled to `sr`, with vocal effort (level and
    brightness), the speaker's microphone, silence before and after, and background noise; its
    length a multiple of `step` and at least `min_samples`."""
    if source_rate != sr:
        speech = soxr.resample(speech, source_rate, sr, quality="HQ")
    speech = _tilt(speech, sr, how.brightness_db + 2.0 * who.colour)
    lead, trail = (int(rng.uniform(*_LEAD_S) * sr) for _ in range(2))
    n = max(lead + len(speech) + trail, min_samples)
    n = -(-n // step) * step
    x = np.zeros(n)
    x[lead:lead + len(speech)] = speech
    # Level: espeak speaks every utterance at about the same level; effort, the speaker's microphone
    # and the distance to it (per utterance) set what was recorded.
    voiced = speech[np.abs(speech) > 1e-4]
    rms = float(np.sqrt(np.mean(voiced**2))) if voiced.size else 1.0
    level_db = -24.0 + how.effort_db + who.gain_db + float(rng.normal(0.0, 1.5))
    x *= 10.0 ** (level_db / 20.0) / (rms + 1e-12)
    # Room and equipment noise at a level set by the microphone gain, not by the speech.
    size = 1 << (n - 1).bit_length()
    spec = np.fft.rfft(rng.standard_normal(size))
    spec /= np.maximum(np.fft.rfftfreq(size, 1.0 / sr), 50.0) ** 0.5
    noise = np.fft.irfft(spec, size)[:n]
    noise_db = -24.0 + who.gain_db - float(rng.uniform(*_SNR_DB))
    noise *= 10.0 ** (noise_db / 20.0) / (noise.std() + 1e-12)
    return np.clip(x + noise, -1.0, 1.0)
