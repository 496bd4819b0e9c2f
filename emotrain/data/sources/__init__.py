"""The ways into a prepared dataset, each yielding the same utterance records to one writer
(`emotrain.data.prepare`): `release` (an IEMOCAP_full_release tree), `hub` (anything
`datasets.load_dataset` takes: IEMOCAP mirrors on the Hub, or a local copy of one), `manifest`
(a CSV / JSONL manifest of any corpus, and EmoBox's published fold lists)."""
from __future__ import annotations

import time
from pathlib import Path

from emotrain.config import NUM_SHARDS_PER_GROUP, check_no_credentials

KINDS = ("auto", "release", "manifest", "emobox", "hub")


def detect_kind(source: str) -> str:
    """Which way in `source` is: a release tree, a manifest file, an EmoBox folder, else a Hub dataset."""
    from emotrain.data.sources.manifest import is_emobox_folder
    from emotrain.data.sources.release import find_sessions

    path = Path(source)
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~"))):
        # A Hub name is never absolute: this was meant as a local folder or file.
        raise FileNotFoundError(f"{source} does not exist: it holds no Session1..Session5 folders (a release), "
                                "is no CSV/JSONL manifest, no EmoBox folder, and not a Hub dataset name")
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".json"):
        return "manifest"
    if path.is_dir() and find_sessions(path):
        return "release"
    if path.is_dir() and is_emobox_folder(path):
        return "emobox"
    return "hub"


def prepare_source(source: str, out_dir: str | Path, *, kind: str = "auto", columns: dict[str, str] | None = None,
                   label_map: dict[str, str] | None = None, labels: list[str] | None = None,
                   download_root: str | None = None, asr: str | None = None, splits: list[str] | None = None,
                   num_shards: int = NUM_SHARDS_PER_GROUP, audio_format: str = "flac",
                   workers: int | None = None) -> dict:
    """`emotrain prepare SOURCE OUT`: scan the source, write the prepared layout; return the report."""
    from emotrain.data.prepare import output_folder, write_prepared

    check_no_credentials(source, "SOURCE")  # it is written into prepare_report.json and dataset.json
    if download_root is not None:
        check_no_credentials(download_root, "--download-root")
    started = time.perf_counter()
    with output_folder(out_dir):  # created now (fail fast), removed again if nothing gets written
        kind = detect_kind(source) if kind == "auto" else kind
        if kind == "release":
            from emotrain.data.sources.release import scan_release_records

            scan = scan_release_records(source)
        elif kind == "manifest":
            from emotrain.data.sources.manifest import scan_manifest

            scan = scan_manifest(source, columns=columns, label_map=label_map, labels=labels, asr=asr is not None)
        elif kind == "emobox":
            from emotrain.data.sources.manifest import scan_emobox

            scan = scan_emobox(source, download_root, label_map=label_map, labels=labels,
                               text_column=(columns or {}).get("text"), asr=asr is not None)
        elif kind == "hub":
            from emotrain.data.sources.hub import scan_hub

            scan = scan_hub(source, columns=columns, label_map=label_map, labels=labels, splits=splits,
                            asr=asr is not None)
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return write_prepared(scan, out_dir, num_shards=num_shards, audio_format=audio_format, workers=workers,
                              asr=asr, started=started)
