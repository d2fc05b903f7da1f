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
    p.add_argument("--overwrite", action="store_true", help="replace files already at the destination")


def outputs(dst: Path, to: str) -> list[Path]:
    """The files ``convert`` writes for ``dst`` and ``--to``."""
    if to == "folder":
        return [dst / "config.json", dst / "model.safetensors", dst / "dict.txt"]
    if dst.suffix == ".pt":
        return [dst, dst.parent / "dict.txt"]
    return [dst / "model.pt", dst / "dict.txt"]


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.core.errors import UserError
    from adaptive_lm.inference.convert import convert

    dst = Path(ns.dst)
    if dst.is_file() and (ns.to == "folder" or dst.suffix != ".pt"):
        raise UserError(f"{dst}: a file, not a folder; name a new or existing folder for the converted model")
    blocked = next((q for q in dst.absolute().parents if q.exists()), None)
    if blocked is not None and not blocked.is_dir():  # mkdir said only 'File exists' or 'Not a directory'
        raise UserError(f"{dst}: {blocked} is a file, not a folder; name a destination under a folder")
    src = Path(ns.src)
    sources = [f for f in (src.iterdir() if src.is_dir() else [src]) if f.is_file()]
    for out in outputs(dst, ns.to):
        if out.exists() and any(out.samefile(f) for f in sources if f.name != "dict.txt"):
            raise UserError(f"{out}: that is the model being converted; name another destination")
        if out.exists() and not ns.overwrite:
            raise UserError(f"{out} exists: name a new destination, or pass --overwrite to replace it")
    print(f"wrote {convert(ns.src, ns.dst, to=ns.to, dictionary=ns.dict)}")
    return 0
