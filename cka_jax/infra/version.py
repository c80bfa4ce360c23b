"""Which code produced a result: the package's version and, in a git checkout, its commit."""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


@functools.cache
def code_version() -> dict:
    """``{"package": "0.1.0", "commit": "<sha>" or None}``; the commit is read with git from
    the checkout the package is imported from (None outside one, or without git)."""
    try:
        package = importlib.metadata.version("cka-jax")
    except importlib.metadata.PackageNotFoundError:
        package = "unknown"
    commit = None
    if (CHECKOUT / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            commit = out.stdout.strip() or None if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"package": package, "commit": commit}


def describe(code: dict) -> str:
    commit = code.get("commit")
    return f"cka-jax {code.get('package')}" + (f" at commit {commit[:12]}" if commit else "")
