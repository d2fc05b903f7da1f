"""One exception type for bad input: the CLI prints its message as one line instead of a traceback."""


class UserError(Exception):
    """Something the user can fix (a file, a flag, a mismatch); the message names it and says what to do."""
