"""Raw text <-> the word-level models' tokenisation (optional extra: ``pip install adaptive-lm[tokenize]``).

The released models expect WikiText / Billion Word tokenisation. fairseq's advice for them is Moses without
escaping and with aggressive dash splits (``tokenizer='moses'``), which writes in-word hyphens as ``@-@``.
WikiText also writes separators inside numbers as ``@,@`` and ``@.@`` (``1 @,@ 000``), which Moses leaves as
``1,000``; we add that step so that ``score("It cost 1,000 dollars.")`` sees the vocabulary's tokens.
"""

from __future__ import annotations

import re

from .errors import UserError

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
