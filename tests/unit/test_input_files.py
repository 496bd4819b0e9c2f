"""What users hand over, damaged: audio too loud for finite features, text files with a byte-order
mark or in another encoding. Each is refused in one line naming it, or read as meant."""

from __future__ import annotations

import io
import json
import re
import warnings

import numpy as np
import pytest
import soundfile as sf

from emotrain.data.audio import MAX_ABS_SAMPLE, AudioDecodeError, check_waveform, decode_audio
from emotrain.data.batching import Collator
from emotrain.data.prepare import encode_audio
from emotrain.data.records import AudioInput
from emotrain.data.sources.manifest import ManifestError, read_text_file, scan_manifest
from tests.toyset import tone, toy_processors


def _float_wav(peak: float, seconds: float = 0.5, rate: int = 16000, channels: int = 1) -> bytes:
    samples = tone(seconds, rate, channels=channels)
    samples = (samples / np.abs(samples).max() * peak).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Audio too loud for finite features.


@pytest.mark.parametrize("peak", [1e30, 1e20, 1e13])
def test_audio_too_loud_for_finite_features_is_refused_without_a_numpy_warning(peak):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning alone is no signal: it must not be raised at all
        with pytest.raises(AudioDecodeError, match=re.escape(f"samples up to {peak:.3g} ") + ".* non-finite features"):
            decode_audio(_float_wav(peak), 16000)
        with pytest.raises(AudioDecodeError, match="non-finite samples"):  # 3e38 + 3e38 overflows the down-mix
            decode_audio(_float_wav(3e38, channels=2), 16000)


def test_every_waveform_check_accepts_passes_the_normalisation_with_finite_features():
    """The bound is the feature normalisation's: at MAX_ABS_SAMPLE, a long utterance (and any crop of
    it) still normalises to finite features, in float32, without an overflow warning."""
    fe, tok = toy_processors()
    collator = Collator(fe, tok, 16)
    worst = np.full(60 * 16000, -MAX_ABS_SAMPLE, dtype=np.float32)
    worst[::2] = MAX_ABS_SAMPLE  # the largest deviations from the mean the bound allows
    spike = np.zeros(16000, dtype=np.float32)
    spike[7] = MAX_ABS_SAMPLE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for samples in (worst, worst[:3], spike):
            check_waveform(samples)
            assert np.isfinite(collator.audio_values([samples]).numpy()).all()
    check_waveform(np.full(100, 32768.0, dtype=np.float32))  # integer-scaled floats are audio


def test_predict_refuses_a_too_loud_array_in_one_line():
    from emotrain.predict import InputError, read_audio

    with pytest.raises(InputError, match="unusable audio array: samples up to 1e\\+30"):
        read_audio(np.full(16000, 1e30, dtype=np.float32), 16000, 16000)
    with pytest.raises(InputError, match="non-finite samples"):
        read_audio(np.full((16000, 2), 3e38, dtype=np.float32), 16000, 16000)


def test_prepare_skips_a_too_loud_wav_with_its_reason(tmp_path):
    path = tmp_path / "loud.wav"
    path.write_bytes(_float_wav(1e30))
    encoded = encode_audio(AudioInput(path=str(path)))
    assert encoded.data is None and encoded.error.startswith("unusable wav: samples up to 1e+30")


# ---------------------------------------------------------------------------------------------
# Text files: a byte-order mark, another encoding, no permission.


def test_a_text_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffaudio,text\nx.wav,hé\n".encode("utf-8"))
    assert read_text_file(tmp_path / "bom.csv") == "audio,text\nx.wav,hé\n"


def test_a_text_file_not_in_utf8_or_unreadable_is_one_line_naming_it(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("audio,text\nx.wav,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin1.csv is not UTF-8 text .* save it as UTF-8"):
        read_text_file(tmp_path / "latin1.csv")
    with pytest.raises(ManifestError, match=r"cannot read .*a-folder.csv"):
        (tmp_path / "a-folder.csv").mkdir()
        read_text_file(tmp_path / "a-folder.csv")


def test_emobox_s_label_map_and_stm_read_with_a_byte_order_mark_and_a_broken_map_is_named(tmp_path):
    from emotrain.data.sources.manifest import _read_label_map, read_stm_speakers

    (tmp_path / "label_map.json").write_text('{"ang": "Angry"}', encoding="utf-8-sig")
    assert _read_label_map(tmp_path / "label_map.json") == {"ang": "angry"}
    (tmp_path / "data.seg.wrd.stm").write_text("iemocap-a1 1 spk1 0 1 words\n", encoding="utf-8-sig")
    assert read_stm_speakers(tmp_path / "data.seg.wrd.stm") == {"iemocap-a1": "spk1"}
    for broken in ('{"ang": ', '["ang"]'):
        (tmp_path / "label_map.json").write_text(broken)
        with pytest.raises(ManifestError, match="label_map.json"):
            _read_label_map(tmp_path / "label_map.json")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_manifest_with_a_byte_order_mark_is_prepared_as_without(tmp_path, suffix):
    rows = [("a", "calm", "train"), ("b", "fear", "train"), ("c", "calm", "test"), ("d", "fear", "test")]
    if suffix == ".csv":
        text = "audio,label,split\n" + "".join(f"{n}.wav,{label},{split}\n" for n, label, split in rows)
    else:
        text = "".join(json.dumps({"audio": f"{n}.wav", "label": label, "split": split}) + "\n"
                       for n, label, split in rows)
    path = tmp_path / f"m{suffix}"
    path.write_text(text, encoding="utf-8-sig")
    scan = scan_manifest(path)
    assert [r.id for r in scan.records] == ["a", "b", "c", "d"] and scan.info.labels == ("calm", "fear")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_predict_reads_a_batch_with_a_byte_order_mark(tmp_path, suffix):
    from emotrain.predict import read_manifest

    text = "audio,text\nx.wav,hi\n" if suffix == ".csv" else '{"audio": "x.wav", "text": "hi"}\n'
    (tmp_path / f"b{suffix}").write_text(text, encoding="utf-8-sig")
    assert list(read_manifest(tmp_path / f"b{suffix}")) == [
        {"row": 1, "id": None, "audio": str(tmp_path / "x.wav"), "text": "hi"}]


# ---------------------------------------------------------------------------------------------
# Model folders and predict settings.


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    import torch

    from emotrain.config import ModelConfig
    from emotrain.model import build_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "best"
    build_model(ModelConfig(hidden_size=16, cross_attention_heads=4, classifier_hidden_size=16,
                            tiny_hidden_size=32)).save_pretrained(folder)
    return folder


def _damaged_copy(model_folder, tmp_path, damage):
    import shutil

    folder = tmp_path / "best"
    shutil.copytree(model_folder, folder)
    damage(folder)
    return folder


@pytest.mark.parametrize("damage, expect", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors: SafetensorError"),
    (lambda f: (f / "model.safetensors").unlink(), "FileNotFoundError"),
    (lambda f: (f / "emotion_model.json").write_text("{bad"), "JSONDecodeError"),
    (lambda f: (f / "config.json").write_text("[]"), "damaged or incomplete"),
    (lambda f: (f / "tokenizer_config.json").unlink(), "has no tokenizer_config.json, which a fusion model needs"),
    (lambda f: (f / "preprocessor_config.json").unlink(), "has no preprocessor_config.json"),
], ids=["truncated-weights", "no-weights", "bad-json", "bad-encoder-config", "no-tokenizer", "no-feature-extractor"])
def test_a_damaged_model_folder_is_one_line_naming_it(model_folder, tmp_path, damage, expect):
    from emotrain.predict import InputError, load_model_folder

    folder = _damaged_copy(model_folder, tmp_path, damage)
    with pytest.raises(InputError, match=re.escape(str(folder))) as caught:
        load_model_folder(folder)
    assert expect in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("settings, expect", [
    ({"batch_size": 0}, "--batch-size 0"), ({"batch_size": -3}, "--batch-size -3"),
    ({"max_full_seconds": float("nan")}, "--max-full-seconds nan"), ({"max_full_seconds": -1.0}, "--max-full-seconds"),
    ({"window_seconds": float("inf")}, "--window-seconds inf"), ({"window_seconds": 1e-9}, "one frame"),
])
def test_predict_settings_that_would_fail_every_input_or_score_nothing_are_refused(model_folder, settings, expect):
    """A batch size below 1 scored no window at all: all-zero probabilities, "predicted" the first class."""
    from emotrain.predict import InputError, load

    with pytest.raises(InputError, match=re.escape(expect)):
        load(model_folder, device="cpu", **settings)


def test_a_device_that_is_not_there_is_named(model_folder):
    import torch

    from emotrain.predict import InputError, load

    with pytest.raises(InputError, match="--device banana"):
        load(model_folder, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: torch sees 0 CUDA device"):
            load(model_folder, device="cuda")


def test_predict_names_a_folder_given_as_audio(tmp_path):
    from emotrain.predict import InputError, read_audio

    with pytest.raises(InputError, match=f"{re.escape(str(tmp_path))} is not a file"):
        read_audio(tmp_path, None, 16000)


def test_predict_inputs_carrying_credentials_are_refused_without_repeating_them(model_folder, tmp_path, capsys):
    """--audio, --manifest and each row's `audio` path: a URL with a secret is refused in words that do
    not repeat it, on stderr and in the JSONL (a row: that row's error, the others still come)."""
    from emotrain.cli import main

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    assert main(["predict", str(model_folder), "--audio", f"s3://b/clip.wav?sig={secret}", "--text", "hi",
                 "--device", "cpu"]) == 1
    batch_url = f"https://h/clips.csv?token={secret}"
    assert main(["predict", str(model_folder), "--manifest", batch_url, "--device", "cpu"]) == 2
    sf.write(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    (tmp_path / "clips.csv").write_text(f"audio,text\na.wav,hi\ns3://KEY:{secret}@b/c.wav,hi\n")
    assert main(["predict", str(model_folder), "--manifest", str(tmp_path / "clips.csv"), "--device", "cpu"]) == 1
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    errors = [line for line in printed.err.splitlines() if "must not carry credentials" in line]
    assert [e.split(":")[0] + ":" + e.split(":")[1] for e in errors] == [
        "emotrain predict: error", "emotrain predict: error", "emotrain predict: row 2"], printed.err
    assert "the audio path: must" in errors[0] and "--manifest: must" in errors[1] and "`audio` path" in errors[2]
    rows = [json.loads(line) for line in printed.out.splitlines() if line.startswith('{"row"')]
    assert [("error" in row) for row in rows] == [False, True], printed.out
