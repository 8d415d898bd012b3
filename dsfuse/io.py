"""Atomic outputs: a crash or Ctrl-C never leaves a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsfuse.errors import UsageError


TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: list[str]) -> None:
    """Delete the temporaries that a killed atomic_path left beside `folder`/NAME for each of `names`."""
    for name in names:
        for leftover in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


OUTPUT_MARKER = ".dsfuse-output"  # in every folder a command makes whole: what --force may replace


def claim_output_folder(folder: str | os.PathLike, force: bool) -> Path:
    """A new, empty output folder at `folder`. With --force an earlier output folder of dsfuse's (it
    holds OUTPUT_MARKER) is replaced; a folder holding anything else is never deleted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError("the output is a file, not a folder", folder)
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise UsageError("output folder is not empty; pass --force to replace it", folder)
        if not (folder / OUTPUT_MARKER).is_file():
            raise UsageError("output folder holds files dsfuse did not write; --force replaces only a folder "
                             "dsfuse made, so give a new or empty folder", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTPUT_MARKER).write_text("written by dsfuse; --force may replace this folder\n")
    return folder


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite an existing output unless `--force`."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError("output exists; pass --force to overwrite it", path)
    return path
