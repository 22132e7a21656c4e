"""What a run folder may already hold when a run starts, and what a failed run leaves behind.

A run folder with checkpoints belongs to an earlier run: ``sat-train`` continues it only when
asked (``--resume``: its latest checkpoint; or ``training.resume_from_checkpoint``: a given
one), starts it over only when asked (``--overwrite`` deletes its ``checkpoint-*`` folders,
so a later ``--resume`` cannot pick a stale one), and refuses otherwise. A run that fails
before writing anything leaves no empty folders behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import SATConfigError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(folder: Path) -> list[Path]:
    """The Trainer checkpoints in ``folder``, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_point(
    folder: Path, *, explicit: str | bool | None, resume: bool, overwrite: bool, required: bool = True
) -> str | None:
    """The checkpoint this run continues from, or None to start at step 0.

    ``explicit`` is ``training.resume_from_checkpoint`` (a checkpoint folder, or true for the
    latest); ``required=False`` lets ``--resume`` start a folder that has no checkpoint yet
    (the second run of ``--compare-dense``). Raises :class:`SATConfigError` with what to do.
    """
    if resume and overwrite:
        raise SATConfigError("--resume and --overwrite contradict each other; pass one")
    if isinstance(explicit, str):
        if overwrite:
            raise SATConfigError("training.resume_from_checkpoint and --overwrite contradict each other; pass one")
        if not (Path(explicit).expanduser() / "trainer_state.json").is_file():
            raise SATConfigError(
                f"key 'training.resume_from_checkpoint' has invalid value {explicit!r}; allowed: a checkpoint folder "
                "(with trainer_state.json) written by an earlier run"
            )
        return str(Path(explicit).expanduser())
    if explicit not in (None, False, True):
        raise SATConfigError(
            f"key 'training.resume_from_checkpoint' has invalid value {explicit!r}; allowed: a checkpoint folder or true"
        )
    existing = checkpoints(folder)
    if resume or explicit is True:
        if not existing and required:
            raise SATConfigError(f"nothing to resume: {folder} holds no checkpoint-* folder; run without --resume")
        return str(existing[-1]) if existing else None
    if existing and not overwrite:
        raise SATConfigError(
            f"run folder {folder} already holds checkpoints ({', '.join(p.name for p in existing[-3:])}); "
            f"add --resume to continue from {existing[-1].name}, or --overwrite to delete them and start over"
        )
    return None


def clear_checkpoints(folder: Path) -> None:
    """``--overwrite``: delete the folder's checkpoints (final/ and the report are rewritten by the run)."""
    for checkpoint in checkpoints(folder):
        shutil.rmtree(checkpoint)


def first_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to ``folder`` that does not exist yet (None if it exists):
    what a run would create, and so what it may remove again if it fails."""
    missing = None
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            return missing
        missing = path
    return missing


def remove_empty(folder: Path) -> None:
    """Remove ``folder`` and its sub-folders if they hold no file (a run that failed before writing)."""
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir():
            remove_empty(child)
    if not any(folder.iterdir()):
        folder.rmdir()
