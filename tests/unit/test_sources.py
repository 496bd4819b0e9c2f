"""Every way into a prepared dataset besides the release: Hub mirror stand-ins (local folders with the
mirrors' columns and label encodings), manifests with their own label sets, EmoBox's fold lists."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from emotrain.cli import main
from emotrain.config import load_config
from emotrain.data.folds import check_config_fits_dataset, make_fold_split, read_metadata
from emotrain.data.shards import read_dataset_info
from emotrain.data.sources import prepare_source
from emotrain.data.sources.manifest import ManifestError

REPO = Path(__file__).resolve().parents[2]


def _wav_bytes(seconds: float = 0.4, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buffer, (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def _write_hub(folder: Path, splits: dict[str, dict[str, list]], features: datasets.Features) -> Path:
    """A local stand-in of a Hub dataset: `data/<split>-00000-of-00001.parquet` with HF features."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, columns in splits.items():
        table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def _rows(out: Path) -> dict[str, dict]:
    info = read_dataset_info(str(out))
    meta = read_metadata(str(out), info=info)
    return {utt: {"session": int(s), "speaker": spk, "label": info.labels[int(lab)]}
            for utt, s, spk, lab in zip(meta.id, meta.session, meta.speaker, meta.label)}


# --- Ar4ikov/iemocap_audio_text --------------------------------------------------------------

AR4IKOV = [  # titre, emotion (release codes), text
    ("Ses01F_impro01_F000", "neu", "Excuse me."),
    ("Ses01F_impro01_M001", "exc", "Wow."),
    ("Ses01F_impro01_F002", "fru", "Not again."),
    ("Ses02M_impro03_F004", "hap", "Great."),
    ("Ses03M_impro05a_F012", "ang", "Get out!"),  # a/b dialog: spoken by Ses03F
    ("Ses03M_impro05a_M013", "xxx", "Hmm."),
    ("Ses05F_script01_1_M000", "sad", "I miss her."),
]


@pytest.fixture()
def ar4ikov(tmp_path) -> Path:
    features = datasets.Features({
        "titre": datasets.Value("string"), "emotion": datasets.Value("string"),
        "to_translate": datasets.Value("string"), "start_time": datasets.Value("float32"),
        "end_time": datasets.Value("float32"), "activation": datasets.Value("float32"),
        "valence": datasets.Value("float32"), "dominance": datasets.Value("float32"),
        "audio": datasets.Audio(sampling_rate=16000),
    })
    n = len(AR4IKOV)
    columns = {"titre": [r[0] for r in AR4IKOV], "emotion": [r[1] for r in AR4IKOV],
               "to_translate": [r[2] for r in AR4IKOV], "start_time": [0.0] * n, "end_time": [1.0] * n,
               "activation": [3.0] * n, "valence": [2.5] * n, "dominance": [2.0] * n,
               "audio": [{"bytes": _wav_bytes(rate=22050), "path": None} for _ in range(n)]}
    return _write_hub(tmp_path / "ar4ikov", {"train": columns}, features)


def test_ar4ikov_layout_is_detected_and_gives_the_4_class_rows_with_speakers_from_the_id(ar4ikov, tmp_path):
    out = tmp_path / "prepared"
    report = prepare_source(str(ar4ikov), out, num_shards=2, workers=1)
    rows = _rows(out)
    assert rows == {
        "Ses01F_impro01_F000": {"session": 1, "speaker": "Ses01F", "label": "neutral"},
        "Ses01F_impro01_M001": {"session": 1, "speaker": "Ses01M", "label": "happy"},
        "Ses02M_impro03_F004": {"session": 2, "speaker": "Ses02F", "label": "happy"},
        "Ses03M_impro05a_F012": {"session": 3, "speaker": "Ses03F", "label": "angry"},
        "Ses05F_script01_1_M000": {"session": 5, "speaker": "Ses05M", "label": "sad"},
    }
    assert report["read"] == 7 and report["kept"] == 5 and report["skipped"] == []
    assert report["dropped_outside_labels"] == {"fru": 1, "xxx": 1}
    assert report["counts"]["session1"] == {"neutral": 1, "happy": 1, "sad": 0, "angry": 0, "total": 2,
                                            "seconds": 0.8}
    info = read_dataset_info(str(out))
    assert info.labels == ("neutral", "happy", "sad", "angry") and info.has_text and info.has_speakers
    assert info.fold_numbers() == [1, 2, 3, 5]  # the sessions present, leave-one-session-out
    table = pq.read_table(next((out / "session3").glob("*.parquet")))
    assert table.column("text").to_pylist() == ["Get out!"]  # the transcript from `to_translate`
    assert table.column("valence").to_pylist() == [2.5]
    samples, rate = sf.read(io.BytesIO(table.column("audio").to_pylist()[0]["bytes"]))
    assert rate == 16000 and abs(len(samples) / rate - 0.4) < 1e-3  # resampled from 22.05 kHz


# --- AbstractTTS/IEMOCAP ---------------------------------------------------------------------

def test_abstracttts_keeps_what_maps_to_the_4_classes_and_prints_counts_beside_the_published(tmp_path, capsys):
    features = datasets.Features({
        "file": datasets.Value("string"), "audio": datasets.Audio(sampling_rate=16000),
        "transcription": datasets.Value("string"), "major_emotion": datasets.Value("string"),
        "EmoAct": datasets.Value("float32"), "EmoVal": datasets.Value("float32"), "EmoDom": datasets.Value("float32"),
        "gender": datasets.Value("string"), "frustrated": datasets.Value("float32"),
    })
    rows = [("Ses01F_impro01_F000.wav", "neutral"), ("Ses01F_impro01_M001.wav", "excited"),
            ("Ses02F_impro02_F001.wav", "frustrated"), ("Ses02F_impro02_M002.wav", "angry"),
            ("Ses04M_script02_2_F003.wav", "sad")]
    n = len(rows)
    columns = {"file": [r[0] for r in rows], "audio": [{"bytes": _wav_bytes(), "path": None}] * n,
               "transcription": ["words"] * n, "major_emotion": [r[1] for r in rows], "EmoAct": [3.0] * n,
               "EmoVal": [2.0] * n, "EmoDom": [1.5] * n, "gender": ["F"] * n, "frustrated": [0.2] * n}
    source = _write_hub(tmp_path / "abstracttts", {"train": columns}, features)
    assert main(["prepare", str(source), str(tmp_path / "out"), "--workers", "1", "--num-shards", "1"]) == 0
    printed = capsys.readouterr().out
    assert "kept / published" in printed
    assert "1 / 278" in printed  # session 1 happy (excited merged): 1 kept of 143 + 135 published
    rows_out = _rows(tmp_path / "out")
    assert rows_out["Ses01F_impro01_M001"]["label"] == "happy" and "Ses02F_impro02_F001" not in rows_out
    assert rows_out["Ses04M_script02_2_F003"] == {"session": 4, "speaker": "Ses04F", "label": "sad"}
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["read"] == 5 and report["kept"] == 4 and report["dropped_outside_labels"] == {"frustrated": 1}
    assert report["published_counts"]["session1"]["happy"] == 278


# --- Zahra99/IEMOCAP_Audio and _Text ---------------------------------------------------------

ZAHRA_NAMES = ["ang", "hap", "neu", "sad"]


def _zahra(tmp_path: Path, kind: str) -> Path:
    column = datasets.Audio(sampling_rate=16000) if kind == "audio" else datasets.Value("string")
    features = datasets.Features({kind: column, "label": datasets.ClassLabel(names=ZAHRA_NAMES)})
    value = {"bytes": _wav_bytes(), "path": None} if kind == "audio" else "some words"
    splits = {f"session{s}": {kind: [value] * 4, "label": [0, 1, 2, 3]} for s in (1, 2, 3)}
    return _write_hub(tmp_path / f"zahra_{kind}", splits, features)


def test_zahra99_audio_prepares_without_text_or_speakers_and_fusion_is_refused_with_the_reason(tmp_path, capsys):
    out = tmp_path / "prepared"
    report = prepare_source(str(_zahra(tmp_path, "audio")), out, num_shards=1, workers=1)
    rows = _rows(out)
    assert len(rows) == 12 and report["kept"] == 12
    # Labels by name (0 ang, 1 hap, 2 neu, 3 sad), not by integer position in our label set.
    assert rows["session2_00000"]["label"] == "angry" and rows["session2_00002"]["label"] == "neutral"
    assert {r["session"] for r in rows.values()} == {1, 2, 3} and {r["speaker"] for r in rows.values()} == {""}
    info = read_dataset_info(str(out))
    assert not info.has_text and not info.has_speakers
    split = make_fold_split(str(out), 2, validation="speakers")  # no speakers: a random fraction instead
    assert split.validation_mode == "fraction" and "no speakers" in split.notes[0] and split.num_validation == 1

    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"data.path={out}"])
    with pytest.raises(Exception, match="pairing the two by row order is not safe"):
        check_config_fits_dataset(cfg.data, cfg.model, info)
    audio_cfg = load_config(REPO / "configs" / "smoke.yaml", [f"data.path={out}", "model.variant=audio"])
    check_config_fits_dataset(audio_cfg.data, audio_cfg.model, info)  # the audio-only variant may train

    # Through the CLI: one line, exit 2, before any model is built.
    assert main(["train", str(REPO / "configs" / "smoke.yaml"), f"data.path={out}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "model.variant: fusion needs transcripts" in err and "not safe" in err
    assert not (tmp_path / "run").exists()


def test_zahra99_text_alone_is_refused_and_says_why(tmp_path):
    with pytest.raises(ManifestError, match="pairing the two by row order is not safe"):
        prepare_source(str(_zahra(tmp_path, "text")), tmp_path / "out", workers=1)


def test_an_unknown_layout_lists_its_columns_and_an_explicit_mapping_prepares_it(tmp_path):
    features = datasets.Features({"utt": datasets.Value("string"), "sound": datasets.Audio(sampling_rate=16000),
                                  "words": datasets.Value("string"), "feeling": datasets.Value("string")})
    columns = {"utt": ["Ses01F_impro01_F000", "Ses02F_impro01_M000"], "sound": [{"bytes": _wav_bytes(), "path": None}] * 2,
               "words": ["a", "b"], "feeling": ["calm", "mad"]}
    source = _write_hub(tmp_path / "unknown", {"train": columns}, features)
    with pytest.raises(ManifestError, match=r"columns found: \['utt', 'sound', 'words', 'feeling'\]"):
        prepare_source(str(source), tmp_path / "out", workers=1)
    report = prepare_source(str(source), tmp_path / "out", workers=1, num_shards=1,
                            columns={"id": "utt", "audio": "sound", "text": "words", "label": "feeling"},
                            label_map={"calm": "neutral", "mad": "angry"}, labels=["neutral", "happy", "sad", "angry"])
    assert report["kept"] == 2
    assert _rows(tmp_path / "out")["Ses02F_impro01_M000"] == {"session": 2, "speaker": "Ses02M", "label": "angry"}


# --- Manifests -------------------------------------------------------------------------------

def _write_wavs(folder: Path, names: list[str], rate: int = 16000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(_wav_bytes(rate=rate))


def test_a_csv_manifest_with_sessions_gives_leave_one_session_out_over_its_own_labels(tmp_path):
    _write_wavs(tmp_path / "corpus" / "wav", [f"u{i}.wav" for i in range(6)])
    lines = ["path,transcript,emotion,spk,session"]
    for i, (label, session) in enumerate([("calm", 1), ("fear", 1), ("calm", 2), ("fear", 2), ("joy", 3), ("", 3)]):
        lines.append(f"wav/u{i}.wav,words {i},{label},s{i % 2},{session}")
    lines.append("wav/missing.wav,words,joy,s1,3")
    lines.append("https://host/u9.wav?X-Amz-Signature=SECRETSIG,words,joy,s1,3")  # its id would be the URL
    manifest = tmp_path / "corpus" / "meta.csv"
    manifest.write_text("\n".join(lines) + "\n")
    report = prepare_source(str(manifest), tmp_path / "out", workers=1, num_shards=1)
    info = read_dataset_info(str(tmp_path / "out"))
    assert info.labels == ("calm", "fear", "joy") and info.fold_kind == "sessions"
    assert info.groups == {"session1": 1, "session2": 2, "session3": 3} and info.fold_numbers() == [1, 2, 3]
    assert report["read"] == 8 and report["kept"] == 5
    assert report["dropped_outside_labels"] == {"(empty)": 1}
    assert sorted(report["skipped"], key=lambda skip: skip["id"]) == [
        {"id": "row8", "reason": "its audio path carries credentials (query parameter X-Amz-Signature in the URL): "
                                 "give them through the environment"},
        {"id": "wav/missing", "reason": "missing wav"}]
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"SECRETSIG" in p.read_bytes()]
    split = make_fold_split(str(tmp_path / "out"), 3, validation="speakers")
    assert split.test_ids == ("wav/u4",) and set(split.validation_speakers) <= {"s0", "s1"}


def test_a_jsonl_manifest_with_named_speaker_groups_and_a_given_label_order(tmp_path):
    labels = ["zest", "anger", "boredom", "pride", "awe", "calm"]
    names = [f"c{i}.wav" for i in range(12)]
    _write_wavs(tmp_path / "clips", names)
    lines = [json.dumps({"audio": f"clips/{n}", "text": "x", "label": labels[i % 6], "speaker": f"p{i % 4}",
                         "group": ["north", "south", "east"][i % 3]}) for i, n in enumerate(names)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    prepare_source(str(tmp_path / "m.jsonl"), tmp_path / "out", workers=1, num_shards=1)
    info = read_dataset_info(str(tmp_path / "out"))
    assert info.labels == tuple(sorted(labels))  # from the data: sorted, whatever the row order
    assert info.groups == {"group-east": 1, "group-north": 2, "group-south": 3} and info.fold_kind == "groups"
    assert [(f.number, f.train, f.test) for f in info.folds] == [(1, (2, 3), (1,)), (2, (1, 3), (2,)), (3, (1, 2), (3,))]
    assert make_fold_split(str(tmp_path / "out"), 2).test_ids == ("clips/c0", "clips/c3", "clips/c6", "clips/c9")

    prepare_source(str(tmp_path / "m.jsonl"), tmp_path / "out2", workers=1, num_shards=1, labels=["pride", "awe"])
    assert read_dataset_info(str(tmp_path / "out2")).labels == ("pride", "awe")
    assert json.loads((tmp_path / "out2" / "prepare_report.json").read_text())["dropped_outside_labels"] == {
        "anger": 2, "boredom": 2, "calm": 2, "zest": 2}


def test_a_manifest_without_folds_or_audio_column_is_an_error_naming_what_it_found(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"sound": "a.wav", "label": "x"}) + "\n")
    with pytest.raises(ManifestError, match=r"no audio column .*columns found: \['sound', 'label'\]"):
        prepare_source(str(manifest), tmp_path / "out", workers=1)
    manifest.write_text(json.dumps({"audio": "a.wav", "label": "x"}) + "\n")
    with pytest.raises(ManifestError, match="no split, session or group column"):
        prepare_source(str(manifest), tmp_path / "out", workers=1)


# --- EmoBox ----------------------------------------------------------------------------------

def build_emobox(root: Path, corpus: str = "toybox") -> tuple[Path, Path]:
    """`data/<corpus>/fold_{1,2}/<corpus>_{train,test}_fold_k.jsonl` + label_map.json + stm, and the
    wavs under a download root; fold k tests on speaker group k. Returns (corpus folder, download root)."""
    downloads = root / "user"
    folder = root / "EmoBox" / "data" / corpus
    utterances = {1: [("a1", "spk1", "H"), ("a2", "spk1", "S"), ("a3", "spk2", "N"), ("a4", "spk2", "H")],
                  2: [("b1", "spk3", "S"), ("b2", "spk3", "N"), ("b3", "spk4", "H"), ("b4", "spk4", "X")]}
    stm = []
    for group, items in utterances.items():
        for name, speaker, emo in items:
            wav = downloads / "downloads" / corpus / speaker / f"{name}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            wav.write_bytes(_wav_bytes(rate=44100))
            stm.append(f"{corpus}-{name} 1 {speaker} 0 0.4 <id={corpus}-{name},spk={speaker},emotion={emo}> {emo}")
    for k in (1, 2):
        (folder / f"fold_{k}").mkdir(parents=True, exist_ok=True)
        for part, groups in (("test", [k]), ("train", [g for g in (1, 2) if g != k])):
            lines = [json.dumps({"key": f"{corpus}-{name}", "dataset": corpus,
                                 "wav": f"downloads/{corpus}/{speaker}/{name}.wav", "type": "raw",
                                 "sample_rate": 44100, "length": 0.4, "task": "category", "emo": emo, "channel": 1})
                     for g in groups for name, speaker, emo in utterances[g]]
            (folder / f"fold_{k}" / f"{corpus}_{part}_fold_{k}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "label_map.json").write_text(json.dumps({"H": "Happy", "S": "Sad", "N": "Neutral", "X": "Other"}))
    (folder / "data.seg.wrd.stm").write_text("\n".join(stm) + "\n")
    return folder, downloads


def test_emobox_lists_prepare_into_their_official_folds_with_stm_speakers(tmp_path, capsys):
    folder, downloads = build_emobox(tmp_path)
    assert main(["prepare", str(folder), str(tmp_path / "out"), f"--download-root={downloads}",
                 "--workers", "1", "--num-shards", "2"]) == 0
    assert "EmoBox folds [1, 2]" in capsys.readouterr().out
    info = read_dataset_info(str(tmp_path / "out"))
    assert info.fold_kind == "emobox" and info.labels == ("happy", "sad", "neutral", "other")
    assert info.groups == {"fold1": 1, "fold2": 2} and not info.has_text and info.has_speakers
    rows = _rows(tmp_path / "out")
    assert set(rows) == {"a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4"}  # the `<corpus>-` prefix is dropped
    assert rows["b4"] == {"session": 2, "speaker": "spk4", "label": "other"}
    for k, tested in ((1, ("a1", "a2", "a3", "a4")), (2, ("b1", "b2", "b3", "b4"))):
        split = make_fold_split(str(tmp_path / "out"), k, validation="speakers")
        assert split.test_ids == tested
        assert set(split.train_ids()) | set(split.validation_ids) == set(rows) - set(tested)
    with pytest.raises(Exception, match=r"data.fold: is 3, but the prepared dataset .* has folds \[1, 2\]"):
        make_fold_split(str(tmp_path / "out"), 3)


def test_emobox_iemocap_speakers_come_from_the_id_not_the_stm(tmp_path):
    folder, downloads = build_emobox(tmp_path, corpus="iemocap")
    # EmoBox's IEMOCAP stm names the dialog's session letter: Ses01F for a turn of Ses01M.
    for path in folder.rglob("*.jsonl"):
        path.write_text(path.read_text().replace("iemocap-a1", "iemocap-Ses01F_impro01_M000"))
    stm = folder / "data.seg.wrd.stm"
    stm.write_text(stm.read_text().replace("iemocap-a1 1 spk1", "iemocap-Ses01F_impro01_M000 1 Ses01F"))
    report = prepare_source(str(folder), tmp_path / "out", download_root=str(downloads), workers=1, num_shards=1)
    assert _rows(tmp_path / "out")["Ses01F_impro01_M000"]["speaker"] == "Ses01M"
    assert report["stm_speakers_corrected"] == 1


def test_data_labels_pins_the_label_set_and_other_data_is_refused(tmp_path):
    from emotrain.config import ConfigError
    from emotrain.data.folds import split_from_config

    _write_wavs(tmp_path / "clips", ["a.wav", "b.wav", "c.wav", "d.wav"])
    rows = [("a", "calm", "train"), ("b", "fear", "train"), ("c", "calm", "test"), ("d", "fear", "test")]
    (tmp_path / "m.csv").write_text("audio,text,label,speaker,split\n" + "".join(
        f"clips/{n}.wav,x,{label},s{i},{split}\n" for i, (n, label, split) in enumerate(rows)))
    prepare_source(str(tmp_path / "m.csv"), tmp_path / "out", workers=1, num_shards=1)
    pinned = load_config(REPO / "configs" / "smoke.yaml", [f"data.path={tmp_path / 'out'}", "data.labels=[calm,fear]"])
    assert split_from_config(pinned.data, seed=1).label_names == ("calm", "fear")
    other = load_config(REPO / "configs" / "smoke.yaml", [f"data.path={tmp_path / 'out'}", "data.labels=[fear,calm]"])
    with pytest.raises(ConfigError, match=r"data.labels: pins \['fear', 'calm'\], but the prepared dataset .* has "
                                          r"\['calm', 'fear'\]"):
        split_from_config(other.data, seed=1)
