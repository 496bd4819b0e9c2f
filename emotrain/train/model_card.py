"""The model card of a run's `best/` folder (`README.md`, as the Hugging Face Hub shows it).

    write_model_card(run.best, config=..., results=..., split=..., dataset=...)   # the recipe, after testing
    replace_card_section(card, CROSS_VALIDATION, text)                          # `emotrain report`

The card opens with the Hub's metadata (YAML front matter: library_name, pipeline_tag, tags,
metrics, model-index with the test results), then says what the model is, the data and protocol it
was trained and selected with, its validation and test metrics, how to load it (with transformers
alone, or with emotrain), and the run's resolved config as it may be shared (`shareable_config`: no
provenance, no output_dir, local paths reduced to their last component; the dataset named without
where it lies). `emotrain report` adds the cross-validation
table of the experiment the run belongs to (a section between markers, replaced on every report).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from emotrain.config import PROVENANCE_KEY

CARD_FILE = "README.md"
CROSS_VALIDATION = "cross-validation"
"""The section `emotrain report` writes (between `<!-- emotrain:cross-validation -->` markers)."""

VARIANT_TEXT = {
    "fusion": "audio and its transcript (a pretrained speech encoder and a pretrained text encoder, cross-modal "
              "attention both ways, statistics pooling, an MLP)",
    "audio": "audio only (a pretrained speech encoder, statistics pooling, an MLP)",
    "text": "the transcript only (a pretrained text encoder, statistics pooling, an MLP)",
}
PIPELINE_TAGS = {"audio": "audio-classification", "text": "text-classification"}
"""The Hub task whose pipeline runs the model. None for fusion: no transformers pipeline gives both
audio and transcript (its AutoProcessor and AutoModel do, as the card's usage shows)."""
TASK_TYPES = {**PIPELINE_TAGS, "fusion": "emotion-recognition"}
"""model-index's task of the test results (the Hub has no task for audio-and-text classification)."""
FOLD_KIND_TEXT = {
    "sessions": "leave-one-session-out cross-validation: fold k tests on session k and trains on the others",
    "groups": "leave-one-group-out cross-validation: fold k tests on group k and trains on the others",
    "split": "the corpus' predefined split: trained on `train`, tested on `test`",
    "emobox": "EmoBox's official folds: fold k tests on its fold_k test list and trains on its train list",
}

VALIDATION_TEXT = {
    "speakers": "speakers held out of the training groups",
    "fraction": "a random share of the training groups' utterances",
    "split": "the corpus' own validation split",
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- emotrain:{name} -->", f"<!-- /emotrain:{name} -->"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def metrics_table(results: dict[str, Any]) -> str:
    """Validation and test metrics (%) of one run, per-class recalls included."""
    splits = [(name, results[name]) for name in ("validation", "test") if results.get(name)]
    labels = list(splits[0][1]["per_class_recall"]) if splits else []
    header = ["split", "n", "WA", "UA", "macro-F1", *(f"recall {name}" for name in labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in splits:
        cells = [name, str(m["n"]), *(_percent(m[k]) for k in ("wa", "ua", "macro_f1")),
                 *(_percent(m["per_class_recall"].get(label)) for label in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LOCAL_PATH_KEYS = (("model", "audio_encoder"), ("model", "text_encoder"), ("model", "tokenizer"),
                   ("train", "resume"))
"""Settings that may name a local folder (else a Hub name, `tiny`, `auto`...): shown by their last component."""
LOCAL_PATH = re.compile(r"(?<![\w./~-])(?:[A-Za-z][\w+.-]*://|~|\.{1,2}/|/)[^\s,;()`'\"]*")
"""A path or URL in free text (absolute, home-relative, ./ or ../, or scheme://...); not a Hub name
(`owner/name`) nor the `/` of `audio/text`."""


def _last_component(path: str) -> str:
    name = PurePosixPath(path.rstrip("/")).name
    return name or "<local>"


def without_local_paths(text: str) -> str:
    """`text` with every local path or URL in it reduced to its last component."""
    return LOCAL_PATH.sub(lambda match: _last_component(match.group(0)), text)


def shareable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved config (config.yaml as read) as a public card shows it: without its
    provenance (machine, devices, start time, git commit) and output_dir, `data.path` and local
    folders in LOCAL_PATH_KEYS reduced to their last component."""
    shown = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()
             if key not in (PROVENANCE_KEY, "output_dir")}
    if isinstance(shown.get("data"), dict) and isinstance(shown["data"].get("path"), str):
        shown["data"]["path"] = _last_component(shown["data"]["path"])
    for section, key in LOCAL_PATH_KEYS:
        value = shown.get(section, {}).get(key) if isinstance(shown.get(section), dict) else None
        if isinstance(value, str) and LOCAL_PATH.fullmatch(value):
            shown[section][key] = _last_component(value)
    return shown


def public_dataset_name(source: str) -> str:
    """The dataset's name for the card, from dataset.json's `source` (which says where it was read)."""
    if source.startswith("IEMOCAP release"):
        return "IEMOCAP"
    if source.startswith("emotrain's synthetic corpus"):
        return "emotrain synthetic corpus"
    if source.startswith("EmoBox "):
        return " ".join(source.split()[:2])  # `EmoBox <dataset folder name>`
    return without_local_paths(source).strip() or "prepared data"


def front_matter(variant: str, results: dict[str, Any], dataset_name: str, name: str) -> str:
    """The Hub's metadata block. model-index holds the test results when the run has a test set."""
    meta: dict[str, Any] = {
        "library_name": "transformers",
        **({"pipeline_tag": PIPELINE_TAGS[variant]} if variant in PIPELINE_TAGS else {}),
        "tags": ["emotrain", "emotion-recognition", "speech-emotion-recognition", f"{variant}-model", "custom_code"],
        "metrics": ["accuracy", "recall", "f1"],
    }
    test = results.get("test")
    if test:
        metrics = [{"type": "accuracy", "name": "WA (accuracy)", "value": round(100 * test["wa"], 2)},
                   {"type": "recall", "name": "UA (mean per-class recall)", "value": round(100 * test["ua"], 2)},
                   {"type": "f1", "name": "macro-F1", "value": round(100 * test["macro_f1"], 2)}]
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": TASK_TYPES[variant], "name": "Emotion recognition"},
            "dataset": {"name": dataset_name, "type": "custom", "split": "test"},
            "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def usage_text(variant: str, max_text_tokens: int) -> str:
    """How to load and call the model with transformers alone, and with emotrain."""
    if variant == "audio":
        code = ("from transformers import pipeline\n\n"
                'classify = pipeline("audio-classification", model=MODEL, trust_remote_code=True)\n'
                'classify("clip.wav")  # or a 16 kHz mono numpy array: [{"label": ..., "score": ...}, ...]')
    elif variant == "text":
        code = ("from transformers import pipeline\n\n"
                'classify = pipeline("text-classification", model=MODEL, trust_remote_code=True)\n'
                f'classify("I can\'t believe it", top_k=None, truncation=True, max_length={max_text_tokens})')
    else:
        code = ("from transformers import AutoModel, AutoProcessor\n\n"
                "model = AutoModel.from_pretrained(MODEL, trust_remote_code=True).eval()\n"
                "processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)\n"
                "# waveform: 16 kHz mono (a numpy array); the processor gives input_values, attention_mask,\n"
                "# input_ids and text_attention_mask\n"
                'inputs = processor(audio=[waveform], text=["I can\'t believe it"], sampling_rate=16000, '
                f"max_length={max_text_tokens})\n"
                "probabilities = model(**inputs).logits.softmax(-1)  # columns: model.config.id2label")
    transcript = ' --text "I can\'t believe it"' if variant != "audio" else ""
    emotrain = f"emotrain predict MODEL_DIR --audio clip.wav{transcript}\nemotrain evaluate MODEL_DIR PREPARED_DATA --session 1"
    return "\n".join([
        "`MODEL` is this folder, or its Hub repository. The model's code ships with it (`trust_remote_code=True`"
        " runs `modeling_emotrain.py` from here): read it before running it. Nothing else from emotrain is needed.",
        "", "```python", code, "```", "",
        "With emotrain installed (long recordings in windows, transcripts by a speech recogniser with `--asr`):",
        "", "```bash", emotrain, "```",
    ])


def write_model_card(folder: str | Path, *, config: dict[str, Any], results: dict[str, Any],
                     split: dict[str, Any], dataset: Any) -> Path:
    """Write `folder/README.md` (atomically) for the run whose resolved `config` (best/config.yaml as
    read, provenance included: the card leaves out what is local, see `shareable_config`), `results`
    (metrics.json's validation and test), `split` (`FoldSplit.summary()`) and `dataset` (the prepared
    data's DatasetInfo) are given. Returns its path."""
    config = shareable_config(config)
    variant = config["model"]["variant"]
    data = config["data"]
    name = f"{config.get('experiment') or 'emotrain'}-fold{split['fold']}"
    dataset_name = public_dataset_name(dataset.source or "")
    labels = list(dataset.labels)
    test_groups = split.get("test_sessions") or ([split["test_session"]] if split.get("test_session") else [])
    protocol = [
        f"- Data: {dataset_name} (prepared at `{data['path']}`), {len(labels)} classes: {', '.join(labels)}.",
        f"- Folds: {FOLD_KIND_TEXT.get(dataset.fold_kind, dataset.fold_kind)}.",
        f"- This model: fold {split['fold']}, trained on group(s) {', '.join(map(str, split['train_sessions']))} "
        f"({split['num_train']} utterances), tested on group(s) {', '.join(map(str, test_groups)) or '–'} "
        f"({split.get('num_test') or 0} utterances); seed {split['seed']}.",
        f"- Validation ({split['num_validation']} utterances): "
        f"{VALIDATION_TEXT.get(split['validation'], split['validation'])}, never the test data; "
        "the checkpoint with the best validation UA was kept, and the test data scored once, at the end.",
        *(f"- Note: {without_local_paths(note)}" for note in dataset.notes),
        "- WA = accuracy; UA = mean of the per-class recalls (unweighted).",
    ]
    cv_start, cv_end = _markers(CROSS_VALIDATION)
    text = "\n".join([
        front_matter(variant, results, dataset_name, name),
        f"# {name}: speech emotion recognition ({variant})", "",
        f"Classifies an utterance's emotion ({', '.join(labels)}) from {VARIANT_TEXT[variant]}. "
        "Trained with emotrain.", "",
        "## Data and protocol", "", *protocol, "",
        "## Metrics (%)", "", metrics_table(results), "",
        cv_start, "(`emotrain report` on the experiment folder adds the cross-validation table here.)", cv_end, "",
        "## How to use", "", usage_text(variant, int(data.get("max_text_tokens", 64))), "",
        "Inputs: 16 kHz mono audio (the feature extractor normalises it; training cropped clips to "
        f"{data.get('max_audio_seconds')} s, evaluation scored them whole); transcripts truncated to "
        f"{data.get('max_text_tokens')} tokens.", "",
        "## Training configuration", "",
        "The run's resolved config (`config.yaml` in this folder, which also records how the run was produced; "
        "here without that, nor its local paths):", "",
        "```yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip("\n"), "```", "",
    ])
    return _write_atomically(Path(folder) / CARD_FILE, text)


def replace_card_section(card: str | Path, name: str, body: str) -> bool:
    """Put `body` between the card's `name` markers (replacing what was there); False when the card
    or its markers are absent (a card written before the section existed is left as it is)."""
    card = Path(card)
    if not card.is_file():
        return False
    text = card.read_text()
    start, end = _markers(name)
    if start not in text or end not in text:
        return False
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    _write_atomically(card, f"{before}{start}\n{body.strip()}\n{end}{after}")
    return True


def _write_atomically(path: Path, text: str) -> Path:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
    return path
