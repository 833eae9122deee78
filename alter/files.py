"""Writing outputs so that a failed write never damages what is already there.

:func:`staged_directory` writes a set of files into a temporary sibling of the target
directory and moves them in only when every one was written and flushed to disk: a write
that fails (disk full, an exception, a kill) leaves the previous files as they were.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike):
    """Context: yields a temporary directory to write files into; on a clean exit each
    file is fsynced and moved into ``directory`` (created if needed) with ``os.replace``,
    on an exception nothing is moved and the temporary directory is removed.

    The temporary directory is a sibling (same file system), so every move is an atomic
    rename; files of ``directory`` that were not written are kept.
    """
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield staging
        names = sorted(os.listdir(staging))
        for entry in names:
            if not os.path.isfile(os.path.join(staging, entry)):
                raise OSError(f"staged_directory: {entry} is not a plain file; only files can be staged")
            _fsync(os.path.join(staging, entry))
        os.makedirs(directory, exist_ok=True)
        for entry in names:
            os.replace(os.path.join(staging, entry), os.path.join(directory, entry))
        _fsync(directory)  # the renames themselves reach the disk
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | os.PathLike, values, indent: int = 2) -> None:
    """Write ``values`` as indented JSON to ``path`` atomically (a sibling file, fsynced,
    then renamed over ``path``; the folder is created if needed)."""
    path = os.path.abspath(os.fspath(path))
    with staged_directory(os.path.dirname(path)) as staging:
        with open(os.path.join(staging, os.path.basename(path)), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=indent)
            f.write("\n")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): the reason
    quoted in a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
