"""Checkpoint folders: atomic save, journaled replacement, crash recovery, `resume=auto`, rotation.

This is the folder store, torch-free; what goes into a folder is the training state
(`emotrain.train.state.TrainingState.save`, which calls `partial_dir`, `finalize` and `rotate`).

    output_dir/checkpoints/
      step-000200/           Accelerate state (model, optimizer, scaler, RNG of every rank),
                             stream-rank{r}.json (data position of every rank), loop_state.json,
                             config.yaml, manifest.json (size and sha256 of every file above),
                             and COMPLETE, written last
      .partial-step-000400/  being written: never picked by resume
      .replaced-step-000200/ the previous step-000200 while a new one takes its place (journal)
      .deleting-step-000100/ being deleted: renamed here first, so a deletion cut short is provably ours

Saving writes into a `.partial-` folder on every rank (DeepSpeed's `save_state` is a collective, so
all ranks call it), then the main process adds the loop state, config and `COMPLETE` marker and
renames the folder into place. A crash at any moment leaves either a complete folder or one that
`latest_checkpoint` ignores. Folders are named by optimizer step, not by Accelerate's automatic
counter (which `load_state` does not restore).

Save order, not step order. `COMPLETE` holds `{"step": 200, "sequence": 7}`: the sequence is one
more than the highest in the checkpoints folder at save time (a marker in the old format, a bare
step number, counts as sequence 0). A run that resumed from an older checkpoint (or started afresh
with `resume=never` in an old folder) writes lower steps than the abandoned branch's folders, but
higher sequences, so:
  - `latest_checkpoint` / `resume=auto` pick the highest (sequence, step): the branch written last,
    never the abandoned one;
  - `rotate` keeps the `keep_last` most recently *written* checkpoints (so never the one just
    written) and the best step(s), and deletes the rest, the abandoned branch included.
Until the new branch has saved once, its sequence numbers cannot say which branch is current: so
choosing `resume=never` or an explicit older checkpoint marks every checkpoint written after it
`ABANDONED` at once (`abandon_after`), and neither `resume=auto` nor `rotate`'s recency count
them; `rotate` deletes them (never the best step's). Choosing an abandoned checkpoint explicitly
revives it and those written before it, its branch (`revive_until`).

Replacing a step that exists already (a rerun that saves the same step) is journaled, so a crash
never loses that step: rename the old folder aside to `.replaced-step-NNNNNN`, rename the partial
into place, delete the aside folder. `recover` (main process, before choosing what to resume;
`resolve_resume` calls it) finishes or undoes whatever a crash interrupted:
  - an aside folder whose step folder exists: the replacement was done, the aside is deleted;
  - an aside folder without its step folder: a complete partial of that step is renamed into place
    (then the aside is deleted), otherwise the aside is renamed back;
  - a complete partial folder (it has `COMPLETE`, which the main process writes only after every
    rank finished writing) is published: renamed into place (journaled if the step folder exists).
Incomplete partial folders are left for `rotate` to delete. A folder is deleted by renaming it to
`.deleting-<its name>` first (atomic, made durable), then removing it: a deletion cut short leaves
only a `.deleting-` folder, which `recover` and `rotate` finish, and never a `step-*`,
`.partial-` or `.replaced-` folder with part of its files. So an aside folder is never one whose
deletion was cut short, and `recover` only ever restores a whole one. A `step-*` folder without a
readable `COMPLETE` marker (or loop state) is then never ours mid-deletion: a checkpoint still being
copied in, one whose marker a sync tool skipped, or one an emotrain before the rename-first deletion
left half-deleted. It is never loaded, rotation and recovery leave it alone (only a save of the same
step replaces it, as it replaces any folder of that name), and `recover` warns once per start.

Damage after the save. `manifest.json` records every file of the checkpoint (relative path, size,
sha256), written by the main process after every rank finished writing and before `COMPLETE` (on a
shared filesystem it covers every rank's files, DeepSpeed's shards too). `checkpoint_problem`
verifies it before a checkpoint is trusted: its files must be exactly those listed (a file added
since is damage too), with their sizes and hashes. `resume=auto` falls back to the newest intact
checkpoint, saying so, and marks the damaged ones written after it `ABANDONED` (as choosing that
older checkpoint explicitly would: they are never verified again, and the next save rotates them
away); an explicit `train.resume=<folder>` that is damaged is a `ResumeError`.
A checkpoint written before the manifest existed is not hash-checked (the strict load in
`emotrain.train.state` still is), except a DeepSpeed one, which is refused: DeepSpeed loads its
files with `torch.load(weights_only=False)`, and only the recorded hashes say they are the files
that were saved.

What the manifest costs: hashing reads the whole checkpoint once more at each save, on the main
process while the other ranks wait at the save's last barrier (the files were just written, so
often from the page cache), once more when a run resumes from it, and once more for the best
checkpoint a run loads at its end. The files are hashed in parallel threads (`_sha256_of`).
bench/checkpoint_io.py measures both on a given machine and model (results in bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple

COMPLETE = "COMPLETE"
ABANDONED = "ABANDONED"
"""In a checkpoint of a branch given up (a run restarted from an older checkpoint, or afresh)."""
LOOP_STATE = "loop_state.json"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
_UNLISTED = {COMPLETE, ABANDONED, MANIFEST}
"""Top-level files a manifest does not list: the markers are written after it, and it is itself."""
_PARTIAL_PREFIX = ".partial-"
_ASIDE_PREFIX = ".replaced-"
_DELETING_PREFIX = ".deleting-"
_NAME = re.compile(r"^step-(\d{6,})$")
_ANY_NAME = re.compile(r"^(\.partial-|\.replaced-)?step-(\d{6,})$")  # every folder a save or a replacement makes
_DELETING_NAME = re.compile(r"^\.deleting-(\.partial-|\.replaced-)?step-\d{6,}$")  # what `_delete` renames them to

log = logging.getLogger("emotrain.train")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def partial_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """Where every rank writes checkpoint `step` before it is complete."""
    return Path(checkpoints_dir) / f"{_PARTIAL_PREFIX}{checkpoint_name(step)}"


def aside_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """Where the previous checkpoint `step` waits while a new one replaces it."""
    return Path(checkpoints_dir) / f"{_ASIDE_PREFIX}{checkpoint_name(step)}"


def stream_state_path(folder: str | Path, rank: int) -> Path:
    """Where rank `rank`'s data-stream position lives in a checkpoint folder."""
    return Path(folder) / f"stream-rank{rank}.json"


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON durably: to a temporary name, fsync, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (names created, renamed, deleted) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The COMPLETE marker: what makes a folder a checkpoint, and when it was written.


class Marker(NamedTuple):
    step: int
    sequence: int
    """Save order in the checkpoints folder: 1 + the highest sequence present at save time."""


def read_marker(folder: str | Path) -> Marker | None:
    """The folder's COMPLETE marker, or None if it has none (or an unreadable one: not complete).
    The old format, a bare step number, counts as sequence 0, so folders written before keep working."""
    try:
        data = json.loads((Path(folder) / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, int) and not isinstance(data, bool):
        return Marker(step=data, sequence=0)
    if isinstance(data, dict) and isinstance(data.get("step"), int) and isinstance(data.get("sequence"), int):
        return Marker(step=data["step"], sequence=data["sequence"])
    return None


def _not_a_checkpoint(folder: Path) -> str | None:
    """Why folder `folder` is not a complete checkpoint (marker and loop state), or None if it is one."""
    if not (folder / COMPLETE).exists():
        return f"no {COMPLETE} marker"
    if read_marker(folder) is None:
        return f"its {COMPLETE} marker is unreadable"
    return None if (folder / LOOP_STATE).is_file() else f"no {LOOP_STATE}"


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and _not_a_checkpoint(folder) is None


def _next_sequence(checkpoints_dir: Path) -> int:
    """1 + the highest sequence of any marked folder here: published, partial or set aside, so a
    folder that `recover` will restore later can never outrank what is saved now."""
    highest = 0
    for child in checkpoints_dir.iterdir():
        if _ANY_NAME.match(child.name) and (marker := read_marker(child)) is not None:
            highest = max(highest, marker.sequence)
    return highest + 1


# ---------------------------------------------------------------------------------------------
# The manifest: every file of a checkpoint as it was saved, checked before the checkpoint is trusted.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_of(folder: Path, names: list[str]) -> dict[str, str]:
    """{name: sha256} of files in `folder`, hashed in parallel threads (hashlib releases the GIL on
    large buffers), so several files are read at once where the storage allows it."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1, 8))) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(folder / name), names)))


def _listed_files(folder: Path) -> list[str]:
    """Every file under `folder` a manifest lists, as relative POSIX paths, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and not (path.parent == folder and path.name in _UNLISTED))


def write_manifest(folder: str | Path) -> None:
    """Record the size and sha256 of every file of checkpoint `folder` in `manifest.json`. Main
    process, once per save, after every rank finished writing (the other ranks wait meanwhile):
    hashing reads the whole checkpoint once more, just written and so often from the page cache
    (bench/checkpoint_io.py measures it)."""
    folder = Path(folder)
    names = _listed_files(folder)
    digests = _sha256_of(folder, names)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": digests[name]} for name in names}
    write_json(folder / MANIFEST, {"version": 1, "files": files})


def _read_manifest(folder: Path) -> dict[str, dict] | None:
    """The manifest's files, None if the checkpoint has no manifest; ValueError if it is unreadable."""
    try:
        data = read_json(folder / MANIFEST)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({err.__class__.__name__})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()):
        raise ValueError(f"{MANIFEST} is not a manifest of files with their size and sha256")
    return files


def _file_problem(folder: Path, name: str, recorded: dict) -> str | None:
    """Whether file `name` still has the size the manifest recorded (the cheap check)."""
    path = folder / name
    if not path.exists():
        return f"{name}: missing"
    if not path.is_file():
        return f"{name}: {'a directory' if path.is_dir() else 'not a regular file'} in place of the file"
    size = path.stat().st_size
    return None if size == recorded["size"] else f"{name}: {size} bytes, {recorded['size']} recorded"


def _written_by_deepspeed(folder: Path) -> bool:
    try:
        return read_json(folder / LOOP_STATE).get("distributed_type") == "DEEPSPEED"
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why checkpoint `folder` must not be loaded, as the end of "checkpoint step-N ...", or None.

    Its files must be exactly those `manifest.json` recorded: sizes first (cheap: a truncated or
    missing file is found without reading anything), then no file it does not list (one added
    since the save, which Accelerate or DeepSpeed might load), then the sha256 of each, which reads
    the whole checkpoint again: paid once per resume (and for the best checkpoint at the end of a
    run), as much as the hashing at each save (`write_manifest`; bench/checkpoint_io.py measures
    both). Without a manifest (written before it existed) nothing can be compared, and only a
    DeepSpeed checkpoint is refused (see the module docstring)."""
    folder = Path(folder)
    try:
        files = _read_manifest(folder)
    except ValueError as err:
        return f"is damaged ({err})"
    if files is None:
        if _written_by_deepspeed(folder):
            return (f"is refused (a DeepSpeed checkpoint without {MANIFEST}, written before emotrain recorded "
                    "the hashes of its files: DeepSpeed loads them with torch.load(weights_only=False), which "
                    "runs any code a tampered file holds, so only DeepSpeed checkpoints whose files match the "
                    "hashes recorded at save are resumed)")
        return None
    for name, recorded in files.items():
        if problem := _file_problem(folder, name, recorded):
            return f"is damaged ({problem})"
    for name in _listed_files(folder):
        if name not in files:
            return f"is damaged ({name}: not in the manifest written at save)"
    digests = _sha256_of(folder, sorted(files))
    for name, recorded in files.items():
        if digests[name] != recorded["sha256"]:
            return f"is damaged ({name}: its sha256 differs from the one recorded at save)"
    return None


def _delete(folder: Path) -> None:
    """Delete a folder of the store (step, partial or aside): rename it to `.deleting-<name>`, make
    the rename durable, then remove it. Cut short, what is left is a `.deleting-` folder that only a
    deletion makes (`_finish_deletions` removes it), never a folder that is partly deleted under a
    name `recover`, `rotate` or `resume` would act on."""
    doomed = folder.with_name(_DELETING_PREFIX + folder.name)
    if doomed.exists():  # (an earlier deletion of a folder of the same name, cut short)
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Publishing a partial folder, and recovering from a crash in the middle of it.


def _publish(checkpoints_dir: Path, step: int) -> Path:
    """Rename the complete partial folder of `step` into place. If the step folder exists, replace it
    through the journal: old folder aside, partial into place, aside deleted. Every state between two
    renames is one `recover` completes."""
    partial = partial_dir(checkpoints_dir, step)
    final = checkpoints_dir / checkpoint_name(step)
    aside = aside_dir(checkpoints_dir, step)
    if aside.exists():  # debris of an earlier replacement that was never recovered: superseded now
        _delete(aside)
    if final.exists():  # the same step saved again (e.g. a rerun that resumed exactly here)
        os.rename(final, aside)
        fsync_dir(checkpoints_dir)
    os.rename(partial, final)
    fsync_dir(checkpoints_dir)
    if aside.exists():
        _delete(aside)
    return final


def finalize(checkpoints_dir: str | Path, step: int, loop_state: dict, config_yaml: str) -> Path:
    """Main process only, after every rank has written into the partial folder: mark and publish it."""
    checkpoints_dir = Path(checkpoints_dir)
    partial = partial_dir(checkpoints_dir, step)
    write_json(partial / LOOP_STATE, loop_state)
    (partial / CONFIG).write_text(config_yaml)
    write_manifest(partial)  # every rank has written (the caller waited): it lists every rank's files
    # The marker is written last, atomically: with it, the folder is a checkpoint.
    write_json(partial / COMPLETE, {"step": step, "sequence": _next_sequence(checkpoints_dir)})
    fsync_dir(partial)
    return _publish(checkpoints_dir, step)


def _recover_replacement(checkpoints_dir: Path, step: int) -> str:
    """Finish or undo the replacement of `step` that left its aside folder behind. The aside folder
    is whole: a deletion renames a folder away before removing anything (`_delete`), so it is what
    the replacement set aside, and rolling back restores exactly that (a `step-*` folder that was
    not a complete checkpoint comes back as it was: left alone, never loaded)."""
    final = checkpoints_dir / checkpoint_name(step)
    aside = aside_dir(checkpoints_dir, step)
    partial = partial_dir(checkpoints_dir, step)
    if final.exists():  # the new folder was in place; only deleting the old one was cut short
        _delete(aside)
        return f"deleted {aside.name}: {final.name} had replaced it"
    if _is_complete(partial):  # cut short between the two renames: roll forward
        os.rename(partial, final)
        fsync_dir(checkpoints_dir)
        _delete(aside)
        return f"renamed {partial.name} to {final.name} (interrupted replacement rolled forward)"
    os.rename(aside, final)  # the new folder never got complete: roll back
    fsync_dir(checkpoints_dir)
    return f"renamed {aside.name} back to {final.name} (interrupted replacement rolled back)"


def _steps_named(checkpoints_dir: Path, prefix: str) -> list[int]:
    steps = []
    for child in checkpoints_dir.iterdir():
        match = _ANY_NAME.match(child.name)
        if match and (match.group(1) or "") == prefix and child.is_dir():
            steps.append(int(match.group(2)))
    return sorted(steps)


def _finish_deletions(checkpoints_dir: Path) -> list[Path]:
    """Remove the `.deleting-` folders deletions cut short left: only `_delete` makes that name, so
    these and nothing else are provably ours to remove. Returns them."""
    doomed = sorted(child for child in checkpoints_dir.iterdir()
                    if _DELETING_NAME.match(child.name) and child.is_dir())
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def _warn_incomplete(checkpoints_dir: Path) -> None:
    """Say once per start which `step-*` folders are ignored: a save publishes only complete folders
    and a deletion renames them away first, so such a folder is not one of ours half-done (a
    checkpoint being copied in, one whose marker a sync tool skipped, one an older emotrain left
    half-deleted): never loaded; not deleted here (a save of the same step would replace it)."""
    for step in _steps_named(checkpoints_dir, ""):
        folder = checkpoints_dir / checkpoint_name(step)
        if reason := _not_a_checkpoint(folder):
            log.warning("%s is not a complete checkpoint (%s): ignored, never resumed nor rotated away "
                        "(copy it in whole, or delete it yourself)", folder, reason)


def recover(checkpoints_dir: str | Path) -> list[str]:
    """Main process only, before choosing what to resume: complete or undo what a crash interrupted
    (see the module docstring). Returns what was done, one line each, and logs it."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    done = [_recover_replacement(checkpoints_dir, step) for step in _steps_named(checkpoints_dir, _ASIDE_PREFIX)]
    done += [f"deleted {folder.name}: its deletion was cut short" for folder in _finish_deletions(checkpoints_dir)]
    for step in _steps_named(checkpoints_dir, _PARTIAL_PREFIX):
        # COMPLETE is written after every rank finished writing: the folder is a whole checkpoint.
        if _is_complete(partial_dir(checkpoints_dir, step)):
            _publish(checkpoints_dir, step)
            done.append(f"published the complete {partial_dir(checkpoints_dir, step).name} as {checkpoint_name(step)}")
    for line in done:
        log.warning("checkpoint recovery: %s", line)
    _warn_incomplete(checkpoints_dir)
    return done


# ---------------------------------------------------------------------------------------------
# Finding, choosing and rotating checkpoints.


class Saved(NamedTuple):
    """A complete checkpoint; tuples sort in the order they were written."""

    sequence: int
    step: int
    folder: Path


def saved_checkpoints(checkpoints_dir: str | Path) -> list[Saved]:
    """Every complete checkpoint, in the order written: by (sequence, step)."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and _is_complete(child):
            found.append(Saved(read_marker(child).sequence, int(match.group(1)), child))
    return sorted(found)


def is_abandoned(folder: str | Path) -> bool:
    return (Path(folder) / ABANDONED).is_file()


def current_checkpoints(checkpoints_dir: str | Path) -> list[Saved]:
    """The complete checkpoints of the current branch (not abandoned), in the order written."""
    return [saved for saved in saved_checkpoints(checkpoints_dir) if not is_abandoned(saved.folder)]


def _written_order(saved: Saved) -> tuple[int, int]:
    return saved.sequence, saved.step


def abandon_after(checkpoints_dir: str | Path, chosen: str | Path | None, reason: str) -> list[Path]:
    """Make `chosen`'s branch the current one: mark `ABANDONED` every current checkpoint written after
    `chosen` (all of them when `chosen` is None or in another folder), so a run that starts over from
    `chosen` never continues them; and revive `chosen` and every checkpoint here written before it
    (`revive_until`). Returns the folders marked."""
    chosen_saved = _find(checkpoints_dir, chosen)
    marked = []
    for saved in current_checkpoints(checkpoints_dir):
        if chosen_saved is None or _written_order(saved) > _written_order(chosen_saved):
            (saved.folder / ABANDONED).write_text(reason + "\n")
            marked.append(saved.folder)
    if marked:
        log.warning("checkpoints %s belong to an abandoned branch (%s): never resumed, deleted at the next save",
                    ", ".join(f.name for f in marked), reason)
    if chosen_saved is not None:  # (after marking the later ones: cut short, nothing later is current)
        revive_until(checkpoints_dir, chosen_saved)
    return marked


def _find(checkpoints_dir: str | Path, chosen: str | Path | None) -> Saved | None:
    """The complete checkpoint of this folder that `chosen` names, abandoned or not (None: not here)."""
    if chosen is None:
        return None
    chosen = Path(chosen).resolve()
    return next((saved for saved in saved_checkpoints(checkpoints_dir) if saved.folder.resolve() == chosen), None)


def revive_until(checkpoints_dir: str | Path, chosen: Saved) -> list[Path]:
    """Remove the `ABANDONED` marker of `chosen` and of every checkpoint written before it: choosing a
    checkpoint explicitly continues its branch, and those are its ancestors, the best step among them.
    (Every save rotates abandoned folders away, so what is here was, at the last save, one branch:
    what was written before `chosen` led to it.) Without this, a branch given up by mistake
    (`resume=never`, killed before its first save) and then chosen again would lose its best
    checkpoint to the next rotation. Returns the folders revived, `chosen` first."""
    earlier = [saved for saved in saved_checkpoints(checkpoints_dir)
               if _written_order(saved) < _written_order(chosen) and is_abandoned(saved.folder)]
    revived = []
    for saved in [chosen, *reversed(earlier)]:  # chosen first: cut short, resume=auto still picks it
        if is_abandoned(saved.folder):
            (saved.folder / ABANDONED).unlink()
            revived.append(saved.folder)
    if revived:
        log.warning("checkpoints %s were abandoned and are current again: train.resume chose %s",
                    ", ".join(f.name for f in revived), chosen.folder.name)
    return revived


def holds_checkpoint_state(checkpoints_dir: str | Path) -> bool:
    """Whether there is any complete checkpoint here, published or still a partial or aside folder
    that `recover` would publish."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return False
    return any(_ANY_NAME.match(child.name) and _is_complete(child) for child in folder.iterdir())


def complete_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, lowest step first."""
    return sorted((saved.step, saved.folder) for saved in saved_checkpoints(checkpoints_dir))


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The current checkpoint written last (highest sequence, then step), or None."""
    found = current_checkpoints(checkpoints_dir)
    return found[-1].folder if found else None


Check = Callable[[Path], "str | None"]
"""Why a checkpoint folder must not be loaded (the end of "checkpoint step-N ..."), or None."""


def resolve_resume(resume: str, checkpoints_dir: str | Path, check_loads: Check | None = None) -> Path | None:
    """Main process only. `train.resume` → the folder to load, or None for a fresh start. Runs
    `recover` first, whatever `resume` says, so the folder is consistent before anything is saved.

    The folder chosen is verified first (`checkpoint_problem`, then `check_loads`: the files that
    Accelerate would skip silently if they did not load): `auto` falls back to the newest intact
    checkpoint, warning once per checkpoint passed over, and verifies an older one only when the
    newer one failed; an explicit folder that fails is a `ResumeError`."""
    recover(checkpoints_dir)
    if resume == "never":
        abandon_after(checkpoints_dir, None, "a run started afresh here (train.resume=never)")
        return None
    if resume == "auto":
        return _newest_intact(Path(checkpoints_dir), check_loads)
    folder = Path(resume)
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    if problem := _problem(folder, check_loads):
        raise ResumeError(f"train.resume={resume}: checkpoint {folder.name} {problem}; choose another checkpoint, "
                          "or start afresh with train.resume=never or in another output_dir")
    abandon_after(checkpoints_dir, folder, f"a run restarted from {folder}")
    return folder


def _problem(folder: Path, check_loads: Check | None) -> str | None:
    return checkpoint_problem(folder) or (check_loads(folder) if check_loads is not None else None)


def _newest_intact(checkpoints_dir: Path, check_loads: Check | None) -> Path | None:
    """`resume=auto`: the newest current checkpoint that passes the checks. Falling back from damaged
    ones is choosing an older checkpoint: they are abandoned (`abandon_after`), so they are not
    hashed and warned about again at every start, and the next save rotates them away (they cannot
    be loaded; a save of the same step replaces one)."""
    damaged = []
    for saved in reversed(current_checkpoints(checkpoints_dir)):
        problem = _problem(saved.folder, check_loads)
        if problem is None:
            for name, reason in damaged:
                log.warning("checkpoint %s %s: resuming from %s instead", name, reason, saved.folder.name)
            if damaged:  # (each one's damage is in the warning above; its ABANDONED marker says it in short)
                abandon_after(checkpoints_dir, saved.folder,
                              f"damaged, train.resume=auto resumed from {saved.folder.name} instead")
            return saved.folder
        damaged.append((saved.folder.name, problem))
    if damaged:
        listed = "; ".join(f"checkpoint {name} {reason}" for name, reason in damaged)
        raise ResumeError(f"no checkpoint in {checkpoints_dir} can be resumed: {listed}. Start afresh with "
                          "train.resume=never (they are then abandoned and deleted) or use another output_dir")
    return None


def rotate(checkpoints_dir: str | Path, keep_last: int, keep_steps: set[int] = frozenset()) -> list[Path]:
    """Delete complete checkpoints except the `keep_last` most recently written current ones (by
    sequence, never fewer than one: the checkpoint just written survives) and those whose step is in
    `keep_steps` (the best step the loop state refers to: kept even if marked abandoned, as a restart
    cut short between its marker writes may leave it; deleting it cannot be undone, and the run
    must load it at the end), incomplete partial folders of crashed saves, and what deletions cut
    short left (`.deleting-` folders). Complete partial folders are `recover`'s, and a `step-*` folder
    that is not a complete checkpoint is left alone (see the module docstring). Main process only.
    Returns what was removed."""
    found = saved_checkpoints(checkpoints_dir)
    current = [saved for saved in found if not is_abandoned(saved.folder)]
    keep = {saved.folder for saved in current[-max(keep_last, 1):]}
    keep |= {saved.folder for saved in found if saved.step in keep_steps}
    removed = []
    for saved in found:
        if saved.folder not in keep:
            _delete(saved.folder)
            removed.append(saved.folder)
    for step in _steps_named(Path(checkpoints_dir), _PARTIAL_PREFIX):
        leftover = partial_dir(checkpoints_dir, step)
        if not _is_complete(leftover):
            _delete(leftover)
            removed.append(leftover)
    return removed + _finish_deletions(Path(checkpoints_dir))  # (an earlier rotation's, killed midway)


class ResumeError(RuntimeError):
    """A checkpoint this run cannot continue from; the message says why and what to do."""
