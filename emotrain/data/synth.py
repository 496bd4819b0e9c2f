"""A learnable synthetic corpus written in the exact `IEMOCAP_full_release` layout.

IEMOCAP is licensed, so tests, demos and smoke runs use this instead. `synthesize_release(out_dir)`
writes `out_dir` AS the release root (out_dir plays `IEMOCAP_full_release/`):

    Session{1..5}/dialog/EmoEvaluation/<dialog>.txt        consensus labels (the real format)
    Session{1..5}/dialog/EmoEvaluation/Categorical/<dialog>_e{n}_cat.txt   per-annotator (ignore)
    Session{1..5}/dialog/EmoEvaluation/Attribute/<dialog>_e{n}_atr.txt     per-annotator (ignore)
    Session{1..5}/dialog/EmoEvaluation/Self-evaluation/<dialog>.txt        per-annotator (ignore)
    Session{1..5}/dialog/transcriptions/<dialog>.txt
    Session{1..5}/sentences/wav/<dialog>/<utterance>.wav   16 kHz mono PCM_16

Formats, one line each (TAB separated where the release uses tabs):

    % [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]                (EmoEvaluation header)
    [6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]
    C-E2:\tNeutral;\t()
    A-E3:\tval 3; act 2; dom  2;\t()
    Ses01F_impro01_F000 [006.2901-008.2357]: Well, it was really nice.    (transcriptions)
    Ses01F_impro01_MXX0 [009.1000-009.9000]: [BREATHING]                  (no label, no wav)

Every `end - start` equals the wav's duration exactly (sample counts are multiples of the
0.1 ms tick, so the 4-decimal times are exact).

What makes it learnable, and only jointly:
- arousal lives ONLY in the audio, and there ONLY in the prosody, as in speech: relative to the
  speaker's own calm voice, high-arousal classes (angry, happy/excited) are higher in pitch (about
  8 semitones; female voices sit about 11 above male ones, so a high-arousal man is often lower
  than a calm woman), with wider pitch accents and glides, faster (about 5 vs 3.2 syllables/s),
  with fewer and shorter silences between syllables and phrases, more uneven syllable loudness
  and sharper attacks; neutral and sad are lower, flatter, slower and more broken up. Every cue
  varies from utterance to utterance and shows in only a few syllables, so each alone overlaps
  between the classes (pitch the least, once the speaker's own level is known). Angry and happy
  audio are drawn from the same distribution, as are neutral and sad.
- the carrier is speech-like and its spectrum is NOT a cue: syllables are glottal pulse trains
  through a formant-filtered vocal tract with a random vowel each (often after a noise
  consonant), the vocal tract length and voice brightness vary by speaker, and the background
  level varies by utterance, all independently of the class. Loudness, brightness (a global
  spectral tilt) and signal-to-noise ratio do not differ between arousal levels; a random, frozen
  convolutional front end sees the syllable/pause rhythm but hardly the pitch, which it has to
  learn.
- valence lives ONLY in the words: happy and neutral draw from the same pleasant word lists, angry
  and sad from the same unpleasant ones; templates, punctuation, fillers and markers are shared.
- durations follow IEMOCAP's skewed (lognormal) shape and are the same for every class.
So audio alone separates {angry, happy} from {neutral, sad}, text alone {happy, neutral} from
{angry, sad}, and only the two together give the 4 classes.

Deterministic: the same arguments write byte-identical files. Beside the sessions, `emotrain_synth.json`
says what the tree is (generator and arguments), so that `emotrain prepare` and the report describe
it as this synthetic corpus, never as an IEMOCAP release.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from emotrain.config import SAMPLING_RATE
from emotrain.data import speech as speech_engine

CODE_TO_LABEL = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
"""The 4-class protocol (exc merges into happy)."""
FOUR_CLASS_CODES = tuple(CODE_TO_LABEL)
OTHER_CODES = ("xxx", "fru", "sur", "fea")
"""Codes outside the 4-class set that the corpus also holds (preparation must drop them)."""
OTHER_CODE_WEIGHTS = (0.45, 0.40, 0.10, 0.05)
OTHER_FRACTION = 0.25
"""Utterances with OTHER_CODES per session, as a share of `utterances_per_session` (on top)."""
HAP_SHARE = 0.4
"""Share of the happy class written as `hap` (the rest `exc`), as in IEMOCAP (595 vs 1,041)."""

LABELS = ("neutral", "happy", "sad", "angry")
AROUSAL = {"neutral": 0, "sad": 0, "happy": 1, "angry": 1}
"""1 = high arousal: carried by the audio only."""
VALENCE = {"neutral": 1, "happy": 1, "sad": 0, "angry": 0}
"""1 = pleasant: carried by the words only."""

_TICKS = 10_000
"""Times are written with 4 decimals: 1 tick = 0.1 ms."""

# Durations (seconds, before duration_scale): lognormal fitted to IEMOCAP's 4-class set
# (median 3.58 s, mean 4.55 s), clipped to [0.59, 34.1] s.
_DUR_MU = math.log(3.58)
_DUR_SIGMA = 0.66
_DUR_MIN, _DUR_MAX = 0.59, 34.1
MIN_SECONDS = 0.3
"""Floor on an utterance's duration after scaling."""

# ---------------------------------------------------------------------------------------------
# Dialogs
# ---------------------------------------------------------------------------------------------

_BASES = (
    "impro01", "script01_1", "impro02", "script01_2", "impro03", "script02_1", "impro04",
    "script02_2", "impro05", "script03_1", "impro06", "script03_2", "impro07", "script01_3",
    "impro08",
)  # fmt: skip
# a/b-suffixed dialogs (as in the real release); they are always among a session's dialogs.
_SPLIT_DIALOGS = {
    3: ("Ses03M_impro05a", "Ses03M_impro05b"),
    5: ("Ses05M_script01_1b",),
}
_UTTERANCES_PER_DIALOG = 12


def _dialog_names(session: int, count: int) -> list[str]:
    """`count` real-looking dialog names for a session, the a/b ones first, in release order."""
    split = list(_SPLIT_DIALOGS.get(session, ()))
    plain = [f"Ses{session:02d}{g}_{b}" for b in _BASES for g in "FM"]
    # a split dialog replaces its plain twin (Ses03M_impro05 -> 05a, 05b); 01_1b sits beside 01_1
    plain = [d for d in plain if not any(s[:-1] == d and s.endswith("a") for s in split)]
    chosen = (split + [d for d in plain if d not in split])[: max(1, count)]
    order = {d: i for i, d in enumerate(sorted(plain + split))}
    return sorted(chosen, key=order.__getitem__)


# ---------------------------------------------------------------------------------------------
# Text: valence only
# ---------------------------------------------------------------------------------------------

_POS_ADJ = (
    "good", "great", "nice", "wonderful", "lovely", "beautiful", "perfect", "amazing", "excellent",
    "sweet", "awesome", "fantastic",
)  # fmt: skip
_NEG_ADJ = (
    "bad", "terrible", "awful", "horrible", "wrong", "ugly", "stupid", "useless", "cruel",
    "miserable", "nasty", "ridiculous",
)  # fmt: skip
_POS_NOUN = ("gift", "joy", "blast", "success", "pleasure", "dream", "blessing", "miracle", "relief")
_NEG_NOUN = ("mess", "problem", "disaster", "mistake", "failure", "nightmare", "joke", "pain", "lie")
_POS_VERB = ("love", "like", "enjoy", "appreciate", "adored")
_NEG_VERB = ("hate", "dislike", "regret", "blame", "hated")
_POS_SUP = ("best", "greatest", "finest")
_NEG_SUP = ("worst", "lowest", "darkest")
WORDS = {
    1: {"adj": _POS_ADJ, "vnoun": _POS_NOUN, "verb": _POS_VERB, "sup": _POS_SUP},
    0: {"adj": _NEG_ADJ, "vnoun": _NEG_NOUN, "verb": _NEG_VERB, "sup": _NEG_SUP},
}
"""Valence-bearing word lists: 1 = pleasant (happy AND neutral), 0 = unpleasant (angry AND sad)."""

_NOUN = (
    "day", "house", "car", "job", "dinner", "trip", "weekend", "family", "idea", "news", "movie",
    "party", "school", "money", "work", "plan", "city", "friend", "letter", "phone", "story",
    "game", "room", "office", "morning", "wedding", "apartment", "class", "meeting", "test",
    "book", "song", "garden", "kitchen", "team", "boss", "teacher", "brother", "sister", "mother",
    "father", "baby", "dog", "neighbor", "flight", "hotel", "restaurant", "beach", "interview",
)  # fmt: skip
_INT = ("really", "so", "very", "pretty", "quite", "just", "truly", "totally")
_PERIOD = ("week", "day", "morning", "year", "night", "month", "evening")
_FILLERS = ("Well, ", "Yeah, ", "Oh, ", "Okay, ", "You know, ", "I mean, ", "Look, ", "Listen, ")
_SUFFIXES = (" Right?", " I mean it.", " Seriously.", " You know?", " Honestly.")
_MARKERS = ("[LAUGHTER]", "[BREATHING]", "[GARBAGE]")
_XX_TEXTS = ("[BREATHING]", "Yeah.", "Okay.", "Hmm.", "Right.", "[LAUGHTER]", "Uh-huh.", "What?")

_TEMPLATES = (
    "that was a {adj} {noun}.",
    "i {verb} this {noun}, it is {adj}.",
    "it was {int} {adj}.",
    "the {noun} is {adj} today.",
    "what a {adj} {noun}.",
    "this whole {noun} is a {adj} {vnoun}.",
    "i think the {noun} was {adj} and {adj2}.",
    "we had such a {adj} time at the {noun}.",
    "i can't believe how {adj} the {noun} was.",
    "it's {int} {adj}, isn't it?",
    "my {noun} has been {adj} all {period}.",
    "she said the {noun} looked {adj}.",
    "you know what, i {verb} the {adj} {noun}.",
    "honestly, the {noun} was a {vnoun}.",
    "that's {int} {adj}.",
    "the {noun} and the {noun2} were both {adj}.",
    "do you {verb} the new {noun}?",
    "he told me the {noun} was {int} {adj}.",
    "it is the {sup} {noun} i have ever had.",
    "everything about this {noun} is {adj}.",
    "why is the {noun} so {adj}?",
    "i just {verb} it.",
    "a {vnoun}, that's what it is.",
    "the way you talked about the {noun} was {adj}.",
    "after the {noun} last {period}, i felt {adj}.",
    "this {period} was a {adj} {vnoun} from start to finish.",
)
_PLAIN_TEMPLATES = (
    "i was at the {noun} this {period}.",
    "we talked about the {noun} and the {noun2}.",
    "did you see the {noun}?",
    "tell me about your {noun}.",
    "she went to the {noun} last {period}.",
)
"""Templates with no valence-bearing word (a small share of every class): ambiguity, as in speech."""
_PLAIN_SHARE = 0.05


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _sentence(rng: np.random.Generator, valence: int) -> str:
    """A 3-12 word transcript whose only class information is its valence."""
    words = WORDS[valence]
    while True:
        plain = rng.random() < _PLAIN_SHARE
        template = _pick(rng, _PLAIN_TEMPLATES if plain else _TEMPLATES)
        adj = _pick(rng, words["adj"])
        adj2 = _pick(rng, tuple(w for w in words["adj"] if w != adj))
        noun = _pick(rng, _NOUN)
        noun2 = _pick(rng, tuple(w for w in _NOUN if w != noun))
        text = template.format(
            adj=adj, adj2=adj2, noun=noun, noun2=noun2, vnoun=_pick(rng, words["vnoun"]),
            verb=_pick(rng, words["verb"]), sup=_pick(rng, words["sup"]), int=_pick(rng, _INT),
            period=_pick(rng, _PERIOD),
        )  # fmt: skip
        text = re.sub(r"\b([Aa]) (?=[aeio]|u(?!s|ni))", r"\1n ", text)  # "a awful" -> "an awful"
        text = " ".join("I" if w == "i" else w for w in text.split())
        if rng.random() < 0.3:
            text = _pick(rng, _FILLERS) + text
        else:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.1 and text.endswith("."):
            text = text[:-1] + "!"
        if rng.random() < 0.15:
            text += _pick(rng, _SUFFIXES)
        if 3 <= len(text.split()) <= 12:
            break
    if rng.random() < 0.1:  # IEMOCAP-style markers, the same share in every class
        marker = _pick(rng, _MARKERS)
        text = f"{marker} {text}" if rng.random() < 0.5 else f"{text} {marker}"
    return text


# ---------------------------------------------------------------------------------------------
# Audio: arousal only, and only in the prosody
# ---------------------------------------------------------------------------------------------

# Vowel formants F1-F3 (Hz) of an adult male voice (Hillenbrand et al. 1995, rounded); a
# speaker's vocal tract scales them. Every syllable draws its vowel, whatever the class.
_VOWELS = np.array(
    [
        (342, 2322, 3000), (427, 2034, 2684), (476, 2089, 2691), (580, 1799, 2605),
        (588, 1952, 2601), (768, 1333, 2522), (652, 997, 2538), (497, 910, 2459),
        (469, 1122, 2434), (378, 997, 2343), (623, 1200, 2550), (474, 1379, 1710),
    ],
    dtype=float,
)  # fmt: skip
_F4 = 3500.0
_BANDWIDTHS = (80.0, 100.0, 150.0, 220.0)
_N_FFT = 1024
"""Length of a vocal-tract impulse response (64 ms: the narrowest resonance has decayed by then)."""
# Onset/coda consonants: (kind, centre Hz, bandwidth Hz). Noise bands like s, sh, f, h, and a burst.
_CONSONANTS = (
    ("fric", 6000.0, 3000.0), ("fric", 3200.0, 1400.0), ("fric", 4500.0, 7000.0),
    ("aspir", 0.0, 0.0), ("burst", 2500.0, 4000.0), ("burst", 1500.0, 2500.0),
)  # fmt: skip
_ONSET_PROB = 0.6
"""Share of syllables that start with a noise consonant (a coda takes some of the others)."""
_CODA_PROB = 0.15
_SNR_DB = (28.0, 40.0)
"""Speech-to-background level (dB), the same range for every class."""
_LEAD_S = (0.02, 0.08)
"""Silence before the first and after the last syllable (seconds)."""


@dataclass(frozen=True)
class _Voice:
    """A speaker's traits, none of which depends on arousal: the pitch (Hz) the speaker's calm speech
    sits at, vocal-tract length (a formant scale), tempo, glottal brightness and breathiness.
    Female voices sit ~11 semitones above male ones, more than arousal moves a voice (~8)."""

    f0: float
    formant_scale: float
    rate: float
    brightness: float
    breathiness: float


_VOICE_F0 = {"F": 210.0, "M": 112.0}
"""Median calm pitch (Hz) of female and male speakers; each speaker varies around it."""
_VOICE_FORMANT_SCALE = {"F": 1.16, "M": 1.0}


def _voice(seed: int, session: int, gender: str) -> _Voice:
    rng = np.random.default_rng([seed, session, 0 if gender == "F" else 1, 7919])
    return _Voice(
        f0=_VOICE_F0[gender] * float(np.exp(rng.normal(0.0, 0.08))),
        formant_scale=_VOICE_FORMANT_SCALE[gender] * float(np.exp(rng.normal(0.0, 0.04))),
        rate=float(np.exp(rng.normal(0.0, 0.08))),
        brightness=float(rng.uniform(0.0, 1.0)),
        breathiness=float(rng.uniform(0.02, 0.12)),
    )


@dataclass(frozen=True)
class _Prosody:
    """How a voice is used in one utterance: the only place arousal enters the audio.

    pitch_key: semitones above the speaker's calm pitch; pitch_range: size of pitch accents and
    glides (semitones); rate: syllables per second; gap: share of each syllable's slot left
    silent before the next; pause_prob / pause_s: phrase breaks after a syllable (probability,
    seconds); prominence: spread of syllable loudness (dB); attack_s: how fast a syllable reaches
    its peak. (The tiny Wav2Vec2 layer-normalises every 20 ms frame, which leaves it little of the
    loudness cues; they are there for real encoders.)
    """

    pitch_key: float
    pitch_range: float
    rate: float
    gap: float
    pause_prob: float
    pause_s: float
    prominence: float
    attack_s: float


# Per arousal level: (class median, utterance-to-utterance spread) of each prosodic trait; spreads
# are standard deviations (semitones for pitch_key, of the log elsewhere).
_AROUSAL_PROSODY = {
    0: {"pitch_key": (0.0, 1.0), "pitch_range": (1.2, 0.3), "rate": (3.2, 0.08), "gap": (0.36, 0.12),
        "pause_prob": (0.18, 0.4), "pause_s": (0.3, 0.3), "prominence": (2.5, 0.3), "attack_s": (0.04, 0.4)},
    1: {"pitch_key": (8.0, 1.0), "pitch_range": (3.0, 0.3), "rate": (5.0, 0.08), "gap": (0.04, 0.12),
        "pause_prob": (0.03, 0.4), "pause_s": (0.18, 0.3), "prominence": (5.0, 0.3), "attack_s": (0.012, 0.4)},
}  # fmt: skip


def _prosody(rng: np.random.Generator, arousal: int, voice: _Voice) -> _Prosody:
    """One utterance's prosody: each trait drawn around its class median (a speaker's tempo scales
    the rate). What a listener gets is a few syllables' worth of each, which is where the overlap
    between the classes comes from."""
    traits = {}
    for name, (median, spread) in _AROUSAL_PROSODY[arousal].items():
        z = float(rng.normal(0.0, spread))
        traits[name] = median + z if name == "pitch_key" else median * math.exp(z)
    traits["rate"] *= voice.rate
    return _Prosody(**traits)


def _band(freqs: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((freqs - centre) / (0.5 * width)) ** 2)


def _vocal_tract(formants: np.ndarray, sr: int, brightness: float) -> np.ndarray:
    """Impulse response of an all-pole formant cascade times a glottal spectral tilt (causal)."""
    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / sr)
    z1 = np.exp(-2j * np.pi * freqs / sr)
    h = np.ones_like(z1)
    for f, bw in zip(formants, _BANDWIDTHS):
        if f >= 0.45 * sr:
            continue
        r = math.exp(-math.pi * bw / sr)
        c = 2.0 * r * math.cos(2.0 * math.pi * f / sr)
        h /= (1.0 - c * z1 + r * r * z1 * z1) / (1.0 - c + r * r)  # unit gain at 0 Hz
    corner = 300.0 + 900.0 * brightness  # glottal roll-off: -12 dB/octave above the corner
    h /= 1.0 + (freqs / corner) ** 2
    h *= np.minimum(freqs / 150.0, 1.0)  # radiation: no DC
    ir = np.fft.irfft(h, _N_FFT)
    return ir / (np.abs(ir).max() + 1e-12)


def _convolve(x: np.ndarray, ir: np.ndarray) -> np.ndarray:
    m = len(x) + len(ir) - 1
    size = 1 << (m - 1).bit_length()
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[:m]


def _consonant(rng: np.random.Generator, m: int, sr: int, ir: np.ndarray) -> np.ndarray:
    """`m` samples of a noise consonant: a fricative band, aspiration (noise through the next
    vowel's tract) or a plosive burst. Drawn the same way for every class."""
    kind, centre, width = _CONSONANTS[int(rng.integers(len(_CONSONANTS)))]
    noise = rng.standard_normal(m)
    if kind == "aspir":
        out = _convolve(noise, ir)[:m]
        out *= 0.5 / (np.abs(out).max() + 1e-12)
    else:
        size = 1 << (m - 1).bit_length()
        spec = np.fft.rfft(noise, size)
        spec *= _band(np.fft.rfftfreq(size, 1.0 / sr), centre * float(np.exp(rng.normal(0.0, 0.1))), width)
        out = np.fft.irfft(spec, size)[:m]
        out *= float(rng.uniform(0.25, 0.6)) / (np.abs(out).max() + 1e-12)
    t = np.arange(m) / m
    if kind == "burst":
        shape = np.exp(-t * 6.0)
        shape[: max(1, m // 20)] *= np.linspace(0.0, 1.0, max(1, m // 20))
    else:
        shape = np.sin(np.pi * t) ** 0.7
    return out * shape


def _synth_audio(rng: np.random.Generator, n: int, sr: int, arousal: int, voice: _Voice) -> np.ndarray:
    """`n` samples of speech-like sound from the voice: syllables (glottal pulses through a
    formant-filtered vocal tract, a random vowel each, often after a noise consonant) separated by
    short gaps and phrase pauses, over faint background noise. Arousal sets the prosody only (pitch
    key and range, rate, pauses, loudness spread, attacks); the spectrum's shape comes from the
    speaker, the vowels and consonants. Depends on arousal, never valence."""
    rng = np.random.default_rng(int(rng.integers(2**63)))  # one draw of the caller's stream
    p = _prosody(rng, arousal, voice)
    x = np.zeros(n)
    lead = min(int(rng.uniform(*_LEAD_S) * sr), n // 6)
    end = n - min(int(rng.uniform(*_LEAD_S) * sr), n // 6)
    syllable = sr / p.rate
    min_len = int(0.06 * sr)
    pos = lead
    t_total = max(end - lead, 1)
    while pos < end - min_len:
        stressed = rng.random() < 0.35
        slot = int(syllable * float(np.exp(rng.normal(0.0, 0.25))) * (1.3 if stressed else 1.0))
        if end - pos - slot < min_len:  # the last syllable takes what is left: no silent tail
            slot = end - pos
        vowel = _VOWELS[int(rng.integers(len(_VOWELS)))] * voice.formant_scale
        formants = np.append(vowel * np.exp(rng.normal(0.0, 0.05, 3)), _F4 * voice.formant_scale)
        ir = _vocal_tract(formants, sr, voice.brightness)
        cons = int(slot * rng.uniform(0.15, 0.35)) if rng.random() < _ONSET_PROB else 0
        gap = int(slot * min(0.6, p.gap * float(np.exp(rng.normal(0.0, 0.3)))))
        m = slot - cons - gap
        if cons:
            x[pos : pos + cons] += _consonant(rng, cons, sr, ir)
        start = pos + cons
        # pitch (semitones over the speaker's calm pitch): key, declination, accent, glide
        here = (start - lead) / t_total
        accent = abs(rng.normal(0.0, 1.0)) * p.pitch_range * (1.0 if stressed else 0.3)
        glide = rng.normal(0.0, 0.6) * p.pitch_range
        st = p.pitch_key - 2.0 * here + accent + glide * np.linspace(-0.5, 0.5, m)
        f0 = np.clip(voice.f0 * 2.0 ** (st / 12.0), 60.0, 500.0)
        f0 *= 1.0 + 0.01 * rng.standard_normal(m).cumsum() / np.sqrt(np.arange(1, m + 1))  # jitter
        # glottal pulses where the phase wraps, plus aspiration noise
        phase = np.cumsum(f0) / sr + rng.uniform(0.0, 1.0)
        source = np.zeros(m)
        source[1:][np.diff(np.floor(phase)) > 0] = 1.0
        source += voice.breathiness * 0.3 * rng.standard_normal(m)
        # loudness: stress and a random prominence (dB); raised-cosine attack, decaying release
        gain_db = (4.0 if stressed else 0.0) + rng.normal(0.0, 1.0) * p.prominence
        env = np.ones(m) * 10.0 ** (gain_db / 20.0)
        a = max(2, min(int(p.attack_s * sr), int(0.45 * m)))
        r = max(2, int(0.35 * m))
        env[:a] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / a)
        env[m - r :] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(r) / r)
        env *= np.linspace(1.0, 0.7, m)
        voiced = _convolve(source * env, ir)[: end - start]
        x[start : start + len(voiced)] += voiced
        if rng.random() < _CODA_PROB and cons == 0 and gap > 16:  # a coda consonant in the gap
            x[start + m : start + m + gap] += 0.5 * _consonant(rng, gap, sr, ir)
        pos += slot
        if rng.random() < p.pause_prob:  # a phrase break, unless too near the end to speak again
            pause = int(p.pause_s * float(np.exp(rng.normal(0.0, 0.3))) * sr)
            if pos + pause < end - 2 * min_len:
                pos += pause
    speech = x[np.abs(x) > 0]
    rms = float(np.sqrt(np.mean(speech**2))) if speech.size else 1.0
    level = float(np.exp(rng.uniform(np.log(0.05), np.log(0.12))))
    x *= level / (rms + 1e-12)
    # background: brownish noise at a random level below the speech (independent of the class)
    size = 1 << (n - 1).bit_length()  # a power of two: FFTs of arbitrary lengths can be slow
    spec = np.fft.rfft(rng.standard_normal(size))
    spec /= np.maximum(np.fft.rfftfreq(size, 1.0 / sr), 50.0) ** 0.5
    noise = np.fft.irfft(spec, size)[:n]
    snr_db = float(rng.uniform(*_SNR_DB))
    noise *= level * 10.0 ** (-snr_db / 20.0) / (noise.std() + 1e-12)
    return np.clip(x + noise, -1.0, 1.0)


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(x * 32767.0).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

_CATEGORY_NAME = {
    "neu": "Neutral", "hap": "Happiness", "exc": "Excited", "sad": "Sadness", "ang": "Anger",
    "fru": "Frustration", "sur": "Surprise", "fea": "Fear",
}  # fmt: skip
# mean annotator ratings (valence, activation, dominance) on IEMOCAP's 1-5 scales
_VAD_MEAN = {
    "neu": (3.0, 2.4, 2.6), "hap": (4.0, 3.4, 3.1), "exc": (4.0, 3.8, 3.4),
    "sad": (2.0, 2.1, 2.1), "ang": (1.8, 4.0, 4.0), "fru": (2.0, 3.4, 3.4),
    "sur": (3.4, 3.8, 3.0), "fea": (2.0, 3.4, 2.1), "xxx": (2.8, 3.0, 3.0),
}  # fmt: skip


def _other_arousal_valence(rng: np.random.Generator, code: str) -> tuple[int, int]:
    if code == "fru":
        return int(rng.random() < 0.5), 0
    if code == "sur":
        return 1, 1
    if code == "fea":
        return 1, 0
    return int(rng.random() < 0.5), int(rng.random() < 0.5)  # xxx: no majority


def _annotations(rng: np.random.Generator, code: str, speaker: str) -> tuple[tuple[float, float, float], list[str]]:
    """Consensus (v, a, d) and the annotator lines of one utterance block."""
    lines = []
    evaluators = sorted(rng.choice([1, 2, 3, 4], size=3, replace=False).tolist())
    names = list(_CATEGORY_NAME.values())
    if code == "xxx":
        cats = [str(c) for c in rng.choice(names, size=3, replace=False)]
    else:
        cats = [_CATEGORY_NAME[code]] * 3
        if rng.random() < 0.5:  # a 2-of-3 majority
            others = [c for c in names if c != _CATEGORY_NAME[code]]
            cats[int(rng.integers(3))] = _pick(rng, tuple(others))
    for e, c in zip(evaluators, cats):
        lines.append(f"C-E{e}:\t{c};\t()")
    self_eval = rng.random() < 0.5
    if self_eval:
        lines.append(f"C-{speaker}1:\t{_pick(rng, tuple(names)) if code == 'xxx' else _CATEGORY_NAME[code]};\t()")
    n_attr = int(rng.integers(2, 4))
    ratings = []
    for e in sorted(rng.choice([1, 2, 3, 4], size=n_attr, replace=False).tolist()):
        v, a, d = (int(np.clip(round(m + rng.normal(0.0, 0.5)), 1, 5)) for m in _VAD_MEAN[code])
        ratings.append((v, a, d))
        lines.append(f"A-E{e}:\tval {v}; act {a}; dom  {d};\t()")
    if self_eval:
        v, a, d = (int(np.clip(round(m + rng.normal(0.0, 0.5)), 1, 5)) for m in _VAD_MEAN[code])
        lines.append(f"A-{speaker}1:\tval {v}; act {a}; dom  {d};\t()")
    vad = tuple(float(np.mean([r[i] for r in ratings])) for i in range(3))
    return vad, lines  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The release
# ---------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    id: str
    start: int  # ticks
    end: int
    text: str
    code: str | None = None  # None: an unlabelled XX line
    vad: tuple[float, float, float] = (0.0, 0.0, 0.0)
    annotator_lines: list[str] = field(default_factory=list)


def _fmt_eval_time(t: int) -> str:
    return f"{t // _TICKS}.{t % _TICKS:04d}"


def _fmt_transcript_time(t: int) -> str:
    return f"{t // _TICKS:03d}.{t % _TICKS:04d}"


def _class_counts(n: int, session: int) -> dict[str, int]:
    """`n` 4-class utterances split evenly; the remainder rotates with the session."""
    counts = {label: n // 4 for label in LABELS}
    for i in range(n % 4):
        counts[LABELS[(session - 1 + i) % 4]] += 1
    return counts


def synthesize_release(
    out_dir: str | Path,
    *,
    seed: int = 0,
    utterances_per_session: int = 60,
    duration_scale: float = 1.0,
    sampling_rate: int = SAMPLING_RATE,
    overwrite: bool = False,
    speech: str = "signal",
    arousal_cues: tuple[str, ...] = speech_engine.AROUSAL_CUES,
) -> dict[str, Any]:
    """Write a synthetic IEMOCAP release into `out_dir` (which plays `IEMOCAP_full_release/`).

    `speech`: "espeak" speaks every utterance's words with espeak-ng (`emotrain.data.speech`: real
    synthetic speech, arousal in the voice), "signal" writes this module's hand-made speech-like
    signal, "auto" takes espeak where espeak-ng is installed and the signal otherwise (the summary's
    `speech` says which). `arousal_cues`: what carries arousal in espeak speech (pitch, rate,
    loudness, brightness; all by default): fewer show what a model hears of each cue alone.

    `utterances_per_session` counts the 4-class utterances (neu/hap/exc/sad/ang, balanced over
    neutral/happy/sad/angry); `round(0.25 * utterances_per_session)` utterances with other codes
    (xxx, fru, sur, fea) come on top. Durations are IEMOCAP-shaped times `duration_scale`, at least
    0.3 s. Raises FileExistsError when `out_dir` already holds a Session folder, unless `overwrite`
    (which replaces the Session1..5 folders only).

    Returns a summary: per session the counts of each code (`codes`) and of each 4-class label
    (`labels`), totals of wav files and seconds, dialogs and unlabelled XX lines.
    """
    if utterances_per_session < 1:
        raise ValueError(f"utterances_per_session must be >= 1, got {utterances_per_session}")
    if not duration_scale > 0:
        raise ValueError(f"duration_scale must be > 0, got {duration_scale}")
    if sampling_rate < 1000:
        raise ValueError(f"sampling_rate must be >= 1000, got {sampling_rate}")
    if speech not in SPEECH_CHOICES:
        raise ValueError(f"speech must be one of {', '.join(SPEECH_CHOICES)}, got {speech!r}")
    espeak = speech_engine.espeak_version()
    if speech == "espeak" and espeak is None:
        raise RuntimeError(f"{speech_engine.ESPEAK} is not installed: apt-get install espeak-ng, or "
                           "speech='signal' for the hand-made signal")
    speech = ("espeak" if espeak else "signal") if speech == "auto" else speech
    unknown = set(arousal_cues) - set(speech_engine.AROUSAL_CUES)
    if unknown or not arousal_cues:
        raise ValueError(f"arousal_cues must be some of {', '.join(speech_engine.AROUSAL_CUES)}, got {list(arousal_cues)}")
    root = Path(out_dir)
    _clear_sessions(root, overwrite)
    audio = _AudioSettings(
        sampling_rate=sampling_rate,
        step=sampling_rate // math.gcd(sampling_rate, _TICKS),
        duration_scale=duration_scale,
        voices={(k, g): _voice(seed, k, g) for k in range(1, 6) for g in "FM"},
        speakers={(k, g): speech_engine.speaker(seed, k, g) for k in range(1, 6) for g in "FM"}
        if speech == "espeak" else {},
        arousal_cues=tuple(arousal_cues),
    )
    tally = _Tally()
    for session in range(1, 6):
        _synthesize_session(np.random.default_rng([seed, session]), root, session, utterances_per_session, audio,
                            tally)
    engine = {"speech": speech}
    if speech == "espeak":
        engine.update(espeak_ng=espeak, arousal_cues=list(arousal_cues))
    write_synth_marker(root, {"seed": seed, "utterances_per_session": utterances_per_session,
                              "duration_scale": duration_scale, "sampling_rate": sampling_rate, **engine})
    return {"root": str(root), "seed": seed, "sampling_rate": sampling_rate, **engine, **tally.summary()}


SPEECH_CHOICES = ("auto", "espeak", "signal")


SYNTH_MARKER = "emotrain_synth.json"
"""Written at the root of a synthetic release: what generated it, with which arguments."""


def write_synth_marker(root: Path, arguments: dict[str, Any]) -> None:
    audio = ("template sentences spoken by espeak-ng" if arguments.get("speech") == "espeak"
             else "generated speech-like signals and template sentences")
    marker = {"generator": "emotrain synth", **arguments,
              "description": f"{audio} in the IEMOCAP release layout; not IEMOCAP recordings"}
    (root / SYNTH_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def read_synth_marker(root: str | Path) -> dict[str, Any] | None:
    """The generator's record at a release root, or None where the tree was not written by `emotrain synth`."""
    path = Path(root) / SYNTH_MARKER
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}): rerun emotrain synth") from None


def _clear_sessions(root: Path, overwrite: bool) -> None:
    """Make `root` a folder without Session1..5: remove them when `overwrite`, else refuse them."""
    existing = [root / f"Session{k}" for k in range(1, 6) if (root / f"Session{k}").exists()]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{existing[0]} exists (pass overwrite=True to replace Session1..5)")
        for path in existing:
            shutil.rmtree(path)
    root.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class _AudioSettings:
    """How every utterance's audio is made: its rate, its length quantum and the speakers' voices."""

    sampling_rate: int
    step: int
    """Samples in a whole number of ticks: lengths are multiples of it, so the 4-decimal times are exact."""
    duration_scale: float
    voices: dict[tuple[int, str], _Voice]
    """(session, "F" or "M") → the voice of the hand-made signal."""
    speakers: dict[tuple[int, str], speech_engine.Speaker]
    """(session, "F" or "M") → the espeak-ng speaker; empty when the corpus is the hand-made signal."""
    arousal_cues: tuple[str, ...] = speech_engine.AROUSAL_CUES


@dataclass
class _Tally:
    """What has been written, counted as it is (the summary `synthesize_release` returns)."""

    codes: dict[int, dict[str, int]] = field(default_factory=dict)
    labels: dict[int, dict[str, int]] = field(default_factory=dict)
    utterances: int = 0
    four_class_utterances: int = 0
    seconds: float = 0.0
    four_class_seconds: float = 0.0
    dialogs: int = 0
    xx_lines: int = 0

    def start_session(self, session: int) -> None:
        self.codes[session] = {c: 0 for c in FOUR_CLASS_CODES + OTHER_CODES}
        self.labels[session] = {label: 0 for label in LABELS}

    def add_utterance(self, session: int, code: str, seconds: float) -> None:
        self.codes[session][code] += 1
        self.utterances += 1
        self.seconds += seconds
        if code in CODE_TO_LABEL:
            self.labels[session][CODE_TO_LABEL[code]] += 1
            self.four_class_utterances += 1
            self.four_class_seconds += seconds

    def summary(self) -> dict[str, Any]:
        return {"codes": self.codes, "labels": self.labels, "utterances": self.utterances,
                "four_class_utterances": self.four_class_utterances, "seconds": round(self.seconds, 4),
                "four_class_seconds": round(self.four_class_seconds, 4), "dialogs": self.dialogs,
                "xx_lines": self.xx_lines}


def _session_codes(rng: np.random.Generator, utterances_per_session: int, session: int) -> list[str]:
    """The emotion codes of one session's utterances, shuffled: the balanced 4-class ones (happy
    split between hap and exc) and the others on top."""
    counts = _class_counts(utterances_per_session, session)
    n_hap = int(round(HAP_SHARE * counts["happy"]))
    codes = (
        ["neu"] * counts["neutral"] + ["hap"] * n_hap + ["exc"] * (counts["happy"] - n_hap)
        + ["sad"] * counts["sad"] + ["ang"] * counts["angry"]
    )  # fmt: skip
    n_other = int(round(OTHER_FRACTION * utterances_per_session))
    codes += [str(c) for c in rng.choice(OTHER_CODES, size=n_other, p=OTHER_CODE_WEIGHTS)]
    return [codes[i] for i in rng.permutation(len(codes))]


def _synthesize_session(rng: np.random.Generator, root: Path, session: int, utterances_per_session: int,
                        audio: _AudioSettings, tally: _Tally) -> None:
    """`Session<k>/`: its utterances shared out over dialogs, each dialog's wavs and text files."""
    codes = _session_codes(rng, utterances_per_session, session)
    n_dialogs = max(1, min(math.ceil(len(codes) / _UTTERANCES_PER_DIALOG), len(codes) // 2, 30))
    dialogs = _dialog_names(session, n_dialogs)
    session_dir = root / f"Session{session}"
    eval_dir = session_dir / "dialog" / "EmoEvaluation"
    trans_dir = session_dir / "dialog" / "transcriptions"
    for d in (eval_dir / "Categorical", eval_dir / "Attribute", eval_dir / "Self-evaluation", trans_dir):
        d.mkdir(parents=True, exist_ok=True)
    tally.start_session(session)
    for d_index, (dialog, chunk) in enumerate(zip(dialogs, np.array_split(np.array(codes), len(dialogs)))):
        wav_dir = session_dir / "sentences" / "wav" / dialog
        wav_dir.mkdir(parents=True, exist_ok=True)
        turns = _synthesize_dialog(rng, session, dialog, [str(c) for c in chunk], wav_dir, audio, tally,
                                   first_of_session=d_index == 0)
        _write_dialog(eval_dir, trans_dir, dialog, turns)
        tally.dialogs += 1


def _turn_speakers(rng: np.random.Generator, count: int) -> list[str]:
    """Who speaks each labelled turn: alternating, sometimes the same speaker again; both speakers
    always speak when the dialog has 2+ turns."""
    speakers = [str(rng.choice(["F", "M"]))]
    for _ in range(count - 1):
        other = "M" if speakers[-1] == "F" else "F"
        speakers.append(speakers[-1] if (len(speakers) > 1 and rng.random() < 0.25) else other)
    return speakers


def _synthesize_dialog(rng: np.random.Generator, session: int, dialog: str, codes: list[str], wav_dir: Path,
                       audio: _AudioSettings, tally: _Tally, *, first_of_session: bool) -> list[_Turn]:
    """One dialog's turns in time order, each labelled one's wav written to `wav_dir`, with
    unlabelled XX lines between them (at least one in the first dialog of each session)."""
    speakers = _turn_speakers(rng, len(codes))
    n_xx = int(rng.integers(0, 3)) + (1 if first_of_session else 0)
    xx_after = sorted(rng.integers(0, len(codes), size=n_xx).tolist())
    turns: list[_Turn] = []
    counters = {"F": 0, "M": 0}
    xx_counters = {"F": 0, "M": 0}
    t = int(rng.uniform(1.0, 8.0) * _TICKS)
    for i, (code, spk) in enumerate(zip(codes, speakers)):
        utt_id = f"{dialog}_{spk}{counters[spk]:03d}"
        counters[spk] += 1
        turn, seconds = _labelled_turn(rng, utt_id, code, spk, t, wav_dir, audio, session)
        turns.append(turn)
        t = turn.end + int(rng.uniform(0.1, 1.5) * _TICKS)
        tally.add_utterance(session, code, seconds)
        for _ in range(xx_after.count(i)):
            xs = str(rng.choice(["F", "M"]))
            xx_len = int(rng.uniform(0.3, 1.5) * _TICKS)
            xx_id = f"{dialog}_{xs}XX{xx_counters[xs]}"
            xx_counters[xs] += 1
            turns.append(_Turn(xx_id, t, t + xx_len, _pick(rng, _XX_TEXTS)))
            t += xx_len + int(rng.uniform(0.1, 1.0) * _TICKS)
            tally.xx_lines += 1
    return turns


def _labelled_turn(rng: np.random.Generator, utt_id: str, code: str, speaker: str, start: int, wav_dir: Path,
                   audio: _AudioSettings, session: int) -> tuple[_Turn, float]:
    """(the turn, its seconds) of one labelled utterance starting at tick `start`: its IEMOCAP-shaped
    duration, its wav (prosody from the code's arousal) written, its annotations and sentence."""
    sr = audio.sampling_rate
    seconds_raw = float(np.clip(rng.lognormal(_DUR_MU, _DUR_SIGMA), _DUR_MIN, _DUR_MAX))
    duration = max(seconds_raw * audio.duration_scale, MIN_SECONDS)
    n = max(audio.step, int(round(duration * sr / audio.step)) * audio.step)
    if code in CODE_TO_LABEL:
        label = CODE_TO_LABEL[code]
        arousal, valence = AROUSAL[label], VALENCE[label]
    else:
        arousal, valence = _other_arousal_valence(rng, code)
    if audio.speakers:
        text, samples = _spoken(rng, duration, arousal, valence, audio, audio.speakers[(session, speaker)])
        vad, lines = _annotations(rng, code, speaker)
    else:
        samples = _synth_audio(rng, n, sr, arousal, audio.voices[(session, speaker)])
        vad, lines = _annotations(rng, code, speaker)
        text = _sentence(rng, valence)
    n = len(samples)
    sf.write(wav_dir / f"{utt_id}.wav", _to_pcm16(samples), sr, subtype="PCM_16", format="WAV")
    end = start + n * _TICKS // sr
    return _Turn(utt_id, start, end, text, code, vad, lines), n / sr


_MAX_SENTENCES = 8


def _spoken(rng: np.random.Generator, seconds: float, arousal: int, valence: int, audio: _AudioSettings,
            who: speech_engine.Speaker) -> tuple[str, np.ndarray]:
    """(transcript, samples) of one utterance spoken by espeak-ng: sentences of the valence's words
    until they fill about `seconds` at the delivery's rate (arousal's), the recording around them."""
    rng = np.random.default_rng(int(rng.integers(2**63)))  # one draw of the caller's stream
    how = speech_engine.delivery(rng, arousal, who, audio.arousal_cues)

    def miss(sentences: list[str]) -> float:  # how far from `seconds` they would be spoken
        return abs(speech_engine.spoken_seconds(sum(len(t.split()) for t in sentences), how) - seconds)

    # The first sentence is the best fit of three (short targets get short sentences), then whole
    # sentences while another one brings the length nearer the target.
    sentences = [min((_sentence(rng, valence) for _ in range(3)), key=lambda t: miss([t]))]
    while len(sentences) < _MAX_SENTENCES:
        more = _sentence(rng, valence)
        if miss(sentences + [more]) >= miss(sentences):
            break
        sentences.append(more)
    text = " ".join(sentences)
    spoken_words = re.sub(r"\[[A-Z]+\]", " ", text)  # markers ([LAUGHTER]) are transcribed, not read out
    samples, rate = speech_engine.speak(" ".join(spoken_words.split()), who, how)
    sr = audio.sampling_rate
    return text, speech_engine.record(rng, samples, rate, sr, audio.step, who, how, max(audio.step, int(MIN_SECONDS * sr)))


def _write_dialog(eval_dir: Path, trans_dir: Path, dialog: str, turns: list[_Turn]) -> None:
    labelled = [t for t in turns if t.code is not None]
    blocks = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n"]
    for t in labelled:
        v, a, d = t.vad
        head = (
            f"[{_fmt_eval_time(t.start)} - {_fmt_eval_time(t.end)}]\t{t.id}\t{t.code}\t"
            f"[{v:.4f}, {a:.4f}, {d:.4f}]"
        )
        blocks.append("\n".join([head, *t.annotator_lines]) + "\n")
    (eval_dir / f"{dialog}.txt").write_text("\n".join(blocks) + "\n", encoding="utf-8")
    lines = [f"{t.id} [{_fmt_transcript_time(t.start)}-{_fmt_transcript_time(t.end)}]: {t.text}" for t in turns]
    (trans_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # per-annotator files, as in the release (readers must ignore them)
    for e in (1, 2):
        cat = [f"{t.id} :{t.annotator_lines[0].split(chr(9))[1]} ()" for t in labelled]
        (eval_dir / "Categorical" / f"{dialog}_e{e}_cat.txt").write_text("\n".join(cat) + "\n", encoding="utf-8")
        atr = [f"{t.id} :act {round(t.vad[1])}; val {round(t.vad[0])}; dom {round(t.vad[2])}; ()" for t in labelled]
        (eval_dir / "Attribute" / f"{dialog}_e{e}_atr.txt").write_text("\n".join(atr) + "\n", encoding="utf-8")
    self_lines = [f"{t.id} :{_CATEGORY_NAME.get(t.code or '', 'Other')}; ()" for t in labelled]
    (eval_dir / "Self-evaluation" / f"{dialog}.txt").write_text("\n".join(self_lines) + "\n", encoding="utf-8")
