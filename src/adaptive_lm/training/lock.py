"""One trainer per save directory: ``SAVE_DIR/.lock`` names the holder; a lock left by a dead process is taken over."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from adaptive_lm.core.errors import UserError


class SaveDirLock:
    """``SAVE_DIR/.lock`` holding ``host pid``: a second trainer on the same folder is refused with one line naming
    the holder; a lock left by a dead process on this host is taken over with a notice."""

    def __init__(self, save_dir: str | os.PathLike) -> None:
        self.path = Path(save_dir) / ".lock"
        self.held = False
        self.notice: str | None = None

    def acquire(self) -> None:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise UserError(f"{self.path.parent}: --save-dir is a file, not a folder; give a folder path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"{self.path.parent}: cannot create the save folder ({e.strerror}); give a writable --save-dir"
            ) from None
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, pid = self._holder()
                if host == socket.gethostname() and pid is not None and not _alive(pid):
                    self.notice = f"note: {self.path} was left by process {pid} (no longer running): taking it over"
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(
                    f"{self.path.parent}: another trainer holds it ({self.path}: host {host}, pid {pid}); wait for "
                    f"it, use another --save-dir, or delete the lock file if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise UserError(f"{self.path}: could not take the lock; another trainer started at the same moment")

    def _holder(self) -> tuple[str, int | None]:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return "?", None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
