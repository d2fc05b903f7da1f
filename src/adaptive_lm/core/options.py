"""Config fields that describe their own command-line flag.

Why here, below everything: a config dataclass (training, evaluation, a datastore, an index, generation,
preprocessing) is plain data that the library takes; the command line is one way to fill it. Each field declares
its default once, with its help text, group, aliases and kind of value; ``adaptive_lm.cli`` generates the flags from
these fields and reads the parsed values back, so a flag shared by two commands is the same flag in both.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def opt(
    default: Any,
    help: str,
    group: str = "",
    *,
    flags: tuple[str, ...] = (),
    choices: Any = None,
    kind: Any = None,
    metavar: str | None = None,
    hidden: bool = False,
    positional: bool = False,
) -> Any:
    """A config field and its flag.

    ``kind``: how the value is checked when parsed: "positive", "nonneg", "prob", "bool" (a true/false word),
    "finite", "existing_dir", "existing_file", "creatable_dir", "model_path", or a type such as ``int``; by default
    the field's annotation decides. ``flags``: more names (fairseq's aliases; a single ``--no-x`` name makes a
    default-true switch). ``positional``: an argument, not a flag. ``hidden``: parsed but not listed in --help."""
    meta = dict(help=help, group=group, flags=flags, choices=choices, kind=kind, metavar=metavar, hidden=hidden,
                positional=positional)  # fmt: skip
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls: Any) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are command-line flags (those declared with ``opt``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata and "help" in f.metadata]
