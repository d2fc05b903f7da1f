"""fairseq-compatible word dictionary (``fairseq/data/dictionary.py``).

``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, then the words of ``dict.txt`` in file order. Building one
from counts sorts by descending count with ties in code-point order and pads with ``madeupwordNNNN`` to a
multiple of 8, so that our ``dict.txt`` is byte-identical to fairseq-preprocess's for the same text.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from adaptive_lm.core.errors import UserError
from adaptive_lm.core.files import atomic_path


class Dictionary:
    """Symbol <-> id map with fairseq's special symbols, file format and encoding rules."""

    def __init__(self, bos: str = "<s>", pad: str = "<pad>", eos: str = "</s>", unk: str = "<unk>") -> None:
        self.symbols: list[str] = []
        self.count: list[int] = []
        self.indices: dict[str, int] = {}
        self.bos_word, self.pad_word, self.eos_word, self.unk_word = bos, pad, eos, unk
        self.bos_index = self.add_symbol(bos)
        self.pad_index = self.add_symbol(pad)
        self.eos_index = self.add_symbol(eos)
        self.unk_index = self.add_symbol(unk)
        self.nspecial = len(self.symbols)

    # ---- basics --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, sym: str) -> bool:
        return sym in self.indices

    def __getitem__(self, idx: int) -> str:
        return self.symbols[idx] if 0 <= idx < len(self.symbols) else self.unk_word

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols

    def index(self, sym: str) -> int:
        return self.indices.get(sym, self.unk_index)

    def bos(self) -> int:
        return self.bos_index

    def pad(self) -> int:
        return self.pad_index

    def eos(self) -> int:
        return self.eos_index

    def unk(self) -> int:
        return self.unk_index

    def add_symbol(self, word: str, n: int = 1, overwrite: bool = False) -> int:
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.count[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.count.append(n)
        return idx

    def fingerprint(self) -> str:
        """A short hash of the symbol list, to tell two dictionaries apart in messages and checkpoints."""
        return hashlib.sha1("\n".join(self.symbols).encode("utf-8")).hexdigest()[:12]

    # ---- building --------------------------------------------------------------------------------------
    @classmethod
    def from_counts(
        cls, counts: Counter[str] | dict[str, int], threshold: int = -1, nwords: int = -1, padding_factor: int = 8
    ) -> Dictionary:
        """fairseq-preprocess's dictionary: counts added in sorted order, then ``finalize``."""
        d = cls()
        for word, c in sorted(counts.items()):
            d.add_symbol(word, n=c)
        d.finalize(threshold, nwords, padding_factor)
        return d

    def finalize(self, threshold: int = -1, nwords: int = -1, padding_factor: int = 8) -> None:
        """Sort non-special symbols by count (desc), ties lexicographic; cut by threshold/nwords; pad."""
        if nwords <= 0:
            nwords = len(self)
        items = sorted(zip(self.symbols[self.nspecial :], self.count[self.nspecial :]))
        items.sort(key=lambda kv: -kv[1])  # stable: equal counts keep code-point order
        symbols, count = self.symbols[: self.nspecial], self.count[: self.nspecial]
        for word, c in items[: max(0, nwords - self.nspecial)]:
            if c < threshold:
                break
            symbols.append(word)
            count.append(c)
        self.symbols, self.count = symbols, count
        self.indices = {s: i for i, s in enumerate(symbols)}
        if padding_factor > 1:
            i = 0
            while len(self) % padding_factor != 0:
                self.add_symbol(f"madeupword{i:04d}", n=0)
                i += 1

    # ---- files ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Dictionary:
        """Read a fairseq ``dict.txt``; malformed or duplicate lines are one-line errors with the line number."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: dictionary not found; pass the dict.txt made by preprocess (or fairseq)")
        d = cls()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); is this really a dict.txt?") from None
        lines = text.splitlines() if "\r" in text else text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for lineno, raw in enumerate(lines, 1):
            line = raw.rstrip()
            try:
                word, field = line.rsplit(" ", 1)
                overwrite = False
                if field == "#fairseq:overwrite":
                    overwrite = True
                    word, field = word.rsplit(" ", 1)
                c = int(field)
            except ValueError:
                raise UserError(
                    f"{path}:{lineno}: malformed dictionary line {raw[:60]!r}; expected '<token> <count>'"
                ) from None
            if word in d and not overwrite:
                raise UserError(f"{path}:{lineno}: duplicate word {word!r}; remove it or mark it '#fairseq:overwrite'")
            d.add_symbol(word, n=c, overwrite=overwrite)
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write ``dict.txt`` atomically: non-special symbols with their counts, in id order."""
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for sym, c in zip(self.symbols[self.nspecial :], self.count[self.nspecial :]):
                f.write(f"{sym} {c}\n")

    # ---- text <-> ids ------------------------------------------------------------------------------------
    def encode_line(self, line: str, append_eos: bool = True) -> list[int]:
        """Whitespace split (fairseq's ``tokenize_line``), unknown words -> ``<unk>``, one ``</s>`` at the end."""
        ids = [self.indices.get(w, self.unk_index) for w in line.split()]
        if append_eos:
            ids.append(self.eos_index)
        return ids

    def string(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """ids -> words, dropping bos/eos/pad (as fairseq's ``string``), unknown ids shown as ``<unk>``."""
        skip = set() if keep_special else {self.bos_index, self.eos_index, self.pad_index}
        return " ".join(self[int(i)] for i in ids if int(i) not in skip)

    def diff(self, other: Dictionary) -> str | None:
        """None if equal, else how they differ (sizes, first differing symbol): for dictionary-mismatch errors."""
        if self.symbols == other.symbols:
            return None
        for i, (a, b) in enumerate(zip(self.symbols, other.symbols)):
            if a != b:
                return f"sizes {len(self)} vs {len(other)}, first difference at id {i}: {a!r} vs {b!r}"
        return f"sizes {len(self)} vs {len(other)} (one is a prefix of the other)"
