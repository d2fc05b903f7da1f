"""The GPU self-check (``adaptive-lm check``)."""
