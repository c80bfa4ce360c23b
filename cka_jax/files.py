"""Small file helpers shared by the checkpoints, the report and the workdir (no JAX)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    """Writes ``obj`` as JSON (sorted keys) through a temporary file and a rename, so a
    reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
