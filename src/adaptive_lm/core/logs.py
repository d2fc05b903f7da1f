"""Showing the library's log lines somewhere for the length of a block: the command line on stdout, the GPU check in a
buffer it reads. One mechanism, so that both restore the logger exactly as they found it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def log_lines_to(stream: TextIO, name: str = "adaptive_lm", propagate: bool = False) -> Iterator[TextIO]:
    """Within the block, INFO lines of logger ``name`` (and its children) go to ``stream`` as plain lines; with
    ``propagate`` they also reach the caller's own handlers. Yields ``stream``."""
    logger = logging.getLogger(name)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = propagate
    try:
        yield stream
    finally:
        handler.flush()
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = before
