"""``python -m adaptive_lm`` (and ``torchrun -m adaptive_lm train ...``) run the command-line interface."""

from adaptive_lm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
