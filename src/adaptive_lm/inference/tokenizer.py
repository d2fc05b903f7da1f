"""Raw text <-> the word-level models' tokenisation (optional extra: ``pip install adaptive-lm[tokenize]``).

The released models expect WikiText / Billion Word tokenisation. fairseq's advice for them is Moses without
escaping and with aggressive dash splits (``tokenizer='moses'``), which writes in-word hyphens as ``@-@``.
WikiText also writes separators inside numbers as ``@,@`` and ``@.@`` (``1 @,@ 000``), which Moses leaves as
``1,000``; we add that step so that ``score("It cost 1,000 dollars.")`` sees the vocabulary's tokens.
"""

from __future__ import annotations

import re
from typing import Any

from adaptive_lm.core.errors import UserError

_NUM_SEP = re.compile(r"(?<=\d)([,.])(?=\d)")
_AT_SEP = re.compile(r" @([-,.])@ ")


class MosesTokenizer:
    def __init__(self, lang: str = "en") -> None:
        try:
            from sacremoses import MosesDetokenizer
            from sacremoses import MosesTokenizer as _Tok
        except ImportError:
            raise UserError("tokenizer='moses' needs sacremoses: pip install 'adaptive-lm[tokenize]'") from None
        self.tok, self.detok = _Tok(lang=lang), MosesDetokenizer(lang=lang)

    def tokenize(self, text: str) -> str:
        out = self.tok.tokenize(text, aggressive_dash_splits=True, escape=False, return_str=True)
        return _NUM_SEP.sub(r" @\1@ ", out)

    def detokenize(self, text: str) -> str:
        text = _AT_SEP.sub(r"\1", text)
        return self.detok.detokenize(text.split())


class TextPipeline:
    """Raw text <-> the dictionary's symbols in fairseq's hub order: ``encode`` tokenises, then applies the BPE;
    ``decode`` removes the BPE, then detokenises."""

    def __init__(self, tokenizer: Any = None, bpe: Any = None) -> None:
        self.tokenizer, self.bpe = tokenizer, bpe

    def encode(self, text: str) -> str:
        if self.tokenizer is not None:
            text = self.tokenizer.tokenize(text)
        if self.bpe is not None:
            text = self.bpe.encode(text)
        return text

    def decode(self, text: str) -> str:
        if self.bpe is not None:
            text = self.bpe.decode(text)
        if self.tokenizer is not None:
            text = self.tokenizer.detokenize(text)
        return text


def make_pipeline(tokenizer: str | None = None, bpe: str | None = None, **bpe_files: Any) -> TextPipeline | None:
    """The text pipeline fairseq's hub builds from ``tokenizer=`` and ``bpe=`` (None when the text is already in
    the model's symbols). ``tokenizer``: None/"space" or "moses"; ``bpe``: None, "gpt2" or "sentencepiece"."""
    if tokenizer in (None, "space", "none"):
        tok = None
    elif tokenizer == "moses":
        tok = MosesTokenizer()
    else:
        raise UserError(f"unknown tokenizer {tokenizer!r}: use 'moses' or leave it unset (pre-tokenised text)")
    enc = None
    if bpe not in (None, "none"):
        from adaptive_lm.inference.bpe import make_bpe

        enc = make_bpe(bpe, **bpe_files)
    return None if tok is None and enc is None else TextPipeline(tok, enc)
