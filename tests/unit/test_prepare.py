"""`emotrain prepare` on a small release tree carrying every quirk of the real IEMOCAP release."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from emotrain.cli import main
from emotrain.data.prepare import NothingToPrepareError, prepare
from emotrain.data.shards import list_shard_files
from emotrain.data.sources.release import parse_utterance_id

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def _evaluation_block(utt_id: str, code: str, start: float, end: float) -> str:
    return (
        f"[{start:.4f} - {end:.4f}]\t{utt_id}\t{code}\t[2.5000, 3.0000, 2.0000]\n"
        "C-E2:\tNeutral;\t()\n"
        "A-E3:\tval 3; act 2; dom  2;\t()\n\n"
    )


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, 0.5 * mono], axis=1)


def _write_dialog(root: Path, session: int, dialog: str, utterances: list[dict], extra_transcript: str = ""):
    base = root / f"Session{session}" / "dialog"
    (base / "EmoEvaluation" / "Categorical").mkdir(parents=True, exist_ok=True)
    (base / "transcriptions").mkdir(parents=True, exist_ok=True)
    evaluation, transcript, t = HEADER, extra_transcript, 0.0
    for utt in utterances:
        seconds = utt.get("seconds", 1.0)
        evaluation += _evaluation_block(utt["id"], utt["code"], t, t + seconds)
        if utt.get("text") is not None:
            transcript += f"{utt['id']} [{t:08.4f}-{t + seconds:08.4f}]: {utt['text']}\n"
        wav_dir = root / f"Session{session}" / "sentences" / "wav" / dialog
        wav_dir.mkdir(parents=True, exist_ok=True)
        wav = wav_dir / f"{utt['id']}.wav"
        kind = utt.get("wav", "ok")
        if kind == "ok":
            rate, channels = utt.get("rate", 16000), utt.get("channels", 1)
            sf.write(wav, _tone(seconds, rate, channels), rate, subtype="PCM_16")
        elif kind == "empty":
            sf.write(wav, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
        elif kind == "corrupt":
            wav.write_bytes(b"RIFF\x00\x00garbage, not a wav file")
        t += seconds + 0.5
    (base / "EmoEvaluation" / f"{dialog}.txt").write_text(evaluation)
    (base / "transcriptions" / f"{dialog}.txt").write_text(transcript)
    # Per-annotator files live in subfolders and must be ignored.
    (base / "EmoEvaluation" / "Categorical" / f"{dialog}_e1_cat.txt").write_text(
        _evaluation_block(utterances[0]["id"], "sad", 0, 1)
    )


@pytest.fixture()
def quirky_release(tmp_path: Path) -> Path:
    root = tmp_path / "IEMOCAP_full_release"
    _write_dialog(
        root,
        1,
        "Ses01F_impro01",
        [
            {"id": "Ses01F_impro01_F000", "code": "neu", "text": "Excuse me."},
            {"id": "Ses01F_impro01_M001", "code": "exc", "text": "Oh wow [LAUGHTER] really?", "seconds": 2.25},
            {"id": "Ses01F_impro01_F002", "code": "fru", "text": "Not again."},
            {"id": "Ses01F_impro01_M003", "code": "xxx", "text": "Hmm."},
        ],
        extra_transcript="Ses01F_impro01_MXX0 [010.0000-011.0000]: [BREATHING]\nM: [GARBAGE]\n",
    )
    _write_dialog(
        root,
        1,
        "Ses01F_script01_1",
        [{"id": "Ses01F_script01_1_F000", "code": "hap", "text": "That is wonderful."}],
    )
    # a/b dialog: the letter after the session number belongs to the dialog, not the speaker.
    _write_dialog(
        root,
        3,
        "Ses03M_impro05a",
        [
            {"id": "Ses03M_impro05a_F012", "code": "ang", "text": "Get out!", "rate": 44100, "channels": 2,
             "seconds": 1.5},
            {"id": "Ses03M_impro05a_M013", "code": "sad", "text": "I miss her.", "rate": 8000},
        ],
    )
    _write_dialog(
        root,
        5,
        "Ses05M_script01_1b",
        [
            {"id": "Ses05M_script01_1b_F000", "code": "sad", "text": "Fine.", "wav": "empty"},
            {"id": "Ses05M_script01_1b_M001", "code": "ang", "text": "No!", "wav": "missing"},
            {"id": "Ses05M_script01_1b_F002", "code": "neu", "text": "Okay.", "wav": "corrupt"},
            {"id": "Ses05M_script01_1b_M003", "code": "neu", "text": None},
            {"id": "Ses05M_script01_1b_F004", "code": "exc", "text": "Yes, yes, yes!"},
            {"id": "Ses05M_script01_1b_M005", "code": "ang", "text": "Ha.", "seconds": 0.05},
        ],
    )
    # macOS AppleDouble companions of real files.
    (root / "Session1/dialog/EmoEvaluation/._Ses01F_impro01.txt").write_bytes(b"\x00\x05\x16\x07garbage")
    (root / "Session1/sentences/wav/Ses01F_impro01/._Ses01F_impro01_F000.wav").write_bytes(b"\x00\x05")
    return root


EXPECTED = {
    # id: (session, speaker, dialog, emotion, label, text, seconds)
    "Ses01F_impro01_F000": (1, "Ses01F", "Ses01F_impro01", "neu", "neutral", "Excuse me.", 1.0),
    "Ses01F_impro01_M001": (1, "Ses01M", "Ses01F_impro01", "exc", "happy", "Oh wow [LAUGHTER] really?", 2.25),
    "Ses01F_script01_1_F000": (1, "Ses01F", "Ses01F_script01_1", "hap", "happy", "That is wonderful.", 1.0),
    "Ses03M_impro05a_F012": (3, "Ses03F", "Ses03M_impro05a", "ang", "angry", "Get out!", 1.5),
    "Ses03M_impro05a_M013": (3, "Ses03M", "Ses03M_impro05a", "sad", "sad", "I miss her.", 1.0),
    "Ses05M_script01_1b_F004": (5, "Ses05F", "Ses05M_script01_1b", "exc", "happy", "Yes, yes, yes!", 1.0),
}


def _load(out: Path, session: int) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=list_shard_files(out, f"session{session}"), split="train")


def test_parse_utterance_id_uses_the_letter_before_the_digits():
    assert parse_utterance_id("Ses03M_impro05a_F012") == (3, "Ses03F", "Ses03M_impro05a")
    assert parse_utterance_id("Ses05M_script01_1b_M012") == (5, "Ses05M", "Ses05M_script01_1b")
    assert parse_utterance_id("Ses01F_script01_1_F000") == (1, "Ses01F", "Ses01F_script01_1")
    with pytest.raises(ValueError):
        parse_utterance_id("Ses01F_impro01_MXX0")


def test_prepare_yields_exactly_the_expected_utterances(quirky_release: Path, tmp_path: Path):
    out = tmp_path / "prepared"
    report = prepare(quirky_release, out, num_shards=4, workers=2)

    rows = {}
    for session in (1, 3, 5):
        files = list_shard_files(out, f"session{session}")
        assert [Path(f).name for f in files] == [f"data-0000{i}-of-00004.parquet" for i in range(4)]
        dataset = _load(out, session)
        assert dataset.features["label"].names == ["neutral", "happy", "sad", "angry"]
        assert list(dataset.features) == [
            "id", "session", "speaker", "dialog", "emotion", "label", "text", "audio", "duration",
            "valence", "activation", "dominance",
        ]
        rows.update({row["id"]: row for row in dataset})
    assert not (out / "session2").exists() and not (out / "session4").exists()

    assert set(rows) == set(EXPECTED)
    for utt_id, (session, speaker, dialog, emotion, label, text, seconds) in EXPECTED.items():
        row = rows[utt_id]
        assert (row["session"], row["speaker"], row["dialog"], row["emotion"]) == (session, speaker, dialog, emotion)
        assert row["label"] == ["neutral", "happy", "sad", "angry"].index(label)
        assert row["text"] == text
        samples, rate = sf.read(__import__("io").BytesIO(row["audio"]["bytes"]))
        assert rate == 16000 and samples.ndim == 1
        assert abs(len(samples) / 16000 - seconds) < 1e-3
        assert abs(row["duration"] - seconds) < 1e-3
        assert (row["valence"], row["activation"], row["dominance"]) == (2.5, 3.0, 2.0)

    # Down-mixed and resampled from 44.1 kHz stereo: the tone keeps its amplitude ((1 + 0.5) / 2 * 0.3).
    angry, _ = sf.read(__import__("io").BytesIO(rows["Ses03M_impro05a_F012"]["audio"]["bytes"]))
    assert abs(np.abs(angry[1000:-1000]).max() - 0.225) < 0.01

    skipped = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {
        "Ses05M_script01_1b_F000", "Ses05M_script01_1b_M001", "Ses05M_script01_1b_F002", "Ses05M_script01_1b_M003",
        "Ses05M_script01_1b_M005",
    }
    assert skipped["Ses05M_script01_1b_F000"].startswith("empty wav")
    assert skipped["Ses05M_script01_1b_M001"] == "missing wav"
    assert skipped["Ses05M_script01_1b_F002"].startswith("unreadable wav")
    assert skipped["Ses05M_script01_1b_M003"] == "no transcription line"
    assert skipped["Ses05M_script01_1b_M005"].startswith("too short (0.050 s")

    on_disk = json.loads((out / "prepare_report.json").read_text())
    assert on_disk["kept"] == 6
    assert on_disk["counts"]["session1"] == {"neutral": 1, "happy": 2, "sad": 0, "angry": 0, "total": 3,
                                            "seconds": 4.25}
    assert on_disk["counts"]["session3"]["angry"] == 1 and on_disk["counts"]["session3"]["sad"] == 1
    assert on_disk["dropped_outside_4_classes"] == {"fru": 1, "xxx": 1}
    assert on_disk["skipped"] == report["skipped"]

    # What the report says about the data comes from what was kept: excited merged into happy here.
    info = json.loads((out / "dataset.json").read_text())
    assert info["source"] == f"IEMOCAP release at {quirky_release}"
    assert info["codes_per_label"] == {"neutral": ["neu"], "happy": ["exc", "hap"], "sad": ["sad"], "angry": ["ang"]}


def test_prepare_cli_prints_a_summary_and_the_empty_tree_is_an_error(quirky_release, tmp_path, capsys):
    assert main(["prepare", str(quirky_release), str(tmp_path / "out"), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "kept 6 utterances" in printed and "skipped 5" in printed

    assert main(["prepare", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    assert "no Session1..Session5 folders" in capsys.readouterr().err


def test_prepare_fails_clearly_when_nothing_is_usable(tmp_path):
    root = tmp_path / "release"
    _write_dialog(root, 2, "Ses02F_impro01", [{"id": "Ses02F_impro01_F000", "code": "ang", "text": "x",
                                               "wav": "missing"}])
    with pytest.raises(NothingToPrepareError, match="no usable utterance"):
        prepare(root, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "prepare_report.json").exists()


def test_a_failed_prepare_leaves_no_folder_it_created_and_keeps_any_that_was_there(tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")
    out = tmp_path / "new" / "deeper" / "out"
    assert main(["prepare", nowhere, str(out)]) == 2
    assert "no Session1..Session5 folders" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # every folder it made for OUT_DIR, parents included
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["prepare", nowhere, str(existing)]) == 2
    assert existing.is_dir()  # the user's empty folder stays
    empty_release = tmp_path / "release"
    _write_dialog(empty_release, 2, "Ses02F_impro01", [{"id": "Ses02F_impro01_F000", "code": "ang", "text": "x",
                                                        "wav": "missing"}])
    with pytest.raises(NothingToPrepareError):
        prepare(empty_release, tmp_path / "out2", workers=1)
    assert not (tmp_path / "out2").exists()
