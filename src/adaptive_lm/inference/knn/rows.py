"""Rows into a preallocated ``.npy`` at their offsets: how the datastore's keys, values and log-probs reach disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from adaptive_lm.core.errors import UserError


def _check_header(path: Path, header: tuple, dtype: np.dtype, shape: tuple[int, ...], offset: int, row: int) -> None:
    """The array the manifest describes, every row of it on disk: a truncated file would be read past its end
    (numpy refuses to map it) or, resumed, its missing rows would stay zeros."""
    if tuple(header[0]) != tuple(shape) or np.dtype(header[2]) != dtype or header[1]:
        raise UserError(
            f"{path}: holds {header[2]} {tuple(header[0])}, the manifest says {dtype} {tuple(shape)}; the datastore "
            "is damaged: rebuild it with --overwrite"
        )
    size, want = path.stat().st_size, offset + shape[0] * row
    if size < want:
        raise UserError(
            f"{path}: {size:,} bytes where its {shape[0]:,} rows take {want:,} (a truncated copy?); the datastore is "
            "damaged: rebuild it with --overwrite"
        )


def check_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """``path`` is a whole .npy of this dtype and shape (one line naming what is wrong otherwise)."""
    dtype = np.dtype(dtype)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header = read(f)
        except ValueError as e:
            raise UserError(f"{path}: not a .npy file ({e}); rebuild the datastore with --overwrite") from None
        _check_header(path, header, dtype, shape, f.tell(), dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))


class RowWriter:
    """Writes rows into a preallocated ``.npy`` at their offsets with ``pwrite``.

    Why not a writable memmap: its dirty pages count in the process's memory until written back, and on a full
    disk a write into a sparse mapping kills the process with SIGBUS; ``pwrite`` keeps memory at one batch and turns
    a full disk into an error with a message. The file is created sparse by ``numpy.lib.format.open_memmap``.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], create: bool) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        if create:
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
            del mm
        self.f = open(path, "r+b")
        try:
            version = np.lib.format.read_magic(self.f)
            header = (
                np.lib.format.read_array_header_1_0(self.f)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(self.f)
            )
        except ValueError as e:
            self.f.close()
            raise UserError(f"{path}: not a .npy file ({e}); rebuild the datastore with --overwrite") from None
        self.offset = self.f.tell()
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        try:
            _check_header(path, header, self.dtype, shape, self.offset, self.row_bytes)
        except UserError:
            self.f.close()
            raise

    def write(self, row: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype)
        buf, pos = memoryview(data).cast("B"), self.offset + row * self.row_bytes
        while len(buf):
            n = os.pwrite(self.f.fileno(), buf, pos)
            buf, pos = buf[n:], pos + n

    def sync(self) -> None:
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
