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
import stat
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


def is_special(p: Path) -> bool:
    """A device, FIFO or socket: written in place, never replaced (renaming a file over /dev/null as root replaces
    the device; over a named pipe, the pipe its reader waits on)."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, follow_links: bool = False) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: on success ``tmp`` is fsynced and renamed over ``p``; on an
    exception ``p`` is untouched and the temporary file is removed (a kill leaves it, under a name no reader opens).
    A device, FIFO or socket is written directly. ``follow_links`` (a user's ``--output``): a symbolic link's target
    is replaced and the link stays; without it the link itself is replaced (a checkpoint or dictionary written
    where a link to another run's file stands must not overwrite that file)."""
    p = Path(path)
    if is_special(p):
        yield p
        return
    if follow_links and p.is_symlink():
        with contextlib.suppress(OSError, RuntimeError):  # a loop of links: the link itself is replaced
            path = p.resolve(strict=False)
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
