"""Corpora other than IEMOCAP, end to end: a 6-class manifest with its own train / validation / test
split trains, evaluates, predicts and reports with its own class names; an EmoBox folder trains on
its official folds (cross-validation over both)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emotrain.cli import main
from tests.integration.conftest import EMOTRAIN, REPO, run_train, subprocess_env, tiny_overrides
from tests.unit.test_sources import build_emobox

pytestmark = pytest.mark.slow

CLASSES = ("calm", "joyful", "furious", "fearful", "disgusted", "surprised")
"""Another corpus' label set (RAVDESS-like), in no order emotrain knows."""


def _six_class_manifest(root: Path) -> Path:
    """A manifest with relative paths, speakers and a predefined split: 6 classes, each a tone of its
    own pitch and a word of its own (learnable, not that it matters here)."""
    rng = np.random.default_rng(0)
    lines = ["audio,text,label,speaker,split"]
    for split, per_class, speakers in (("train", 4, ("A", "B")), ("dev", 1, ("C",)), ("test", 2, ("D",))):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                rel = f"clips/{split}_{name}_{i}.wav"
                t = np.arange(int(16000 * rng.uniform(0.5, 0.9))) / 16000
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / rel, (0.3 * np.sin(2 * np.pi * (150 + 60 * c) * t)).astype(np.float32), 16000)
                lines.append(f"{rel},it feels {name} today,{name},{speakers[i % len(speakers)]},{split}")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return root / "meta.csv"


def test_a_six_class_corpus_with_its_own_split_trains_evaluates_and_reports_its_class_names(tmp_path, monkeypatch):
    manifest = _six_class_manifest(tmp_path / "corpus")
    data = tmp_path / "prepared"
    assert main(["prepare", str(manifest), str(data), "--workers", "1", "--num-shards", "2"]) == 0
    run = tmp_path / "runs" / "six" / "fold1"
    proc = run_train(tiny_overrides(data, run, "experiment=six", "train.max_steps=6", "train.eval_every_steps=3",
                                    "data.batching=fixed", "train.checkpoint_every_steps=0"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    metrics = json.loads((run / "metrics.json").read_text())
    names = sorted(CLASSES)  # the label set from the data: sorted names (no order was given)
    assert list(metrics["test"]["per_class_recall"]) == names
    assert metrics["test"]["n"] == 12 and np.asarray(metrics["test"]["confusion"]).shape == (6, 6)
    assert metrics["validation"]["n"] == 6  # the corpus' own `dev` split, not a draw from train
    saved = json.loads((run / "best" / "emotion_model.json").read_text())
    assert saved["label_names"] == names
    assert "furious" in proc.stdout + proc.stderr  # the results table names its classes

    evaluated = subprocess.run([*EMOTRAIN, "evaluate", str(run / "best"), str(data), "--session", "3"], cwd=REPO,
                               env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(evaluated.stdout)["test"]  # group 3 = the `test` split: the run's own test set
    assert again["confusion"] == metrics["test"]["confusion"] and list(again["per_class_recall"]) == names

    clip = tmp_path / "corpus" / "clips" / "test_furious_0.wav"
    predicted = subprocess.run([*EMOTRAIN, "predict", str(run / "best"), "--audio", str(clip), "--text", "it feels"],
                               cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    result = json.loads(predicted.stdout)
    assert sorted(result["probabilities"]) == names and result["predicted"] in names

    # The report: its tables and its confusion figures carry the six names.
    import emotrain.plots as plots

    figure_labels = []
    real_confusion_figure = plots.confusion_figure

    def recording(confusion, labels, *args, **kwargs):
        figure_labels.append(list(labels))
        return real_confusion_figure(confusion, labels, *args, **kwargs)

    monkeypatch.setattr(plots, "confusion_figure", recording)
    assert main(["report", str(run.parent), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"recall {name}" in report for name in CLASSES), report[:2000]
    assert "predefined split" in report and "neutral" not in report
    assert figure_labels and all(labels == names for labels in figure_labels)


def test_an_emobox_folder_trains_on_its_official_folds(tmp_path):
    folder, downloads = build_emobox(tmp_path)
    data = tmp_path / "prepared"
    assert main(["prepare", str(folder), str(data), f"--download-root={downloads}", "--workers", "1",
                 "--num-shards", "1"]) == 0
    overrides = [o for o in tiny_overrides(data, Path("unused")) if not o.startswith("output_dir=")]
    command = [*EMOTRAIN, "cv", str(REPO / "configs" / "smoke.yaml"), *overrides, "model.variant=audio",
               "experiment=toybox", f"output_dir={tmp_path}/runs/{{experiment}}/fold{{fold}}", "train.max_steps=2",
               "data.batching=fixed", "train.batch_size=2", "train.checkpoint_every_steps=0"]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for fold, tested in ((1, 4), (2, 4)):  # no --folds: both of EmoBox's folds
        metrics = json.loads((tmp_path / "runs" / "toybox" / f"fold{fold}" / "metrics.json").read_text())
        assert metrics["test"]["n"] == tested
        assert list(metrics["test"]["per_class_recall"]) == ["happy", "sad", "neutral", "other"]
    log = (tmp_path / "runs" / "toybox" / "fold2" / "train.log").read_text()
    assert '"test_sessions": [2]' in log and '"train_sessions": [1]' in log
    assert "| toybox | audio | 2/2 |" in proc.stdout
    assert "EmoBox's official folds" in (tmp_path / "runs" / "toybox" / "report" / "report.md").read_text()


def test_a_corpus_without_transcripts_takes_them_from_a_speech_recogniser_at_prepare_time(tmp_path):
    from emotrain.config import load_config
    from emotrain.data.folds import check_config_fits_dataset
    from emotrain.data.shards import read_dataset_info
    from tests.integration.test_cv import _tiny_ctc_recogniser

    folder, downloads = build_emobox(tmp_path)
    asr = _tiny_ctc_recogniser(tmp_path / "asr")  # says "h" whatever it hears
    data = tmp_path / "prepared"
    assert main(["prepare", str(folder), str(data), f"--download-root={downloads}", f"--asr={asr}",
                 "--workers", "1", "--num-shards", "1"]) == 0
    import pyarrow.parquet as pq

    texts = [t for path in sorted(data.glob("fold*/*.parquet")) for t in pq.read_table(path).column("text").to_pylist()]
    assert texts == ["h"] * 8
    info = read_dataset_info(str(data))
    assert info.has_text and any("speech recogniser" in note for note in info.notes)
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"data.path={data}"])
    check_config_fits_dataset(cfg.data, cfg.model, info)  # fusion may train on it now
