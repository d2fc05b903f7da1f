"""``adaptive-lm check``: the GPU self-check. On a CUDA machine every check (< 8 min on one H100/H200); with
``--dry-run`` (automatic without CUDA) the GPU code path on the CPU at reduced sizes; ``--quick`` the smallest.

The checks live in ``adaptive_lm.check``; this module turns the flags into a ``CheckConfig``, shows the progress
lines on stderr while they run, then prints the report and says where the JSON went. Exit 1 if anything FAILed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from adaptive_lm.check.config import CheckConfig
from adaptive_lm.cli.common import add_config_flags, config_from_args, console_log
from adaptive_lm.core.errors import UserError

EXAMPLES = """examples:
  adaptive-lm check                              # on a CUDA machine: every check
  adaptive-lm check --dry-run                    # CPU: the GPU code path (plain kernels), reduced sizes
  adaptive-lm check --dry-run --quick            # the smallest settings (what tests/test_gpu_check.py runs)
  adaptive-lm check --only kernels,model --out /tmp/check.json
"""


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EXAMPLES
    add_config_flags(p, CheckConfig)


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.check.inference import FIXTURE_LAYOUT
    from adaptive_lm.check.run import main

    if ns.fixture is not None:  # a usage error, not a failed check of the machine
        missing = [x for x in FIXTURE_LAYOUT if not (Path(ns.fixture) / x).is_file()]
        if missing:
            raise UserError(f"--fixture {ns.fixture}: no {', '.join(missing)} (a fairseq-tiny folder: "
                            f"{' + '.join(FIXTURE_LAYOUT)})")  # fmt: skip
    with console_log(sys.stderr):
        outcome = main(config_from_args(CheckConfig, ns))
    print(outcome.text(shutil.get_terminal_size((160, 24)).columns))
    print(f"wrote {outcome.out}")
    return outcome.exit_code
