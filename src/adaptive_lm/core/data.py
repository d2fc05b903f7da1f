"""Binarised data and batching, as fairseq's language_modeling task does it (``fairseq/tasks/language_modeling.py``,
``fairseq/data/{token_block,monolingual,indexed}_dataset.py``, ``fairseq/data/data_utils.py``).

* ``IndexedDataset`` / ``IndexedWriter``: fairseq's memory-mapped indexed format (``MMIDIDX``, ``--dataset-impl
  mmap``): ``.idx`` = magic, version 1, dtype code, count, int32 sizes, int64 byte pointers; ``.bin`` = the tokens
  back to back. Also its older format (``TNTIDX``, what ``--dataset-impl lazy`` and ``cached`` write, one format):
  ``.idx`` = magic, version 1, dtype code and element size, count and number of sizes, then int64 dimension
  offsets, element offsets and sizes; ``.bin`` = every token + 1 (Lua's 1-based ids) as int32.
* ``block_spans``: ``TokenBlockDataset``'s cuts for ``--sample-break-mode none|complete|complete_doc|eos``.
* ``LMDataset``: (source, target) per block, source = the stream shifted right by one (``</s>`` first).
* ``batch_by_size`` / ``EpochBatches``: size-sorted batches bounded by ``--max-tokens`` / ``--batch-size``,
  shuffled per epoch from ``seed + epoch`` only, sharded over ranks, resumable at any batch; the same batches in
  the same order as fairseq-train (tested against batches fairseq produced).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
TNT_MAGIC = b"TNTIDX\x00\x00"  # fairseq's IndexedDataset (--dataset-impl lazy / cached)
HUFFMAN_MAGIC = b"HUFFIDX\x00"
CODE_TO_DTYPE = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float64,
    8: np.uint16,
    9: np.uint32,
    10: np.uint64,
}
DTYPE_TO_CODE = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 7,
    np.dtype(np.uint16): 8,
    np.dtype(np.uint32): 9,
    np.dtype(np.uint64): 10,
}


def best_dtype(vocab_size: int | None) -> np.dtype:
    """fairseq 0.12's ``best_fitting_int_dtype``: uint16 below 65,500 symbols, uint32 below 2^32 - 1, else int64
    (checked against fairseq-preprocess on a 267k-type corpus: index dtype code 9 = uint32)."""
    if vocab_size is None:
        return np.dtype(np.uint32)
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32) if vocab_size < 4294967295 else np.dtype(np.int64)


# =====================================================================================================
# Indexed dataset files
# =====================================================================================================
class IndexedWriter:
    """Streams sequences into ``PREFIX.bin`` and writes ``PREFIX.idx`` at the end; both under temporary names
    until ``finalize`` renames them, so an interrupted run never leaves files that look complete. ``legacy``: fairseq's
    ``TNTIDX`` format (``--dataset-impl lazy/cached``: ids + 1 as int32, whatever ``dtype``)."""

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype, legacy: bool = False) -> None:
        self.prefix = str(prefix)
        self.legacy = legacy
        self.dtype = np.dtype(np.int32) if legacy else np.dtype(dtype)
        self._bin = open(self.prefix + ".bin.tmp", "wb")
        self._sizes: list[np.ndarray] = []

    def add_array(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append many sequences at once: their tokens back to back and their lengths."""
        if self.legacy:
            tokens = np.asarray(tokens, dtype=np.int64) + 1
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._sizes.append(np.asarray(sizes, dtype=np.int32))

    def append_file(self, bin_path: str, sizes: np.ndarray) -> None:
        """Append another writer's finished chunk (worker output), copying its bytes."""
        with open(bin_path, "rb") as f:
            while chunk := f.read(1 << 24):
                self._bin.write(chunk)
        self._sizes.append(np.asarray(sizes, dtype=np.int32))

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        if self.legacy:
            self._write_tnt_index(sizes)
        else:
            self._write_mmap_index(sizes)
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")

    def _write_mmap_index(self, sizes: np.ndarray) -> None:
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_TO_CODE[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())

    def _write_tnt_index(self, sizes: np.ndarray) -> None:
        n = len(sizes)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        with open(self.prefix + ".idx.tmp", "wb") as f:
            f.write(TNT_MAGIC)
            f.write(struct.pack("<QQQQQ", 1, DTYPE_TO_CODE[self.dtype], self.dtype.itemsize, n, n))
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())  # one dimension per item
            f.write(offsets.tobytes())
            f.write(sizes.astype(np.int64).tobytes())

    def abort(self) -> None:
        self._bin.close()
        for ext in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + ext):
                os.remove(self.prefix + ext)


class IndexedDataset:
    """Read-only view of a fairseq ``.bin``/``.idx`` pair, in either format fairseq writes (``mmap``, or ``TNTIDX``
    from ``--dataset-impl lazy/cached``, read into memory as fairseq's ``cached`` does); validates the header and
    sizes up front, and refuses what fairseq reads that is not reproduced (raw text, Huffman-coded data)."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        _check_files(self.prefix, idx_path, bin_path)
        what = "run preprocess again to rebuild it"
        if os.path.getsize(idx_path) == 0:
            raise UserError(f"{idx_path}: empty file (an interrupted preprocess?); {what}")
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
        head = bytes(raw[:9])
        self.impl = "mmap"  # what fairseq-preprocess --dataset-impl wrote (lazy and cached write the same files)
        if head[:8] == TNT_MAGIC:
            self.impl = "lazy"
            self.dtype, self.sizes, self.tokens = _read_tnt(idx_path, bin_path, raw)
        elif head[:8] == HUFFMAN_MAGIC:
            raise UserError(
                f"{idx_path}: a Huffman-coded fairseq index (--dataset-impl huffman), which is not supported; "
                "binarise the text with `adaptive-lm preprocess` (mmap)"
            )
        elif len(raw) < 26 or head != MAGIC:
            raise UserError(
                f"{idx_path}: not a fairseq index (neither mmap nor lazy/cached; bad magic or too short); {what}"
            )
        else:
            self.dtype, self.sizes, self.tokens = _read_mmap(idx_path, bin_path, raw)
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        if os.path.exists(self.prefix):  # fairseq's infer_dataset_impl tries raw text first: it would read this
            raise UserError(
                f"{self.prefix}: exists beside {Path(self.prefix).name}.idx/.bin, and fairseq reads it as the split's "
                "raw text (--dataset-impl raw comes first) where ours would read the .bin; move or rename it"
            )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def max_id(self) -> int:
        """The largest token id, computed once per ``.bin`` version and cached beside it (``.bin.maxid``: size,
        mtime, max); 0.1 s per 100M tokens otherwise. An unwritable folder just skips the cache."""
        bin_path = self.prefix + ".bin"
        st = os.stat(bin_path)
        key = f"{st.st_size} {st.st_mtime_ns}"
        cache = Path(bin_path + ".maxid")
        with contextlib.suppress(OSError, ValueError):
            k1, k2, value = cache.read_text().split()
            if f"{k1} {k2}" == key:
                return int(value)
        top = int(self.tokens.max()) if len(self.tokens) else 0
        with contextlib.suppress(OSError):
            cache.write_text(f"{key} {top}\n")
        return top


class RawTextDataset:
    """fairseq's ``--dataset-impl raw`` (``IndexedRawTextDataset``): the split is a text file named as the split
    itself (``data/valid``), every line encoded when loaded as fairseq encodes it (whitespace-split words, ``<unk>``
    for the others, ``</s>`` appended), so evaluation needs no binarising. The same interface as
    ``IndexedDataset``."""

    impl = "raw"

    def __init__(self, path: str | os.PathLike, dictionary: Any) -> None:
        self.prefix = str(path)
        try:
            with open(path, encoding="utf-8") as f:  # text mode: fairseq's ``for line in f`` (universal newlines)
                ids = [np.asarray(dictionary.encode_line(line), dtype=np.int64) for line in f]
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None
        self.sizes = np.array([len(x) for x in ids], dtype=np.int64)
        self.tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def max_id(self) -> int:
        return int(self.tokens.max()) if len(self.tokens) else 0


def _check_files(prefix: str, idx_path: str, bin_path: str) -> None:
    """Both files exist and are files; a text file at ``prefix`` (fairseq's ``--dataset-impl raw``) is named."""
    for p in (idx_path, bin_path):
        if os.path.isdir(p):
            raise UserError(f"{p}: a folder, not a file; run `adaptive-lm preprocess` (or fairseq-preprocess) again")
        if not os.path.isfile(p):
            if os.path.isfile(prefix):
                raise UserError(
                    f"{prefix}: a text file with no {Path(p).name} beside it, which fairseq reads as --dataset-impl "
                    "raw (tokenised as it is loaded); eval reads it so, training needs it binarised with "
                    "`adaptive-lm preprocess`"
                )
            raise UserError(f"{p}: not found; run `adaptive-lm preprocess` (or fairseq-preprocess) first")


def _read_mmap(idx_path: str, bin_path: str, raw: np.ndarray) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sizes, tokens) of an ``MMIDIDX`` pair, the tokens memory-mapped."""
    what = "run preprocess again to rebuild it"
    (version,) = struct.unpack("<Q", bytes(raw[9:17]))
    code = int(raw[17])
    if version != 1 or code not in CODE_TO_DTYPE:
        raise UserError(f"{idx_path}: unsupported index version {version} / dtype code {code}; {what}")
    dtype = np.dtype(CODE_TO_DTYPE[code])
    (n,) = struct.unpack("<Q", bytes(raw[18:26]))
    if len(raw) != 26 + n * 12:
        raise UserError(f"{idx_path}: truncated or corrupt ({len(raw)} bytes, expected {26 + n * 12}); {what}")
    sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=26)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=26 + 4 * n)
    total = int(sizes.astype(np.int64).sum())
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes != total * dtype.itemsize or (n and int(pointers[-1]) != (total - int(sizes[-1])) * dtype.itemsize):
        raise UserError(
            f"{bin_path}: size {bin_bytes} bytes does not match its index ({total} tokens of "
            f"{dtype.itemsize} bytes); the pair is truncated or mismatched; {what}"
        )
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if total else np.zeros(0, dtype)
    return dtype, sizes, tokens


def _read_tnt(idx_path: str, bin_path: str, raw: np.ndarray) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, sizes, tokens) of a ``TNTIDX`` pair (``--dataset-impl lazy/cached``): the tokens read into memory
    with fairseq's ``- 1``."""
    what = "run preprocess again to rebuild it"
    if len(raw) < 48:
        raise UserError(
            f"{idx_path}: truncated or corrupt ({len(raw)} bytes, a lazy/cached index has 48 or more); {what}"
        )
    version, code, elsize, n, s = struct.unpack("<QQQQQ", bytes(raw[8:48]))
    dtype = np.dtype(CODE_TO_DTYPE[code]) if code in CODE_TO_DTYPE else None
    if version != 1 or dtype is None or dtype.kind not in "iu" or elsize != dtype.itemsize:
        raise UserError(
            f"{idx_path}: unsupported index version {version} / dtype code {code} / element size {elsize}; {what}"
        )
    expected = 48 + 16 * (n + 1) + 8 * s
    if len(raw) != expected:
        raise UserError(f"{idx_path}: truncated or corrupt ({len(raw)} bytes, expected {expected}); {what}")
    dims = np.frombuffer(raw, dtype=np.int64, count=n + 1, offset=48)
    starts = np.frombuffer(raw, dtype=np.int64, count=n + 1, offset=48 + 8 * (n + 1))
    sizes = np.frombuffer(raw, dtype=np.int64, count=s, offset=48 + 16 * (n + 1))
    if s != n or not np.array_equal(dims, np.arange(n + 1)):
        raise UserError(f"{idx_path}: items of more than one dimension, not token lines; {what}")
    if int(starts[0]) != 0 or not np.array_equal(np.diff(starts), sizes):
        raise UserError(f"{idx_path}: corrupt (its offsets do not add up to its sizes); {what}")
    total, bin_bytes = int(starts[-1]), os.path.getsize(bin_path)
    if bin_bytes != total * elsize:
        raise UserError(
            f"{bin_path}: size {bin_bytes} bytes does not match its index ({total} tokens of {elsize} bytes); the "
            f"pair is truncated or mismatched; {what}"
        )
    tokens = np.fromfile(bin_path, dtype=dtype, count=total) - 1 if total else np.zeros(0, dtype)
    if total and int(tokens.min()) < 0:
        raise UserError(f"{bin_path}: holds a 0, which a lazy/cached .bin never does (ids are stored + 1); {what}")
    return dtype, sizes, tokens


# =====================================================================================================
# Blocks (TokenBlockDataset) and (source, target) pairs (MonolingualDataset)
# =====================================================================================================
BREAK_MODES = ("none", "complete", "complete_doc", "eos")


def block_spans(sizes: np.ndarray, block_size: int, break_mode: str = "none") -> np.ndarray:
    """(n_blocks, 2) token spans [start, end) into the stream of all lines, as fairseq's TokenBlockDataset."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if break_mode == "none":
        starts = np.arange(0, total, block_size, dtype=np.int64)
        return np.stack([starts, np.minimum(starts + block_size, total)], axis=1).reshape(-1, 2)
    if break_mode == "eos":
        ends = np.cumsum(sizes)
        return np.stack([ends - sizes, ends], axis=1).reshape(-1, 2)
    if break_mode not in BREAK_MODES:
        raise UserError(f"unknown --sample-break-mode {break_mode!r}: use one of {', '.join(BREAK_MODES)}")
    spans: list[tuple[int, int]] = []
    tok, cur, doc = 0, 0, break_mode == "complete_doc"
    for s in sizes.tolist():
        if (cur + s <= block_size or cur == 0) and not (doc and s == 1):
            cur += s
            continue
        if not doc or cur > 1:
            spans.append((tok, tok + cur))
        tok += cur
        cur = 0
        if doc and s == 1:  # an empty line (just </s>) separates documents and is dropped
            tok += 1
        else:
            cur = s
    if cur > (1 if doc else 0):
        spans.append((tok, tok + cur))
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


class LMDataset:
    """Blocks of a token stream with targets = the block and source = the block shifted right by one.

    ``add_bos`` (fairseq's ``--add-bos-token``): ``<s>`` is prepended to both (MonolingualDataset), so position 0
    learns to predict ``<s>`` from ``<s>``; training counts that target, evaluation drops its score."""

    def __init__(
        self, tokens: np.ndarray, spans: np.ndarray, eos: int, pad: int, add_bos: bool = False, bos: int = 0
    ) -> None:
        self.tokens, self.spans, self.eos, self.pad = tokens, spans, eos, pad
        self.add_bos, self.bos = add_bos, bos
        self.sizes = (spans[:, 1] - spans[:, 0]).astype(np.int64)  # batching ignores the <s> (as fairseq's)

    @classmethod
    def from_split(
        cls, ds: IndexedDataset, block_size: int, break_mode: str, eos: int = 2, pad: int = 1, add_bos: bool = False
    ) -> LMDataset:
        return cls(ds.tokens, block_spans(ds.sizes, block_size, break_mode), eos, pad, add_bos)

    def subset(self, keep: np.ndarray) -> LMDataset:
        """The blocks selected by a boolean mask (e.g. those that fit the model)."""
        return LMDataset(self.tokens, self.spans[keep], self.eos, self.pad, self.add_bos, self.bos)

    def __len__(self) -> int:
        return len(self.spans)

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = int(self.spans[i, 0]), int(self.spans[i, 1])
        target = np.asarray(self.tokens[s:e], dtype=np.int64)
        if s == 0:
            source = np.concatenate([[self.eos], np.asarray(self.tokens[0 : e - 1], dtype=np.int64)])
        else:
            source = np.asarray(self.tokens[s - 1 : e - 1], dtype=np.int64)
        if self.add_bos:
            source, target = np.concatenate([[self.bos], source]), np.concatenate([[self.bos], target])
        return source, target

    def collate(self, indices: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Right-padded (B, T) source and target; ``ntokens`` = number of real target tokens."""
        items = [self.item(int(i)) for i in indices]
        width = max((len(t) for _, t in items), default=0)
        src = np.full((len(items), width), self.pad, dtype=np.int64)
        tgt = np.full((len(items), width), self.pad, dtype=np.int64)
        for row, (s, t) in enumerate(items):
            src[row, : len(s)] = s
            tgt[row, : len(t)] = t
        return {
            "src_tokens": torch.from_numpy(src),  # (B, T)
            "target": torch.from_numpy(tgt),  # (B, T)
            "ntokens": int(sum(len(t) for _, t in items)),
            "id": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
        }


# =====================================================================================================
# Batching
# =====================================================================================================
def ordered_indices(sizes: np.ndarray, shuffle: bool, seed: int) -> np.ndarray:
    """MonolingualDataset.ordered_indices under numpy_seed(seed): sort by size, ties in random order."""
    if shuffle:
        perm = np.random.RandomState(seed).permutation(len(sizes))
    else:
        perm = np.arange(len(sizes))
    return np.lexsort([perm, sizes])


def batch_by_size(
    indices: np.ndarray, sizes: np.ndarray, max_tokens: int | None, max_sentences: int | None, bsz_mult: int = 8
) -> list[np.ndarray]:
    """fairseq 0.12's ``batch_by_size`` (vectorised version), then its rule for the last batch.

    Scanning the size-sorted indices, the running batch absorbs the not-yet-committed tail whenever the result
    still fits (``n * longest <= max_tokens``, ``n <= max_sentences``) and ``n`` is below ``bsz_mult`` or a
    multiple of it; when it no longer fits the batch is closed and the tail starts the next one (if the tail alone
    does not fit, it is closed as a batch of its own). Finally fairseq **drops the last batch when its size is not
    a multiple of** ``bsz_mult`` (``--required-batch-size-multiple``, default 8): with the recipe's one 3072-token
    block per batch, one block per epoch is never trained on, and a partial last validation batch is not scored.
    Reproduced so that batch order and logged losses are fairseq's; ``bsz_mult=1`` keeps every sample.
    """
    n = len(indices)
    if n == 0:
        return []
    lens = np.asarray(sizes)[indices].astype(np.int64)
    if max_tokens and max_tokens > 0 and int(lens.max()) > max_tokens:
        raise UserError(
            f"a sample of {int(lens.max())} tokens exceeds --max-tokens {max_tokens}: raise --max-tokens to at "
            f"least --tokens-per-sample"
        )
    mt = max_tokens if max_tokens and max_tokens > 0 else 0
    ms = max_sentences if max_sentences and max_sentences > 0 else 0
    ends = [0]  # ends[-1]: end of the running batch; earlier entries: ends of closed batches
    start = 0  # start of the running batch
    batch_max = tail_max = 0
    for pos in range(n):
        tail_max = max(tail_max, int(lens[pos]))
        new_max = max(batch_max, tail_max)
        count = pos + 1 - start
        overflow = (ms and count > ms) or (mt and count * new_max > mt)
        if overflow:
            if mt and tail_max * (pos + 1 - ends[-1]) > mt:  # the tail alone is too big: close it by itself
                ends.append(pos)
                tail_max = int(lens[pos])
            start = ends[-1]
            ends.append(0)
            new_max = tail_max
        if overflow or count < bsz_mult or count % bsz_mult == 0:
            ends[-1] = pos + 1
            batch_max = new_max
            tail_max = 0
    cuts = ends if ends[-1] != n else ends[:-1]
    batches = np.split(np.asarray(indices, dtype=np.int64), cuts)
    if bsz_mult > 1 and len(batches[-1]) % bsz_mult != 0:
        batches = batches[:-1]
    return batches


@dataclass
class EpochBatches:
    """The batches of one split, fixed once (sorted by size), reshuffled per epoch from ``seed + epoch`` (when
    ``shuffle``: training) and sharded over ranks; a position (epoch, batches done) is all a checkpoint needs to
    resume exactly."""

    dataset: LMDataset
    max_tokens: int | None
    max_sentences: int | None
    seed: int = 1
    shuffle: bool = True
    num_shards: int = 1
    shard_id: int = 0
    bsz_mult: int = 8

    def __post_init__(self) -> None:
        # fairseq sorts under numpy seed ``seed + epoch`` with the epoch the process *starts* in; a fresh run
        # starts in epoch 1. (fairseq resumed in epoch k re-sorts with seed + k, so its own resumed runs see other
        # batches than uninterrupted ones; here the batches are fixed for the whole run, so resuming is exact.)
        # The language_modeling task's datasets always sort from a random permutation (validation too: with the
        # last-batch rule the permutation decides which samples a partial last batch would hold).
        order = ordered_indices(self.dataset.sizes, True, self.seed + 1)
        self.batches = batch_by_size(order, self.dataset.sizes, self.max_tokens, self.max_sentences, self.bsz_mult)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        batches = list(self.batches)
        if self.shuffle:
            # fairseq's numpy_seed(seed + epoch); past numpy's 2**32 - 1, where fairseq fails, it wraps around
            perm = np.random.RandomState((self.seed + epoch) % 2**32).permutation(len(batches))
            batches = [batches[i] for i in perm]
        shard = batches[self.shard_id :: self.num_shards]
        per_shard = -(-len(batches) // self.num_shards)  # every rank does the same number of steps
        shard += [np.zeros(0, dtype=np.int64)] * (per_shard - len(shard))
        return shard

    def __len__(self) -> int:
        return -(-len(self.batches) // self.num_shards)

    def iterate(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Collated batches ``start:stop`` of ``epoch`` (empty padding batches yield ntokens 0)."""
        for b in self.epoch_batches(epoch)[start:stop]:
            yield self.dataset.collate(b)


DATASET_IMPLS = ("mmap", "lazy", "cached", "raw", "fasta", "huffman")  # fairseq's --dataset-impl choices


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    vocab_size: int | None = None,
    impl: str | None = None,
    dictionary: Any = None,
) -> IndexedDataset | RawTextDataset:
    """An indexed split; with ``vocab_size``, its largest token id is checked against the dictionary (a ``.bin``
    made with another dictionary, or damaged, fails here with its name instead of deep inside the model).
    ``impl``: fairseq's ``--dataset-impl`` as a command line gave it (the format is read from the files anyway);
    one that does not match them is refused, as fairseq fails to read them then. With a ``dictionary`` (evaluation),
    raw text is read as fairseq reads it: with ``--dataset-impl raw``, or without the flag when the split is a text
    file with no ``.idx`` beside it (fairseq's inference of the format)."""
    prefix = Path(data_dir) / split
    if dictionary is not None and (
        impl == "raw" or (impl is None and prefix.is_file() and not prefix.with_name(split + ".idx").exists())
    ):
        if not prefix.is_file():
            raise UserError(f"{prefix}: not found; with --dataset-impl raw the split is a text file named {split}")
        return RawTextDataset(prefix, dictionary)
    if impl in ("raw", "fasta", "huffman"):
        raise UserError(
            f"--dataset-impl {impl}: not supported here (the data must be binarised, mmap or lazy/cached; raw text "
            "is read by eval only); binarise the text with `adaptive-lm preprocess` and drop the flag"
        )
    ds = IndexedDataset(prefix)
    if impl is not None and (impl == "mmap") != (ds.impl == "mmap"):
        written = "mmap" if ds.impl == "mmap" else "lazy or cached"
        raise UserError(
            f"{ds.prefix}.idx: written with --dataset-impl {written}, but --dataset-impl {impl} was given (fairseq "
            "fails to read it so); drop the flag (the format is read from the files) or give the right one"
        )
    if vocab_size is not None:
        top = ds.max_id()
        if top >= vocab_size:
            raise UserError(
                f"{ds.prefix}.bin: token id {top} is not in the dictionary ({vocab_size} symbols in "
                f"{Path(data_dir) / 'dict.txt'}); the split was binarised with another dictionary or is damaged: "
                f"run preprocess again with this dict.txt (--srcdict)"
            )
    return ds
