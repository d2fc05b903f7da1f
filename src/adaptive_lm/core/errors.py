"""The exceptions for bad input: the CLI prints their message as one line instead of a traceback."""


class UserError(Exception):
    """Something the user can fix (a file, a flag, a mismatch); the message names it and says what to do."""


class ConfigError(ValueError):
    """A configuration the model cannot be built from; the message says what to change."""
