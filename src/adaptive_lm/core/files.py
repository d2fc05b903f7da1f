"""Writing files so that nothing is lost: one atomic-write mechanism for every file the package writes.

Why one: a checkpoint, a datastore manifest, a dictionary, an exported model or an index must never be seen half
written, whatever kills the process. Every writer goes through ``atomic_path``: the data goes to a private temporary
name beside the target (unique per host, process and call, so two writers never rename each other's file), is
flushed to disk (fsync), and only then renamed over the target; readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_name(path: str | os.PathLike) -> str:
    """A temporary name beside ``path`` that no other process or call uses."""
    return f"{os.fspath(path)}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: on success ``tmp`` is fsynced and renamed over ``p``; on an
    exception ``p`` is untouched and the temporary file is removed (a kill leaves it, under a name no reader opens).
    A symbolic link's target is replaced (the link stays); a device or pipe is written directly."""
    p = Path(path)
    if p.exists() and not p.is_file():  # a device (/dev/null), a FIFO or a socket: written in place; renaming a
        yield p  # regular file over it would replace the device itself (as root) or the pipe a reader waits on
        return
    if p.is_symlink():  # the link stays and its target is replaced
        path = p.resolve()
    tmp = Path(temporary_name(path))
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_path`` (torch imported here only: most writers do not need it)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """``path`` becomes a hard link to ``source`` (a copy where the file system has none), put in place atomically."""
    with atomic_path(path) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
