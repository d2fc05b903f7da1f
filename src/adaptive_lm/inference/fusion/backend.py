"""pyctcdecode, the optional ``[asr]`` extra: imported once here, quietly, with stand-ins when it is absent, so that
``import adaptive_lm.inference.fusion`` works without it and the fusion classes refuse to be built with one line
naming the extra (``require_pyctcdecode``)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

from adaptive_lm.core.errors import UserError

MISSING = "shallow fusion needs pyctcdecode: pip install 'adaptive-lm[asr]' (or pip install pyctcdecode)"
_KENLM_WARNERS = ("pyctcdecode.decoder", "pyctcdecode.language_model")  # both log "kenlm is not installed"


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers to ``level`` for the block only; each gets its own previous level back afterwards,
    also when the block raises.

    Why: importing pyctcdecode without kenlm logs a warning that kenlm is not installed from two of its modules.
    Fusion never uses kenlm (our model replaces it), so the warning would only mislead; but the user's logging setup
    is theirs, so the levels are changed for the import alone, never left changed."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, saved):
            lg.setLevel(lv)


with quiet_loggers(_KENLM_WARNERS):
    try:
        from pyctcdecode.alphabet import Alphabet
        from pyctcdecode.constants import AVG_TOKEN_LEN, LOG_BASE_CHANGE_FACTOR
        from pyctcdecode.decoder import BeamSearchDecoderCTC, _merge_tokens
        from pyctcdecode.language_model import AbstractLanguageModel

        HAVE_PYCTCDECODE = True
    except ImportError:  # stand-ins, so the subclasses can be defined; building one then fails in require_pyctcdecode
        AbstractLanguageModel, BeamSearchDecoderCTC = object, object  # type: ignore[misc,assignment]
        Alphabet, _merge_tokens = None, None  # type: ignore[assignment,misc]
        AVG_TOKEN_LEN, LOG_BASE_CHANGE_FACTOR = 6, 1.0 / math.log10(math.e)
        HAVE_PYCTCDECODE = False


def require_pyctcdecode() -> None:
    """One line naming the extra when pyctcdecode is not installed."""
    if not HAVE_PYCTCDECODE:
        raise UserError(MISSING)


__all__ = [
    "AVG_TOKEN_LEN",
    "HAVE_PYCTCDECODE",
    "LOG_BASE_CHANGE_FACTOR",
    "MISSING",
    "AbstractLanguageModel",
    "Alphabet",
    "BeamSearchDecoderCTC",
    "_merge_tokens",
    "quiet_loggers",
    "require_pyctcdecode",
]
