"""Small file helpers shared by the checkpoints, the report and the workdir (no JAX)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

# A write that fails for want of space: the disk is full (ENOSPC) or the user's quota is
# spent (EDQUOT, common on cluster home and scratch disks). Orbax's writes (tensorstore)
# raise ValueError with the OS error in the text, so the text is checked too.
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def write_json_atomic(path: Path, obj) -> None:
    """Writes ``obj`` as JSON (sorted keys) through a temporary file and a rename, so a
    reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write that found no space."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(err) for text in _NO_SPACE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def format_bytes(n: int) -> str:
    """``n`` bytes in B, KB, MB, GB or TB (powers of 1024)."""
    units = ("B", "KB", "MB", "GB", "TB")
    i = 0
    while i < len(units) - 1 and n >= 1024 ** (i + 1):
        i += 1
    return f"{n} B" if i == 0 else f"{n / 1024**i:.1f} {units[i]}"


def free_bytes(path) -> int | None:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def disk_full_message(what: str, path, needed: int | None, kept: str) -> str:
    """The error for a write of ``what`` to ``path`` that found its disk full: where, the
    space it needs (about ``needed`` bytes) and has, what is ``kept``, and what to do."""
    free = free_bytes(path)
    need = f"it needs about {format_bytes(needed)}" if needed else "it needs more space"
    have = f", {format_bytes(free)} free there" if free is not None else ""
    return (
        f"no space left on the disk to write {what} to {path} ({need}{have}). {kept} Free "
        "some space (or move the workdir to a larger disk), then rerun the same command."
    )
