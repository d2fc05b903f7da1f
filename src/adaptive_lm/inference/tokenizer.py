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


# fairseq's ``--tokenizer moses`` options (``MosesTokenizerConfig``), taken from from_pretrained's keywords or the
# checkpoint's ``cfg.tokenizer`` with fairseq's meaning
MOSES_ARGS = ("source_lang", "target_lang", "moses_no_dash_splits", "moses_no_escape")


class MosesTokenizer:
    """fairseq's Moses step with its options. Asked for by name (``tokenizer="moses"``) two defaults differ
    (docs/from-fairseq.md): no escaping unless ``moses_no_escape=False`` (fairseq's default escapes ``'`` as
    ``&apos;``, a word no WikiText vocabulary holds), and WikiText's number separators (``1 @,@ 000``,
    ``wikitext=True``). A checkpoint whose fairseq ``cfg.tokenizer`` is Moses gets fairseq's step exactly
    (its stored options, ``wikitext=False``): its text was tokenised so in training."""

    def __init__(
        self,
        source_lang: str = "en",
        target_lang: str = "en",
        moses_no_dash_splits: bool = False,
        moses_no_escape: bool = True,
        wikitext: bool = True,
    ) -> None:
        for name, value in (("source_lang", source_lang), ("target_lang", target_lang)):
            if not isinstance(value, str) or not value:
                raise UserError(f"tokenizer='moses': {name} must be a language code such as 'en', not {value!r}")
        for name, value in (("moses_no_dash_splits", moses_no_dash_splits), ("moses_no_escape", moses_no_escape)):
            if not isinstance(value, bool):
                raise UserError(f"tokenizer='moses': {name} must be True or False, not {value!r}")
        try:
            from sacremoses import MosesDetokenizer
            from sacremoses import MosesTokenizer as _Tok
        except ImportError:
            raise UserError("tokenizer='moses' needs sacremoses: pip install 'adaptive-lm[tokenize]'") from None
        self.tok, self.detok = _Tok(lang=source_lang), MosesDetokenizer(lang=target_lang)
        self.dash_splits, self.escape, self.wikitext = not moses_no_dash_splits, not moses_no_escape, wikitext

    def tokenize(self, text: str) -> str:
        out = self.tok.tokenize(text, aggressive_dash_splits=self.dash_splits, escape=self.escape, return_str=True)
        return _NUM_SEP.sub(r" @\1@ ", out) if self.wikitext else out

    def detokenize(self, text: str) -> str:
        text = _AT_SEP.sub(r"\1", text) if self.wikitext else text
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


def make_pipeline(
    tokenizer: str | None = None,
    bpe: str | None = None,
    tokenizer_args: dict[str, Any] | None = None,
    **bpe_files: Any,
) -> TextPipeline | None:
    """The text pipeline fairseq's hub builds from ``tokenizer=`` and ``bpe=`` (None when the text is already in
    the model's symbols). ``tokenizer``: None/"space" or "moses" (``tokenizer_args``: its ``MOSES_ARGS``); ``bpe``:
    None, "gpt2" or "sentencepiece"."""
    if tokenizer_args and tokenizer != "moses":
        raise UserError(f"{', '.join(sorted(tokenizer_args))}: options of tokenizer='moses', not of {tokenizer!r}")
    if tokenizer in (None, "space", "none"):
        tok = None
    elif tokenizer == "moses":
        tok = MosesTokenizer(**(tokenizer_args or {}))
    else:
        raise UserError(f"unknown tokenizer {tokenizer!r}: use 'moses' or leave it unset (pre-tokenised text)")
    enc = None
    if bpe not in (None, "none"):
        from adaptive_lm.inference.bpe import make_bpe

        enc = make_bpe(bpe, **bpe_files)
    return None if tok is None and enc is None else TextPipeline(tok, enc)
