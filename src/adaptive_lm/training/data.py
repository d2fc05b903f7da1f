"""The training data: the dictionary and splits a run reads, and the batches of the next update prepared while the
current one runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.data import EpochBatches, IndexedDataset, LMDataset, load_split
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.model import Routes
from adaptive_lm.training.config import TrainConfig
from adaptive_lm.training.report import Reporter


def _training_split(data: Path, subset: str, vocab_size: int, impl: str | None) -> IndexedDataset:
    """The training split, checked. fairseq-train reads it as ``train``, ``train1``, ``train2``, ... concatenated (its
    ``load_indexed_dataset(combine=True)``): with a ``train1`` here only ``train`` would be read, silently training on
    less data, so that is refused; so is an empty split (it had been 'no training batch (too little data ...)')."""
    extra = data / f"{subset}1"  # fairseq reads it as raw text if it exists, as binary if both its files do
    if extra.exists() or all(extra.with_name(f"{extra.name}.{e}").exists() for e in ("idx", "bin")):
        raise UserError(
            f"{extra}.idx: fairseq-train would train on {subset}, {subset}1, ... concatenated, which is not "
            f"reproduced; binarise the text as one --trainpref file, or rename {subset}1 if it is not training data"
        )
    split = load_split(data, subset, vocab_size=vocab_size, impl=impl)
    if len(split) == 0:
        raise UserError(
            f"{split.prefix}.idx: an empty split (0 lines); binarise a non-empty text (preprocess --trainpref)"
        )
    return split


def _data_folder(path: str) -> Path:
    """The data folder, refused in one line when it is a file, absent, or has no dict.txt."""
    data = Path(path)
    if data.is_file():  # a text file given where the binarised folder goes
        raise UserError(
            f"{data}: a file, not a data folder; pass the folder `adaptive-lm preprocess` writes "
            f"(e.g. adaptive-lm preprocess --trainpref {data} --destdir data-bin)"
        )
    if not data.exists():
        raise UserError(f"{data}: no such folder; pass the folder `adaptive-lm preprocess --destdir` wrote")
    if not (data / "dict.txt").is_file():
        raise UserError(f"{data}: no dict.txt; run `adaptive-lm preprocess --destdir {data}` first")
    return data


def load_datasets(cfg: TrainConfig, world: int, rank: int, add_bos: bool, log: Reporter):
    """The dictionary, the training split's batches and (unless disabled or absent) the validation batches."""
    data = _data_folder(cfg.data)
    dictionary = Dictionary.load(data / "dict.txt")
    train_split = _training_split(data, cfg.train_subset, len(dictionary), cfg.dataset_impl)
    train_data = LMDataset.from_split(train_split, cfg.tokens_per_sample, cfg.sample_break_mode, add_bos=add_bos)
    too_long = int((train_data.sizes > cfg.tokens_per_sample).sum())
    if too_long:
        raise UserError(
            f"{data}/{cfg.train_subset}: {too_long} samples are longer than --tokens-per-sample "
            f"{cfg.tokens_per_sample} (break mode {cfg.sample_break_mode}); raise --tokens-per-sample or use "
            f"--sample-break-mode none"
        )
    batches = EpochBatches(
        train_data, cfg.max_tokens, cfg.batch_size, cfg.seed, True, world, rank, cfg.required_batch_size_multiple
    )
    if len(batches) == 0:
        raise UserError(
            f"{data}/{cfg.train_subset}: no training batch (too little data for --max-tokens "
            f"{cfg.max_tokens} and --required-batch-size-multiple {cfg.required_batch_size_multiple})"
        )
    valid = None
    if "," in cfg.valid_subset and not cfg.disable_validation:
        raise UserError(
            f"--valid-subset {cfg.valid_subset}: one split only (fairseq validates on each of a comma-separated "
            "list, which is not reproduced); name one"
        )
    has_valid = (data / f"{cfg.valid_subset}.idx").is_file()
    if not cfg.disable_validation and not has_valid:
        if cfg.valid_subset != "valid":  # named on purpose: a typo must not turn validation off
            raise UserError(
                f"--valid-subset {cfg.valid_subset}: {data}/{cfg.valid_subset}.idx not found; name a split of "
                f"{data} or pass --disable-validation"
            )
        log.info(f"note: {data}/{cfg.valid_subset}.idx not found: training without validation")
    if not cfg.disable_validation and has_valid:
        split = load_split(data, cfg.valid_subset, vocab_size=len(dictionary), impl=cfg.dataset_impl)
        vds = LMDataset.from_split(split, cfg.tokens_per_sample, cfg.sample_break_mode, add_bos=add_bos)
        if cfg.skip_invalid_size_inputs_valid_test:
            vds = vds.subset(vds.sizes <= cfg.tokens_per_sample)
        elif (vds.sizes > cfg.tokens_per_sample).any():  # fairseq stops there too ("Size of sample #i is invalid")
            n = int((vds.sizes > cfg.tokens_per_sample).sum())
            raise UserError(
                f"{data}/{cfg.valid_subset}: {n} samples longer than --tokens-per-sample {cfg.tokens_per_sample} "
                f"(break mode {cfg.sample_break_mode}); skip them with --skip-invalid-size-inputs-valid-test"
            )
        valid = EpochBatches(
            vds,
            cfg.max_tokens_valid or cfg.max_tokens,
            cfg.batch_size_valid or cfg.batch_size,
            cfg.seed,
            False,
            world,
            rank,
            cfg.required_batch_size_multiple,
        )
    return dictionary, train_data, batches, valid


class Prefetcher:
    """Collates the next update's batches in a background thread (pinned memory and a non-blocking copy on CUDA)
    while the current update runs; on CPU it collates in line (a second thread only competes for the cores).
    With ``routes_for`` (the GPU path) it also finds each adaptive band's rows on the CPU (``model.Routes``), so
    the device never has to report them back to the host."""

    def __init__(self, data: LMDataset, groups: list[list], device: torch.device, background: bool,
                 routes_for: ModelConfig | None = None) -> None:  # fmt: skip
        self.data, self.groups, self.device = data, groups, device
        self.background, self.routes_for = background, routes_for
        self._next: Any = None
        self._thread: threading.Thread | None = None

    def _prepare(self, group: list) -> list[dict[str, Any]]:
        out = []
        for b in group:
            s = self.data.collate(b)
            if self.routes_for is not None and s["ntokens"]:
                s["routes"] = Routes(s["src_tokens"], s["target"], self.routes_for)
            if self.device.type == "cuda":
                for k in ("src_tokens", "target"):
                    s[k] = s[k].pin_memory().to(self.device, non_blocking=True)
                if "routes" in s:
                    s["routes"].to(self.device, non_blocking=True)
            out.append(s)
        return out

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        if not self.background:
            yield from (self._prepare(g) for g in self.groups)
            return
        box: dict[int, Any] = {}

        def work(i: int) -> None:
            box[i] = self._prepare(self.groups[i])

        t: threading.Thread | None = None
        for i in range(len(self.groups)):
            if t is None:
                work(i)
            else:
                t.join()
            t = None
            if i + 1 < len(self.groups):
                t = threading.Thread(target=work, args=(i + 1,), daemon=True)
                t.start()
            yield box.pop(i)
        if t is not None:
            t.join()
