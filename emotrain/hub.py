"""`emotrain push MODEL_DIR REPO_ID`: a run's `best/` folder to the Hugging Face Hub, as it is.

    emotrain push runs/smoke/fold1/best my-name/emotrain-smoke-fold1 [--private]

The folder is already what the Hub shows and transformers loads (`EmotionModel.save_pretrained`
writes config.json with `auto_map`, the modelling code, the weights and the processors; the recipe
writes the model card): pushing checks it is whole, names the files it uploads (the card, and
config.yaml: the run's config with its provenance, see README's "Sharing a model"), creates the
repository if needed and uploads the folder in one commit (`huggingface_hub.HfApi.upload_folder`). Credentials are huggingface_hub's
own: `HF_TOKEN`, or `hf auth login` beforehand.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from pathlib import Path

from emotrain.model.emotion_model import (
    CONFIG_FILE,
    FEATURE_EXTRACTOR_FILE,
    HF_CONFIG_FILE,
    PROCESSOR_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from emotrain.model.modeling_emotrain import REMOTE_CODE_FILES
from emotrain.train.model_card import CARD_FILE

IGNORED = [".*", "__pycache__/*", "*.pyc"]
"""Never uploaded: hidden files (an editor's, a partial write's) and Python caches."""


class PushError(ValueError):
    """A folder that is not a whole Hub-ready model folder, or an upload that failed: one line."""


def hub_folder_problems(folder: str | Path) -> list[str]:
    """What keeps `folder` from being a whole Hub-ready model folder (empty: nothing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    if not (folder / CONFIG_FILE).is_file():
        return [f"{folder} is not a model folder (no {CONFIG_FILE}): give a run's best/ folder"]
    if not (folder / HF_CONFIG_FILE).is_file():
        return [f"{folder} was written by an emotrain from before model folders were transformers folders (no "
                f"{HF_CONFIG_FILE}): emotrain predict and evaluate still load it; to share a model, train it with "
                "this emotrain (its best/ gets the code and the model card)"]
    needed = [WEIGHTS_FILE, CARD_FILE, *REMOTE_CODE_FILES]
    try:
        config = json.loads((folder / HF_CONFIG_FILE).read_text())
    except ValueError as err:
        return [f"{folder / HF_CONFIG_FILE} is not JSON ({err})"]
    variant = config.get("variant")
    if variant in ("fusion", "audio"):
        needed.append(FEATURE_EXTRACTOR_FILE)
    if variant in ("fusion", "text"):
        needed.append(TOKENIZER_FILE)
    if variant == "fusion":  # AutoProcessor's EmotrainProcessor: the only way to both inputs with transformers
        needed.append(PROCESSOR_FILE)
    problems = [f"{folder} has no {name}" + (" (the model card training writes)" if name == CARD_FILE else "")
                for name in needed if not (folder / name).is_file()]
    if not config.get("auto_map"):
        problems.append(f"{folder / HF_CONFIG_FILE} has no auto_map: transformers could not find the model's code")
    if not config.get("id2label"):
        problems.append(f"{folder / HF_CONFIG_FILE} has no id2label: the classes would have no names")
    return problems


def uploaded_files(folder: str | Path) -> list[str]:
    """The files of `folder` an upload sends (paths relative to it, sorted): all but IGNORED."""
    folder = Path(folder)
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return sorted(name for name in names if not any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED))


def push(folder: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
         api=None, announce: Callable[[list[str]], None] | None = None) -> str:
    """Upload the model folder `folder` to the Hub model repository `repo_id` (created if absent,
    private when `private`); returns the commit's URL. `api`: an `HfApi` (default: a new one).
    `announce`: called with `uploaded_files(folder)` once the folder is checked, before anything is sent.
    PushError (one line) for a folder that is not whole or an upload that fails."""
    problems = hub_folder_problems(folder)
    if problems:
        raise PushError("; ".join(problems))
    if announce is not None:
        announce(uploaded_files(folder))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        # private=None leaves a new repository to the Hub's default (public, or the organisation's setting).
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=commit_message or f"emotrain push {Path(folder)}",
                                   ignore_patterns=IGNORED)
    # The hub client raises its own HTTP errors, its HTTP library's network errors and OSError:
    # whichever, the user needs the repository and the reason in one line.
    except Exception as err:  # noqa: BLE001
        raise PushError(f"cannot push to {repo_id}: {type(err).__name__}: {' '.join(str(err).split())}") from None
    return str(getattr(commit, "commit_url", commit))
