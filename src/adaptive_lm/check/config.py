"""What one self-check run is asked to do: ``adaptive-lm check``'s flags, generated from these fields.

Why its own module: the command line builds its parser from this dataclass, and ``adaptive-lm check --help`` must
not pay for importing torch (everything else in this package needs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from adaptive_lm.core.options import opt

GROUPS = ("env", "kernels", "model", "trainer", "distributed", "recipe", "eval")


@dataclass
class CheckConfig:
    """The run's switches; the sizes follow from ``dry_run`` / ``quick`` (``check.context.PLANS``)."""

    dry_run: bool = opt(False, "run on the CPU with the plain kernels (automatic without CUDA)")
    quick: bool = opt(False, "the smallest sizes (what tests/test_gpu_check.py runs)")
    only: str = opt(
        "",
        f"comma-separated groups ({', '.join(GROUPS)}) or parts of check names (default: every check)",
        metavar="LIST",
    )
    out: str = opt(
        ".",
        "JSON report: a file, or a folder that gets gpu_check.json (gpu_check_dry.json for a dry run, so that it "
        "never overwrites a GPU result); default: the current folder",
        metavar="PATH",
    )
    workdir: str | None = opt(
        None,
        "where generated data and checkpoints go (kept); default: a temporary folder",
        kind="creatable_dir",
        metavar="DIR",
    )
    keep: bool = opt(False, "keep the temporary folder")
    verbose: bool = opt(False, "show the trainer's log lines")
    fixture: str | None = opt(
        None,
        "a fairseq-tiny fixture folder (model/checkpoint_best.pt + data-bin): check fairseq-eval-lm's perplexity "
        "on it (default: that check is SKIP)",
        kind="existing_dir",
        metavar="DIR",
    )

    def selection(self) -> set[str] | None:
        """``--only`` as a set of words (None: every check)."""
        return {x.strip() for x in self.only.split(",") if x.strip()} or None
