"""The speaking corpus (`emotrain synth --speech espeak`): espeak-ng says the words, arousal is in the
voice (pitch, rate, loudness, brightness, each relative to the speaker), both genders speak, the
release layout and its exact times hold, the same seed writes the same files; without espeak-ng,
`auto` falls back to the hand-made signal and says so."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import soundfile as sf

from emotrain.data import speech as speech_engine
from emotrain.data.synth import SYNTH_MARKER, WORDS, synthesize_release
from tests.unit.test_synth import AROUSAL, FOUR, VALENCE, read_release

SR = 16000


def require_espeak() -> None:
    """Skip without espeak-ng, unless CI asks for it (EMOTRAIN_REQUIRE_ESPEAK=1: .ci/setup installed it)."""
    if speech_engine.espeak_version() is None:
        if os.environ.get("EMOTRAIN_REQUIRE_ESPEAK") == "1":
            pytest.fail("EMOTRAIN_REQUIRE_ESPEAK=1 but espeak-ng is not installed")
        pytest.skip("espeak-ng is not installed (.ci/setup installs it as root)")


@pytest.fixture
def needs_espeak():
    require_espeak()


def _f0_semitones(x: np.ndarray) -> float:
    """Median pitch (semitones over 100 Hz) of the loud 40 ms frames, by autocorrelation."""
    level = np.sqrt(np.mean(x**2))
    pitches = []
    for start in range(0, len(x) - 640, 320):
        frame = x[start:start + 640]
        if np.sqrt(np.mean(frame**2)) < 0.5 * level:
            continue
        ac = np.correlate(frame, frame, "full")[639:]
        lo, hi = SR // 450, SR // 65
        pitches.append(SR / (lo + int(np.argmax(ac[lo:hi]))))
    return float(12 * np.log2(np.median(pitches) / 100.0))


def _features(u: dict) -> dict:
    x, sr = sf.read(u["wav"])
    assert sr == SR
    envelope = np.sqrt(np.convolve(x**2, np.ones(320) / 320, "same"))
    voiced = envelope > 0.1 * envelope.max()
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    return {
        "pitch": _f0_semitones(x),
        "words_per_s": len(u["text"].split()) / (voiced.sum() / SR),
        "level_db": 20 * np.log10(np.sqrt(np.mean(x[voiced] ** 2))),
        "brightness_db": 10 * np.log10(spectrum[freqs > 2000].sum() / spectrum[(freqs > 100) & (freqs < 1000)].sum()),
    }


def _arousal_gaps(root) -> dict:
    """Per cue, the mean over speakers of (aroused - calm) of the speaker's medians, and F - M pitch."""
    utts = read_release(root)["utts"]
    rows = {}
    for utt, u in utts.items():
        if u["code"] in FOUR:
            speaker = utt[:5] + utt.split("_")[-1][0]  # Ses01 + F/M
            rows.setdefault(speaker, {0: [], 1: []})[AROUSAL[FOUR[u["code"]]]].append(_features(u))
    gaps = {}
    for cue in ("pitch", "words_per_s", "level_db", "brightness_db"):
        per_speaker = [np.median([f[cue] for f in by[1]]) - np.median([f[cue] for f in by[0]]) for by in rows.values()]
        gaps[cue] = float(np.mean(per_speaker))
    calm_pitch = {s: np.median([f["pitch"] for f in by[0]]) for s, by in rows.items()}
    gaps["female_over_male"] = float(np.mean([calm_pitch[s] - calm_pitch[s[:-1] + "M"] for s in calm_pitch
                                              if s.endswith("F")]))
    return gaps


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    require_espeak()
    root = tmp_path_factory.mktemp("spoken")
    summary = synthesize_release(root, seed=0, utterances_per_session=24, duration_scale=1.0, speech="espeak")
    return root, summary


@pytest.mark.usefixtures("needs_espeak")
def test_layout_times_marker_and_iemocap_like_durations(spoken):
    root, summary = spoken
    assert summary["speech"] == "espeak" and summary["espeak_ng"].startswith("eSpeak NG")
    utts = read_release(root)["utts"]  # every format line, both files' times, one wav per turn
    seconds = []
    for utt, u in utts.items():
        info = sf.info(u["wav"])
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert abs((u["end"] - u["start"]) - info.frames / SR) < 1e-6, utt  # times are the wav's duration
        seconds.append(info.frames / SR)
    # IEMOCAP's 4-class set: median 3.6 s, mean 4.6 s, skewed to the right.
    assert 2.5 < np.median(seconds) < 5.0 and np.mean(seconds) > np.median(seconds), (np.median(seconds), np.mean(seconds))
    marker = json.loads((root / SYNTH_MARKER).read_text())
    assert marker["speech"] == "espeak" and marker["espeak_ng"] == summary["espeak_ng"]
    assert marker["arousal_cues"] == list(speech_engine.AROUSAL_CUES)
    assert "espeak-ng" in marker["description"] and "not IEMOCAP" in marker["description"]


@pytest.mark.usefixtures("needs_espeak")
def test_arousal_is_in_the_voice_relative_to_the_speaker_and_valence_in_the_words(spoken):
    root, _ = spoken
    gaps = _arousal_gaps(root)
    assert gaps["pitch"] > 3.0, gaps  # semitones over the speaker's calm pitch
    assert gaps["words_per_s"] > 0.5, gaps
    assert gaps["level_db"] > 3.0, gaps
    assert gaps["brightness_db"] > 1.5, gaps
    assert gaps["female_over_male"] > 5.0, gaps  # more than arousal moves a voice
    utts = read_release(root)["utts"]
    for u in utts.values():
        if u["code"] in FOUR:
            words = {w.strip(",.!?").lower() for w in u["text"].split()}
            valence = VALENCE[FOUR[u["code"]]]
            other = {w for kind in WORDS[1 - valence].values() for w in kind}
            assert not words & other, (u["text"], words & other)  # only the class's valence words


@pytest.mark.usefixtures("needs_espeak")
def test_a_cue_left_out_does_not_differ_between_the_classes(tmp_path):
    synthesize_release(tmp_path, seed=0, utterances_per_session=24, duration_scale=1.0, speech="espeak",
                       arousal_cues=("rate",))
    gaps = _arousal_gaps(tmp_path)
    assert abs(gaps["pitch"]) < 1.5 and abs(gaps["level_db"]) < 1.5 and abs(gaps["brightness_db"]) < 1.0, gaps
    assert gaps["words_per_s"] > 0.5, gaps
    assert json.loads((tmp_path / SYNTH_MARKER).read_text())["arousal_cues"] == ["rate"]
    with pytest.raises(ValueError, match="arousal_cues"):
        synthesize_release(tmp_path / "x", speech="espeak", arousal_cues=("tempo",))


@pytest.mark.usefixtures("needs_espeak")
def test_the_same_seed_writes_the_same_files(tmp_path):
    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize_release(tmp_path / name, seed=seed, utterances_per_session=4, duration_scale=0.5, speech="espeak")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_without_espeak_auto_writes_the_signal_and_says_so(tmp_path, monkeypatch, capsys):
    from emotrain import cli

    monkeypatch.setattr(speech_engine, "espeak_version", lambda: None)
    summary = synthesize_release(tmp_path / "auto", utterances_per_session=4, duration_scale=0.3, speech="auto")
    assert summary["speech"] == "signal"
    assert json.loads((tmp_path / "auto" / SYNTH_MARKER).read_text())["speech"] == "signal"
    with pytest.raises(RuntimeError, match="espeak-ng is not installed: apt-get install espeak-ng"):
        synthesize_release(tmp_path / "espeak", utterances_per_session=4, speech="espeak")
    assert cli.main(["synth", str(tmp_path / "cli"), "--utterances-per-session", "4", "--speech", "auto"]) == 0
    out = capsys.readouterr().out
    assert "espeak-ng is not installed, so the hand-made speech-like signal" in out


@pytest.mark.usefixtures("needs_espeak")
def test_the_cli_speaks_with_auto_where_espeak_is_installed_and_writes_the_signal_by_default(tmp_path, capsys):
    from emotrain import cli

    assert cli.main(["synth", str(tmp_path / "a"), "--utterances-per-session", "4", "--duration-scale", "0.3",
                     "--speech", "auto"]) == 0
    assert "speech: espeak-ng (eSpeak NG" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / SYNTH_MARKER).read_text())["speech"] == "espeak"
    assert cli.main(["synth", str(tmp_path / "d"), "--utterances-per-session", "4", "--duration-scale", "0.3"]) == 0
    assert json.loads((tmp_path / "d" / SYNTH_MARKER).read_text())["speech"] == "signal"
