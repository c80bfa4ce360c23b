"""Errors raised by the data sources.

Every source checks for its files before doing any work and raises
:class:`DataNotFoundError` naming the dataset, the directory it looked in and the exact
files to put there, so a missing dataset never turns into a stack trace from deep inside a
reader, or into a download attempt that hangs on a machine without network.
"""

from __future__ import annotations

from collections.abc import Sequence


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where the config says they are.

    Attributes:
      dataset: the dataset's name.
      directory: the directory that was searched.
      files: the files (relative to ``directory``) that should be placed there.
      hint: extra advice (where to get the files, how to unpack them).
    """

    def __init__(
        self,
        dataset: str,
        directory: str,
        files: Sequence[str],
        hint: str = "",
    ):
        self.dataset = dataset
        self.directory = str(directory)
        self.files = tuple(files)
        self.hint = hint
        lines = [
            f"Dataset {dataset!r}: required files not found in {self.directory}",
            "Put these files there:",
            *[f"  - {f}" for f in self.files],
        ]
        if hint:
            lines.append(hint)
        lines.append("See docs/data.md for where to get each dataset.")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep the exception picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.dataset, self.directory, self.files, self.hint))


class DataPreparationError(RuntimeError):
    """The files are present but turning them into a prepared dataset failed."""


class DatasetsNotFoundError(DataNotFoundError):
    """Several datasets of one config are missing: each named, with the command-line
    override that points at it, in one error (so one run of the command lists them all)."""

    def __init__(self, missing: Sequence[tuple[str, DataNotFoundError]]):
        self.missing = tuple(missing)
        first = self.missing[0][1]
        self.dataset, self.directory = first.dataset, first.directory
        self.files, self.hint = first.files, first.hint
        parts = [f"{len(self.missing)} datasets of this config are missing:"]
        for override, err in self.missing:
            parts += ["", f"[{err.dataset}] point at it with {override}", str(err)]
        FileNotFoundError.__init__(self, "\n".join(parts))

    def __reduce__(self):
        return (type(self), (self.missing,))
