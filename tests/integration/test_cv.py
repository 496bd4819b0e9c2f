"""`emotrain cv` end to end on the synthetic corpus (2 folds, tiny encoders), killed in the middle and
rerun; `emotrain report` on what it left; `emotrain evaluate` and `emotrain predict` on its models."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from emotrain.report import mean_sd
from tests.integration.conftest import EMOTRAIN, REPO, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow

FOLDS = (1, 2)


def _cv_command(corpus: Path, root: Path) -> list[str]:
    overrides = [o for o in tiny_overrides(corpus, Path("unused")) if not o.startswith("output_dir=")]
    return [*EMOTRAIN, "cv", str(REPO / "configs" / "smoke.yaml"), *overrides,
            f"output_dir={root}/{{experiment}}/fold{{fold}}", "train.max_epochs=2", "train.checkpoint_every_steps=4",
            "--folds", ",".join(map(str, FOLDS))]


@pytest.fixture(scope="module")
def killed_and_rerun(synthetic_corpus, tmp_path_factory):
    """`emotrain cv` killed (SIGKILL) while fold 2 trains, then the same command again."""
    root = tmp_path_factory.mktemp("cv")
    command = _cv_command(synthetic_corpus, root)
    first_log = root / "first.log"
    with open(first_log, "w") as handle:
        first = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        fold2 = root / "smoke" / "fold2" / "checkpoints"
        while time.time() < deadline and first.poll() is None and not list(fold2.glob("step-*/COMPLETE")):
            time.sleep(0.2)
        assert first.poll() is None, first_log.read_text()[-4000:]
        assert list(fold2.glob("step-*/COMPLETE")), "fold 2 never saved a checkpoint"
        fold1_metrics = (root / "smoke" / "fold1" / "metrics.json").read_bytes()
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the training learns it from the kernel
        first.wait(timeout=30)
    rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    return root, fold1_metrics, first_log.read_text(), rerun


def test_a_killed_cv_skips_finished_folds_and_resumes_the_unfinished_one(killed_and_rerun):
    root, fold1_metrics, first_log, rerun = killed_and_rerun
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    out = rerun.stdout
    assert "[cv 1/2] smoke fold 1 seed 42: finished, skipped" in out, out
    assert "[cv 2/2] smoke fold 2 seed 42: resuming in" in out, out
    # Fold 1 was not touched again; fold 2 continued from the checkpoint the killed run's training saved.
    assert (root / "smoke" / "fold1" / "metrics.json").read_bytes() == fold1_metrics
    log2 = (root / "smoke" / "fold2" / "train.log").read_text()
    saved = re.findall(r"stop requested \(signal SIGTERM\): saving step (\d+) and exiting with 75", log2)
    assert len(saved) == 1, log2[-3000:]  # the parent-death signal reached it
    assert f"resumed from {root / 'smoke' / 'fold2' / 'checkpoints' / f'step-{int(saved[0]):06d}'}" in log2
    metrics = json.loads((root / "smoke" / "fold2" / "metrics.json").read_text())
    assert metrics["stop_reason"] == "max_epochs" and metrics["steps"] > int(saved[0])
    assert json.loads((root / "smoke" / "cv.json").read_text())["folds"] == list(FOLDS)


def test_the_table_equals_the_fold_metrics(killed_and_rerun):
    root, _, _, rerun = killed_and_rerun
    folds = {k: json.loads((root / "smoke" / f"fold{k}" / "metrics.json").read_text())["test"] for k in FOLDS}
    summary = _csv_rows(root / "smoke" / "report" / "summary.csv")
    (row,) = summary
    for metric in ("wa", "ua", "macro_f1"):
        values = [folds[k][metric] for k in FOLDS]
        mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
        assert float(row[f"{metric}_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row[f"{metric}_sd"]) == pytest.approx(sd, abs=1e-12)
        assert mean_sd(values) == pytest.approx((mean, sd))
    for name in ("neutral", "happy", "sad", "angry"):
        values = [folds[k]["per_class_recall"][name] for k in FOLDS]
        assert float(row[f"recall_{name}_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
    runs = _csv_rows(root / "smoke" / "report" / "runs.csv")
    assert [(int(r["fold"]), float(r["ua"])) for r in runs] == [(k, folds[k]["ua"]) for k in FOLDS]
    # The printed and the Markdown table show the same figures, in percent.
    ua = [folds[k]["ua"] for k in FOLDS]
    cell = f"{np.mean(ua) * 100:.1f} ± {np.std(ua, ddof=1) * 100:.1f}"
    assert cell in rerun.stdout
    report = (root / "smoke" / "report" / "report.md").read_text()
    assert cell in report and "| smoke | fusion | 2/2 |" in report
    for k in FOLDS:
        assert f"| {k} | session {k} | 42 | {folds[k]['n']} | {folds[k]['wa'] * 100:.1f} | {folds[k]['ua'] * 100:.1f} |" in report
    # The protocol and where every number came from.
    assert "leave-one-session-out" in report.lower() and "UA = mean of the per-class recalls" in report
    assert "| session1 | 12 | 12 | 12 | 12 | 48 |" in report  # the prepare report's counts
    assert "synthetic corpus (`emotrain synth`, seed 1)" in report and "not IEMOCAP recordings" in report
    assert "*happy* = `exc` + `hap`" in report  # the synthetic release writes both codes, as IEMOCAP's does
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit and commit in report
    assert re.search(r"\| smoke \| 1 \| 42 \| [0-9a-f]{40}(\+dirty)? \| 0\.1\.0 \| 2\.\d+\.\d+", report)
    # Each fold's model card: its own metrics, and the report's per-fold table.
    for k in FOLDS:
        card = (root / "smoke" / f"fold{k}" / "best" / "README.md").read_text()
        assert f"| test | {folds[k]['n']} | {folds[k]['wa'] * 100:.1f} | {folds[k]['ua'] * 100:.1f} |" in card
        assert f"This model is fold {k} (seed 42) of the 2 folds below" in card and cell in card


def test_report_says_what_is_missing_and_reports_the_rest(killed_and_rerun, tmp_path):
    root, _, _, _ = killed_and_rerun
    experiment = tmp_path / "smoke"
    shutil.copytree(root / "smoke", experiment, ignore=shutil.ignore_patterns("report", "checkpoints", "best"))
    shutil.rmtree(experiment / "fold2")
    proc = subprocess.run([*EMOTRAIN, "report", str(experiment), "--out", str(tmp_path / "report")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke: fold 2 is missing" in proc.stdout
    fold1 = json.loads((experiment / "fold1" / "metrics.json").read_text())["test"]
    assert "| smoke | fusion | 1/2 |" in proc.stdout and f"{fold1['ua'] * 100:.1f} |" in proc.stdout
    report = (tmp_path / "report" / "report.md").read_text()
    assert "fold 2 is missing" in report and "**Not counted**" in report

    # An unfinished run (checkpoints, no metrics yet) is named as such, not counted.
    shutil.copytree(root / "smoke" / "fold2", experiment / "fold2", ignore=shutil.ignore_patterns("metrics.json"))
    proc = subprocess.run([*EMOTRAIN, "report", str(experiment), "--out", str(tmp_path / "report2"), "--no-plots"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "smoke: fold 2 is unfinished" in proc.stdout, proc.stdout + proc.stderr


def test_the_figures_are_real_pictures(killed_and_rerun):
    from matplotlib import image

    root, _, _, _ = killed_and_rerun
    report = root / "smoke" / "report"
    expected = {"smoke/confusion_fold1.png": (440, 1000), "smoke/confusion_fold2.png": (440, 1000),
                "smoke/confusion_pooled.png": (440, 1000), "smoke/curves_fold1.png": (400, 700),
                "smoke/curves_fold2.png": (400, 700), "ua_by_experiment.png": (400, 400)}
    for name, (height, width) in expected.items():
        pixels = image.imread(report / name)  # decodes the PNG
        assert pixels.shape[:2] == (height, width), (name, pixels.shape)
        gray = pixels[..., :3].mean(axis=-1)
        assert gray.std() > 0.05 and (gray < 0.5).mean() > 0.005, name  # not blank: ink on the page
        assert f"]({name})" in (report / "report.md").read_text()


def test_evaluate_reproduces_the_run_s_test_metrics(killed_and_rerun):
    root, _, _, _ = killed_and_rerun
    fold = root / "smoke" / "fold2"
    proc = subprocess.run([*EMOTRAIN, "evaluate", str(fold / "best"), _data_path(fold), "--session", "2"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    expected = json.loads((fold / "metrics.json").read_text())["test"]
    assert results["test"] == expected and results["sessions"] == [2]
    assert "WA" in proc.stderr and "test " in proc.stderr


def _data_path(fold: Path) -> str:
    import yaml

    return yaml.safe_load((fold / "config.yaml").read_text())["data"]["path"]


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------
# predict


@pytest.fixture(scope="module")
def clips(killed_and_rerun, tmp_path_factory):
    """Four test-session utterances as files: 16 kHz mono WAV (the prepared samples exactly) and
    44.1 kHz stereo WAV; with their ids and gold transcripts."""
    import io

    import pyarrow.parquet as pq
    import soundfile as sf
    import soxr

    root, _, _, _ = killed_and_rerun
    folder = tmp_path_factory.mktemp("clips")
    data = Path(_data_path(root / "smoke" / "fold1"))
    table = pq.read_table(sorted((data / "session1").glob("*.parquet"))[0], columns=["id", "text", "audio"])
    rows = table.to_pylist()[:4]
    for row in rows:
        samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
        assert rate == 16000
        sf.write(folder / f"{row['id']}.wav", samples, 16000, subtype="FLOAT")
        resampled = soxr.resample(samples, 16000, 44100, quality="VHQ")
        sf.write(folder / f"{row['id']}.44k.wav", np.stack([resampled, resampled], axis=1), 44100, subtype="FLOAT")
    return folder, [(row["id"], row["text"]) for row in rows]


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EMOTRAIN, "predict", *map(str, args)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_predict_agrees_with_evaluate_and_takes_any_rate_and_channels(killed_and_rerun, clips, tmp_path):
    root, _, _, _ = killed_and_rerun
    model = root / "smoke" / "fold1" / "best"
    folder, utterances = clips
    manifest = tmp_path / "clips.csv"
    manifest.write_text("id,audio,text\n" + "".join(f"{utt},{folder / (utt + '.wav')},\"{text}\"\n"
                                                     for utt, text in utterances))
    proc = _predict(model, "--manifest", manifest, "--out", tmp_path / "predictions.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = {p["id"]: p for p in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())}
    assert sorted(predictions) == sorted(u for u, _ in utterances)

    evaluated = subprocess.run([*EMOTRAIN, "evaluate", str(model), _data_path(root / "smoke" / "fold1"), "--session", "1",
                                "--per-utterance"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    by_id = {p["id"]: p for p in json.loads(evaluated.stdout)["test"]["predictions"]}
    for utt, prediction in predictions.items():
        probabilities = prediction["probabilities"]
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert prediction["predicted"] == by_id[utt]["predicted"]
        for name, p in probabilities.items():
            assert p == pytest.approx(by_id[utt]["probabilities"][name], abs=1e-5), (utt, name)
        assert prediction["transcript_source"] == "given"

    # 44.1 kHz stereo: resampled and down-mixed to what the model takes; the same answer.
    utt, text = utterances[0]
    proc = _predict(model, "--audio", folder / f"{utt}.44k.wav", "--text", text)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["audio_info"]["sampling_rate"] == 44100 and result["audio_info"]["channels"] == 2
    assert result["audio_info"]["handling"].startswith("full length")
    for name, p in result["probabilities"].items():
        assert p == pytest.approx(predictions[utt]["probabilities"][name], abs=0.02), (name, result)

    # From Python: one documented call.
    import emotrain.predict

    python = emotrain.predict.load(model).predict(str(folder / f"{utt}.wav"), text=text)
    assert python["predicted"] == predictions[utt]["predicted"]
    assert python["probabilities"] == pytest.approx(predictions[utt]["probabilities"], abs=1e-6)


def test_a_batch_reports_its_bad_rows_and_predicts_the_rest(killed_and_rerun, clips, tmp_path):
    root, _, _, _ = killed_and_rerun
    folder, utterances = clips
    rows = [{"id": utt, "audio": str(folder / f"{utt}.wav"), "text": text} for utt, text in utterances[:2]]
    rows.insert(1, {"id": "gone", "audio": str(tmp_path / "no-such.wav"), "text": "hello"})
    rows.append({"id": "silent", "audio": str(folder / f"{utterances[2][0]}.wav"), "text": "   "})
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wav file")
    import soundfile as sf

    sf.write(tmp_path / "click.wav", np.zeros(50, dtype=np.float32), 16000)  # 3 ms: shorter than one frame
    rows += [{"id": "corrupt", "audio": str(tmp_path / "noise.wav"), "text": "hi"},
             {"id": "click", "audio": str(tmp_path / "click.wav"), "text": "hi"},
             {"id": "last", "audio": str(folder / f"{utterances[3][0]}.wav"), "text": utterances[3][1]}]
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _predict(root / "smoke" / "fold1" / "best", "--manifest", manifest)
    assert proc.returncode == 1, proc.stderr  # some rows failed
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r.get("id") for r in results] == [r["id"] for r in rows]
    errors = {r["id"]: r["error"] for r in results if "error" in r}
    assert set(errors) == {"gone", "silent", "corrupt", "click"}
    assert "no such audio file" in errors["gone"] and "empty transcript" in errors["silent"]
    assert "cannot read audio" in errors["corrupt"] and "shorter than one frame" in errors["click"]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in results if "error" not in r)
    assert "row 2: no such audio file" in proc.stderr and "row 4: empty transcript" in proc.stderr
    assert "3 of 7 row(s) predicted, 4 failed" in proc.stderr


def test_predict_takes_a_transcript_from_a_local_speech_recogniser(killed_and_rerun, clips, tmp_path):
    root, _, _, _ = killed_and_rerun
    folder, utterances = clips
    asr = _tiny_ctc_recogniser(tmp_path / "asr")
    proc = _predict(root / "smoke" / "fold1" / "best", "--audio", folder / f"{utterances[0][0]}.44k.wav", "--asr", asr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["transcript"] == "h" and result["transcript_source"] == f"asr:{asr}"
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    # Without a recogniser, no transcript is a clear error (exit 1).
    proc = _predict(root / "smoke" / "fold1" / "best", "--audio", folder / f"{utterances[0][0]}.wav")
    assert proc.returncode == 1 and "empty transcript" in proc.stderr and "--asr" in proc.stderr


def test_long_recordings_are_scored_in_windows(killed_and_rerun, clips, tmp_path):
    import soundfile as sf

    root, _, _, _ = killed_and_rerun
    folder, utterances = clips
    pieces = [sf.read(folder / f"{utt}.wav", dtype="float32")[0] for utt, _ in utterances]
    long = np.concatenate(pieces * 3)
    sf.write(tmp_path / "long.wav", long, 16000)
    proc = _predict(root / "smoke" / "fold1" / "best", "--audio", tmp_path / "long.wav", "--text", "a long talk",
                    "--max-full-seconds", "2", "--window-seconds", "1.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    windows = int(result["audio_info"]["handling"].split()[0])
    assert windows == int(np.ceil((len(long) / 16000 - 1.5) / 0.75)) + 1
    assert "windows of 1.5 s" in result["audio_info"]["handling"] and "averaged" in result["audio_info"]["handling"]
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)


def _tiny_ctc_recogniser(folder: Path) -> Path:
    """A local speech-recogniser folder: a random 1-layer Wav2Vec2 CTC model and its processor."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    folder.mkdir(parents=True)
    vocab = {"<pad>": 0, "|": 1, "<unk>": 2, "h": 3, "i": 4}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), pad_token="<pad>", unk_token="<unk>",
                                     word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=True)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0)
    model = Wav2Vec2ForCTC(config)
    with torch.no_grad():
        # The head ignores the audio and says "h" at every frame: greedy CTC decoding (repeats
        # merged) reads "h" whatever is heard, a transcript the test can know in advance.
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[vocab["h"]] = 5.0
    model.save_pretrained(folder)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
