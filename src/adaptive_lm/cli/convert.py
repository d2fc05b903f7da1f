"""``adaptive-lm convert``: any model we read -> our folder (safetensors), or back to a fairseq ``model.pt``."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptive_lm.cli.common import existing_file, model_path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=model_path, help="model to convert")
    p.add_argument("dst", help="output folder (or .pt file with --to fairseq)")
    p.add_argument(
        "--to",
        default="folder",
        choices=["folder", "fairseq"],
        help="folder: config.json + model.safetensors + dict.txt; fairseq: a model.pt for fairseq",
    )
    p.add_argument("--dict", default=None, type=existing_file, help="dictionary (default: the model's own)")


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.errors import UserError
    from adaptive_lm.inference.convert import convert

    dst = Path(ns.dst)
    if dst.is_file() and (ns.to == "folder" or dst.suffix != ".pt"):
        raise UserError(f"{dst}: a file, not a folder; name a new or existing folder for the converted model")
    print(f"wrote {convert(ns.src, ns.dst, to=ns.to, dictionary=ns.dict)}")
    return 0
