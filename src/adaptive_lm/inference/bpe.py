"""fairseq's BPE step of the hub's text pipeline (``fairseq/data/encoders/gpt2_bpe.py``, ``sentencepiece_bpe.py``),
through maintained libraries (the ``[bpe]`` extra): HF ``tokenizers`` for GPT-2's byte-level BPE, ``sentencepiece``.

* ``gpt2``: text -> GPT-2 BPE ids (``encoder.json`` + ``vocab.bpe``), written as the decimal strings fairseq's
  ``dict.txt`` holds (``"464 3290"``); decoding maps ids back to bytes (GPT-2's byte <-> unicode table), undecodable
  bytes replaced, and keeps symbols that are not ids (``<unk>``) as they are, as fairseq's encoder does.
* ``sentencepiece``: text -> pieces joined by spaces; decoding joins the pieces and turns ``\u2581`` into spaces.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from adaptive_lm.core.errors import UserError

SPM_SPACE = "\u2581"


def _need(module: str, what: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"bpe={what!r} needs {module}: pip install 'adaptive-lm[bpe]'") from None


def _file(path: Any, flag: str, what: str) -> str:
    if not path:
        cli = "--" + flag.replace("_", "-")
        raise UserError(f"bpe={what!r} needs {flag}=PATH ({cli} PATH; or the file in the model's folder)")
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file ({flag})")
    return str(path)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (``gpt2_bpe_utils.bytes_to_unicode``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GPT2BPE:
    """fairseq's ``--bpe gpt2``: ``encode`` gives space-separated GPT-2 ids, ``decode`` takes them back to text."""

    def __init__(self, gpt2_encoder_json: str | None = None, gpt2_vocab_bpe: str | None = None) -> None:
        enc = _file(gpt2_encoder_json, "gpt2_encoder_json", "gpt2")
        merges = _file(gpt2_vocab_bpe, "gpt2_vocab_bpe", "gpt2")
        tokenizers = _need("tokenizers", "gpt2")
        try:
            self.tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(enc, merges))
            self.token_of = {i: t for t, i in json.loads(Path(enc).read_text(encoding="utf-8")).items()}
        except Exception as e:  # the library's own errors (bad JSON, bad merges, bytes that are not UTF-8)
            raise UserError(
                f"{enc} / {merges}: not GPT-2 BPE files ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "pass fairseq's encoder.json and vocab.bpe"
            ) from None
        # GPT-2's pre-tokenisation regex and byte mapping, no prefix space: what fairseq's Encoder does
        self.tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self.byte_of = {c: b for b, c in byte_to_unicode().items()}

    def encode(self, text: str) -> str:
        return " ".join(str(i) for i in self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, text: str) -> str:
        chars = "".join(self.token_of.get(int(t), t) if t.isdigit() else t for t in text.split())
        return bytes(self.byte_of[c] for c in chars).decode("utf-8", errors="replace")


class SentencePieceBPE:
    """fairseq's ``--bpe sentencepiece`` (no sampling)."""

    def __init__(self, sentencepiece_model: str | None = None) -> None:
        path = _file(sentencepiece_model, "sentencepiece_model", "sentencepiece")
        spm = _need("sentencepiece", "sentencepiece")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its parser's message
            raise UserError(
                f"{path}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "pass the model's .model file"
            ) from None

    def encode(self, text: str) -> str:
        return " ".join(self.sp.encode(text, out_type=str))

    def decode(self, text: str) -> str:
        return text.replace(" ", "").replace(SPM_SPACE, " ").strip()


def make_bpe(name: str, **files: Any) -> GPT2BPE | SentencePieceBPE:
    """The BPE fairseq's hub builds for ``bpe=name`` from these files."""
    if name == "gpt2":
        return GPT2BPE(files.get("gpt2_encoder_json"), files.get("gpt2_vocab_bpe"))
    if name == "sentencepiece":
        return SentencePieceBPE(files.get("sentencepiece_model"))
    raise UserError(f"unknown bpe {name!r}: use 'gpt2' or 'sentencepiece' (fairseq's other BPEs are not supported)")
