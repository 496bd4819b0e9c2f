"""A run's best/ folder is a Hub-ready transformers folder: it loads with the Auto classes and the
audio-classification pipeline where emotrain cannot be imported, and gives emotrain's own logits;
its model card; `emotrain report`'s cross-validation section; `emotrain push` (up to the upload)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from emotrain.config import ModelConfig, load_config, save_config
from emotrain.model import EmotionModel, build_model
from emotrain.model.modeling_emotrain import REMOTE_CODE_FILES
from emotrain.train.model_card import write_model_card
from emotrain.train.run_folder import RunFolder

VARIANTS = ("fusion", "audio", "text")
TEXTS = ["I can't believe you did that", "fine"]
PACKAGE = Path(__file__).resolve().parents[2] / "emotrain" / "model"


def _waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (5200, 3300)]


def _results(wa: float = 0.5, ua: float = 0.45) -> dict:
    metrics = {"wa": wa, "ua": ua, "macro_f1": 0.4, "n": 20,
               "per_class_recall": {"neutral": 0.5, "happy": 0.4, "sad": 0.3, "angry": 0.6}}
    return {"validation": {**metrics, "n": 12}, "test": metrics}


def _split(fold: int = 2) -> dict:
    return {"fold": fold, "seed": 42, "validation": "speakers", "train_sessions": [1, 3, 4, 5], "test_session": fold,
            "test_sessions": [fold], "num_train": 80, "num_validation": 12, "num_test": 20}


PROVENANCE = {"platform": "Linux-6.1-x86_64-with-secret-host", "device": "NVIDIA H100 80GB HBM3",
              "started": "2026-12-04T16:00:00+00:00", "git_commit": "0123456789abcdef"}
"""What training saves after the config in best/config.yaml: this machine's, never for a public card."""


def _save_best(run_dir: Path, model: EmotionModel, experiment: str = "hub", fold: int = 2) -> Path:
    """best/ as the recipe writes it: the export swapped in through the run folder, then the card.
    The config names absolute local paths and carries provenance, as a real run's does."""
    from emotrain.data.shards import IEMOCAP_INFO

    run = RunFolder(run_dir)
    home = run_dir.resolve() / "home-of-someone"
    cfg = load_config(None, [f"experiment={experiment}", f"model.variant={model.config.variant}",
                             f"data.fold={fold}", f"output_dir={run_dir.resolve()}", f"data.path={home}/prepared"])
    with run.writing_best() as folder:
        model.save_pretrained(folder, state_dict=model.state_dict())
        save_config(cfg, folder / "config.yaml", provenance=PROVENANCE)
    dataset = dataclasses.replace(IEMOCAP_INFO, source=f"IEMOCAP release at {home}/IEMOCAP_full_release",
                                  notes=(f"no transcripts ({home}/iemocap has no text column)",))
    write_model_card(run.best, config=yaml.safe_load((run.best / "config.yaml").read_text()), results=_results(),
                     split=_split(fold), dataset=dataset)
    return run.best


def _group_norm_wav2vec2(folder: Path) -> str:
    """A random tiny Wav2Vec2 normalised like wav2vec2-base (group norm over time in its first conv
    layer, post-norm transformer), saved without a preprocessor config: emotrain builds the standard
    extractor, which for such a model says `return_attention_mask: false`."""
    from transformers import Wav2Vec2Model

    from emotrain.model.encoders import tiny_audio_config

    config = tiny_audio_config(ModelConfig(tiny_hidden_size=16, tiny_layers=1))
    config.feat_extract_norm, config.do_stable_layer_norm = "group", False
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[EmotionModel, Path]]:
    """A tiny model of each variant (hidden sizes of a few units) and its best/ folder; `audio-group`:
    an audio model over a group-norm encoder."""
    root = tmp_path_factory.mktemp("hub")
    models = {}
    encoders = {variant: {} for variant in VARIANTS}
    encoders["audio-group"] = {"audio_encoder": _group_norm_wav2vec2(root / "w2v-group")}
    for name, encoder in encoders.items():
        torch.manual_seed(1)
        model = build_model(ModelConfig(variant=name.split("-")[0], hidden_size=16, cross_attention_heads=4,
                                        classifier_hidden_size=16, tiny_hidden_size=16, tiny_layers=1,
                                        **encoder)).eval()
        models[name] = (model, _save_best(root / name, model))
    return models


def _emotrain_logits(model: EmotionModel, waves: list[np.ndarray], texts: list[str]) -> torch.Tensor:
    """What emotrain's model gives for these inputs, prepared by its own processors."""
    feature_extractor, tokenizer = model.processors()
    inputs = {}
    if feature_extractor is not None:
        audio = feature_extractor(waves, sampling_rate=16000, padding=True, return_attention_mask=True,
                                  return_tensors="pt")
        inputs.update(input_values=audio["input_values"], audio_lengths=audio["attention_mask"].sum(-1))
    if tokenizer is not None:
        inputs.update(tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False))
    with torch.no_grad():
        return model(**inputs).logits


# Runs where emotrain cannot be imported: only the folder, torch and transformers.
WITHOUT_EMOTRAIN = r"""
import json, sys
sys.modules["emotrain"] = None  # the package is installed in this environment: make it unimportable
try:
    import emotrain
    raise SystemExit("emotrain is importable")
except ImportError:
    pass
import numpy as np, torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoProcessor, AutoTokenizer, pipeline

folders, waves, texts = json.load(open("inputs.json"))
waves = [np.asarray(w, dtype=np.float32) for w in waves]
out = {}
for variant, folder in folders.items():
    kind = variant.split("-")[0]  # audio-group: an audio model
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    if kind == "fusion":  # the folder's own processor: both inputs at once
        inputs = processor(audio=waves, text=texts, sampling_rate=16000)
    elif kind == "audio":
        extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
        inputs = extractor(waves, sampling_rate=16000, padding=True, return_tensors="pt")
    else:
        inputs = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)(texts, padding=True, return_tensors="pt")
    out[variant + "-processor"] = type(processor).__name__
    with torch.no_grad():
        logits = model(**inputs).logits
    out[variant] = {"class": type(model).__name__, "labels": config.id2label, "logits": logits.tolist()}
    if variant == "audio":
        classify = pipeline("audio-classification", model=folder, trust_remote_code=True)
        out["pipeline"] = classify(waves[0], top_k=None)
    if variant == "text":
        classify = pipeline("text-classification", model=folder, trust_remote_code=True)
        out["text-pipeline"] = classify(texts[0], top_k=None)
    if variant == "audio-group":  # each utterance alone (no padding), and both in a padded pipeline batch
        with torch.no_grad():
            out[variant]["alone"] = [model(**extractor(w, sampling_rate=16000, return_tensors="pt")).logits[0].tolist()
                                     for w in waves]
        classify = pipeline("audio-classification", model=folder, trust_remote_code=True)
        out["group-pipeline-batched"] = classify(waves, top_k=None, batch_size=2)
        out["group-pipeline-alone"] = [classify(w, top_k=None) for w in waves]
json.dump(out, open("outputs.json", "w"))
"""


@pytest.fixture(scope="module")
def transformers_outputs(saved, tmp_path_factory) -> dict:
    """What WITHOUT_EMOTRAIN gives for every saved folder (one interpreter for all: its start is slow)."""
    workdir = tmp_path_factory.mktemp("without-emotrain")
    folders = {variant: str(folder) for variant, (_, folder) in saved.items()}
    (workdir / "inputs.json").write_text(json.dumps([folders, [w.tolist() for w in _waves()], TEXTS]))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    proc = subprocess.run([sys.executable, "-c", WITHOUT_EMOTRAIN], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "outputs.json").read_text())


def test_best_loads_with_transformers_alone_and_gives_emotrains_logits(saved, transformers_outputs):
    waves, out = _waves(), transformers_outputs
    for variant, (model, _) in saved.items():
        assert out[variant]["class"] == "EmotrainForEmotionClassification"
        assert list(out[variant]["labels"].values()) == list(model.label_names)
        expected = _emotrain_logits(model, waves, TEXTS)
        torch.testing.assert_close(torch.tensor(out[variant]["logits"]), expected, atol=1e-5, rtol=1e-4)
    assert out["fusion-processor"] == "EmotrainProcessor"
    assert out["audio-processor"] == "Wav2Vec2FeatureExtractor" and out["text-processor"] == "BertTokenizer"
    # The pipelines: the labels with emotrain's probabilities for the first input alone.
    for variant, key in (("audio", "pipeline"), ("text", "text-pipeline")):
        model = saved[variant][0]
        alone = _emotrain_logits(model, waves[:1], TEXTS[:1]).softmax(-1)[0]
        scores = {row["label"]: row["score"] for row in out[key]}
        assert set(scores) == set(model.label_names)
        for index, label in enumerate(model.label_names):
            assert scores[label] == pytest.approx(float(alone[index]), abs=1e-5), (variant, label)


def test_a_group_norm_model_gets_the_padding_mask_from_transformers_alone(saved, transformers_outputs):
    """wav2vec2-base's case, batched by a transformers user: the saved feature extractor gives the
    attention mask by default, so the padded shorter utterance scores as it does alone."""
    folder = saved["audio-group"][1]
    assert json.loads((folder / "preprocessor_config.json").read_text())["return_attention_mask"] is True
    out = transformers_outputs["audio-group"]
    torch.testing.assert_close(torch.tensor(out["logits"]), torch.tensor(out["alone"]), atol=1e-5, rtol=1e-4)
    batched, alone = transformers_outputs["group-pipeline-batched"], transformers_outputs["group-pipeline-alone"]
    for batch_scores, alone_scores in zip(batched, alone, strict=True):
        expected = {row["label"]: row["score"] for row in alone_scores}
        assert {row["label"]: pytest.approx(row["score"], abs=1e-5) for row in batch_scores} == expected
    # Control: the two utterances score differently (the comparison is not trivial).
    assert not torch.allclose(torch.tensor(out["alone"][0]), torch.tensor(out["alone"][1]), atol=1e-4)


def test_the_shipped_code_imports_only_torch_transformers_and_itself():
    allowed = {"__future__", "typing", "torch", "transformers"}
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.ImportFrom):  # relative: must be a shipped sibling
                assert f"{node.module}.py" in REMOTE_CODE_FILES, (name, node.module)
                continue
            else:
                continue
            assert roots <= allowed, (name, roots)


def test_the_folder_holds_what_the_hub_needs_and_its_card(saved):
    model, folder = saved["fusion"]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json", "tokenizer_config.json",
            "processor_config.json", "emotion_model.json", "config.yaml", *REMOTE_CODE_FILES} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_emotrain.EmotrainForEmotionClassification"
    assert config["label2id"] == {name: i for i, name in enumerate(model.label_names)}
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["model-index"][0]["name"] == "hub-fold2"
    assert "emotrain" in meta["tags"]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"accuracy": 50.0, "recall": 45.0, "f1": 40.0}
    assert "fold 2, trained on group(s) 1, 3, 4, 5" in body and "| test | 20 | 50.0 | 45.0 | 40.0 |" in body
    assert "| validation | 12 |" in body and "AutoProcessor.from_pretrained(MODEL" in body  # how to call fusion
    assert "experiment: hub" in body and "leave-one-session-out" in body
    assert 'pipeline("audio-classification"' in (saved["audio"][1] / "README.md").read_text()


def test_only_unimodal_models_advertise_the_pipeline_that_runs_them(saved):
    """A fusion model needs input_ids beside the audio: no pipeline gives them, so its card names no
    pipeline_tag and its config maps no task Auto class (AutoModel and AutoProcessor load it)."""
    expected = {"fusion": (None, set()), "audio": ("audio-classification", {"AutoModelForAudioClassification"}),
                "text": ("text-classification", {"AutoModelForSequenceClassification"})}
    for variant, (tag, task_classes) in expected.items():
        folder = saved[variant][1]
        meta = yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])
        assert meta.get("pipeline_tag") == tag, variant
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        assert set(auto_map) - {"AutoConfig", "AutoModel"} == task_classes, variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_card_names_no_local_path_nor_the_machine(saved, variant):
    folder = saved[variant][1]
    card = (folder / "README.md").read_text()
    for local in (str(folder.parent.resolve()), "home-of-someone", *PROVENANCE.values(), "provenance", "output_dir"):
        assert local not in card, local
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "IEMOCAP"
    shown = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert shown["data"]["path"] == "prepared" and shown["experiment"] == "hub"
    assert "no transcripts (iemocap has no text column)" in card  # a note keeps its sense, not its path
    # best/config.yaml itself keeps everything (emotrain predict reads it; README says it is uploaded).
    kept = yaml.safe_load((folder / "config.yaml").read_text())
    assert kept["provenance"] == PROVENANCE and kept["output_dir"] == str(folder.parent.resolve())


def test_the_card_names_the_dataset_by_its_name():
    from emotrain.train.model_card import public_dataset_name, shareable_config

    assert public_dataset_name("emotrain's synthetic corpus (`emotrain synth`, seed 3) in the IEMOCAP release "
                               "layout at /home/me/synth: generated signals") == "emotrain synthetic corpus"
    assert public_dataset_name("EmoBox iemocap (/home/me/emobox/iemocap), audio under /data") == "EmoBox iemocap"
    assert public_dataset_name("manifest /home/me/lists/train.csv") == "manifest train.csv"
    assert public_dataset_name("someone/iemocap-mirror (audio layout)") == "someone/iemocap-mirror (audio layout)"
    shown = shareable_config({"model": {"audio_encoder": "/home/me/w2v", "text_encoder": "roberta-base"},
                              "train": {"resume": "auto"}, "data": {"path": "s3://bucket/prepared/"}})
    assert shown == {"model": {"audio_encoder": "w2v", "text_encoder": "roberta-base"}, "train": {"resume": "auto"},
                     "data": {"path": "prepared"}}


def test_report_adds_the_cross_validation_table_to_each_card(saved, tmp_path):
    from emotrain.report import build_report

    model = saved["audio"][0]
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "cv.json").write_text(json.dumps({"experiment": "exp", "variant": "audio", "config": "x.yaml",
                                                    "folds": [1, 2], "seeds": [42]}))
    for fold, ua in ((1, 0.6), (2, 0.4)):
        run_dir = experiment / f"fold{fold}"
        _save_best(run_dir, model, experiment="exp", fold=fold)
        shutil.copy(run_dir / "best" / "config.yaml", run_dir / "config.yaml")
        (run_dir / "metrics.json").write_text(json.dumps({**_results(ua=ua), "best_step": 3}))
    build_report([experiment], tmp_path / "report", plots=False)
    for fold in (1, 2):
        card = (experiment / f"fold{fold}" / "best" / "README.md").read_text()
        assert f"This model is fold {fold} (seed 42) of the 2 folds below" in card
        assert "| 1 | session 1 | 42 | 20 | 50.0 | 60.0 |" in card and "| 2 | session 2 | 42 | 20 | 50.0 | 40.0 |" in card
        assert "UA 50.0 ± 14.1" in card
        assert card.count("<!-- emotrain:cross-validation -->") == 1
    # Reported again: the section is replaced, not added twice.
    build_report([experiment], tmp_path / "report", plots=False)
    assert (experiment / "fold1" / "best" / "README.md").read_text().count("This model is fold 1") == 1


class FakeHfApi:
    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": "https://hub.example/me/repo/commit/1"})()


def test_push_checks_the_folder_then_creates_the_repo_and_uploads_it(saved, monkeypatch, capsys):
    import huggingface_hub

    from emotrain.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    folder = saved["audio"][1]
    assert main(["push", str(folder), "me/repo", "--private"]) == 0
    assert FakeHfApi.calls[0] == ("create_repo", "me/repo", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = FakeHfApi.calls[1][1]
    assert upload["repo_id"] == "me/repo" and upload["folder_path"] == str(folder) and upload["repo_type"] == "model"
    out = capsys.readouterr().out
    assert "https://hub.example/me/repo/commit/1" in out
    # One line names every file sent, before the upload: the card and config.yaml among them.
    listing = [line for line in out.splitlines() if line.startswith("uploading to me/repo: ")]
    assert len(listing) == 1
    assert listing[0].removeprefix("uploading to me/repo: ").split(", ") == sorted(
        p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert {"README.md", "config.yaml", "model.safetensors"} <= set(listing[0].split(": ")[1].split(", "))


@pytest.mark.parametrize("damage, expect", [
    (lambda f: (f / "README.md").unlink(), "has no README.md"),
    (lambda f: (f / "modeling_emotrain.py").unlink(), "has no modeling_emotrain.py"),
    (lambda f: (f / "config.json").unlink(), "emotrain predict and evaluate still load it"),
    (lambda f: (f / "processor_config.json").unlink(), "has no processor_config.json"),
], ids=["no-card", "no-code", "old-folder", "fusion-without-processor"])
def test_push_refuses_a_folder_that_is_not_whole_in_one_line(saved, tmp_path, monkeypatch, capsys, damage, expect):
    import huggingface_hub

    from emotrain.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    folder = tmp_path / "best"
    shutil.copytree(saved["fusion"][1], folder)
    damage(folder)
    assert main(["push", str(folder), "me/repo"]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err
    assert FakeHfApi.calls == []


def test_a_folder_from_before_config_json_still_loads_with_emotrain(saved, tmp_path):
    """The old layout: encoder configs and processors in subfolders, no config.json, no code, no card."""
    model, folder = saved["fusion"]
    old = tmp_path / "best"
    shutil.copytree(folder, old)
    config = EmotionModel.from_pretrained(folder).transformers_config()
    config.audio_config.save_pretrained(old / "audio_encoder")
    config.text_config.save_pretrained(old / "text_encoder")
    (old / "feature_extractor").mkdir()
    shutil.move(old / "preprocessor_config.json", old / "feature_extractor")
    (old / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(old / name, old / "tokenizer")
    for name in ("config.json", "README.md", *REMOTE_CODE_FILES):
        (old / name).unlink()
    loaded = EmotionModel.from_pretrained(old).eval()
    torch.testing.assert_close(_emotrain_logits(loaded, _waves(), TEXTS), _emotrain_logits(model, _waves(), TEXTS),
                               atol=0, rtol=0)
