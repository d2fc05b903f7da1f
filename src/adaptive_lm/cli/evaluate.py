"""``adaptive-lm eval``: fairseq-eval-lm's perplexity of a binarised split, optionally with kNN-LM; its printing."""

from __future__ import annotations

import argparse
from pathlib import Path

from adaptive_lm.cli.common import (
    add_config_flags,
    add_model_flags,
    config_from_args,
    creatable_dir,
    existing_dir,
    half_notice,
    load_model,
    nonneg_int,
    positive_float,
    positive_int,
    unk_line,
    weight,
)
from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.evaluate import EvalConfig

HELP = "perplexity of a binarised split (fairseq-eval-lm), optionally with kNN-LM"


def add_args(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, EvalConfig)
    add_model_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--output-word-probs", action="store_true", help="ID word [ln p] per block, in fairseq's order")
    g.add_argument(
        "--output-word-stats",
        action="store_true",
        help="per word: count, sum of ln p, is-bpe, next word's sum of ln p, count with a next word",
    )
    g.add_argument("--post-process", "--remove-bpe", nargs="?", const="subword_nmt", default=None,
                   metavar="{subword_nmt,'@@ '}",
                   help="merge subword-nmt pieces into words for the loss and the word outputs (fairseq 0.12: only "
                   "'@@ ' merges; the bare flag's subword_nmt finds no piece)")  # fmt: skip
    g.add_argument("--freq-bins", action="store_true", help="loss per word-frequency band")
    g.add_argument(
        "--plot",
        default=None,
        help="figure of the frequency-band losses: .png, .pdf or .svg, or a folder "
        "(gets freq_bins.png) (needs the [plot] extra)",
    )
    g.add_argument(
        "--results-path", type=creatable_dir, default=None, help="also write the output to RESULTS_PATH/eval-SUBSET.txt"
    )
    g.add_argument(
        "--quiet", action="store_true", help="print only results: closing lines, word probabilities and stats if asked"
    )
    g.add_argument("--num-workers", type=nonneg_int, default=0, help="accepted for compatibility (ignored)")
    k = p.add_argument_group("kNN-LM (Khandelwal et al. 2020; see adaptive-lm knn-store)")
    k.add_argument("--knn", type=existing_dir, default=None, metavar="DSTORE", help="interpolate with this datastore")
    # defaults None here and filled in with --knn: given without --knn they are refused, not ignored
    k.add_argument("--k", type=positive_int, default=None, help=f"neighbours per token (default: {KNN_DEFAULTS['k']})")
    k.add_argument("--lmbda", type=weight, default=None,
                   help=f"weight of the kNN distribution (default: {KNN_DEFAULTS['lmbda']})")  # fmt: skip
    k.add_argument("--knn-temp", type=positive_float, default=None,
                   help=f"softmax temperature over -distances (default: {KNN_DEFAULTS['knn_temp']:g})")  # fmt: skip
    k.add_argument("--knn-sim", default=None, choices=["l2", "ip"],
                   help="similarity: -squared L2 (default) or inner product")  # fmt: skip
    k.add_argument("--knn-approx-dists", action="store_true", help="use the index's approximate distances")
    k.add_argument(
        "--nprobe",
        type=positive_int,
        default=None,
        help="IVF lists searched (default: the value knn-index recorded, 32 unless given there)",
    )


KNN_DEFAULTS = {"k": 1024, "lmbda": 0.25, "knn_temp": 1.0, "knn_sim": "l2"}
KNN_FLAGS = ("k", "lmbda", "knn_temp", "knn_sim", "knn_approx_dists", "nprobe")


def run(ns: argparse.Namespace) -> int:
    from adaptive_lm.inference.evaluate import evaluate, summary_lines

    given = [f"--{f.replace('_', '-')}" for f in KNN_FLAGS if getattr(ns, f) not in (None, False)]
    if given and not ns.knn:
        raise UserError(f"{', '.join(given)} set the kNN-LM interpolation: add --knn DSTORE (or drop them)")
    for name, value in KNN_DEFAULTS.items():
        if getattr(ns, name) is None:
            setattr(ns, name, value)

    if ns.bf16 and ns.fp16:
        raise UserError("--bf16 and --fp16 together: choose one autocast type")
    from adaptive_lm.inference.eval_words import continuation, post_process, word_lines

    cont = continuation(ns.post_process)
    details = ns.output_word_probs or ns.output_word_stats or ns.freq_bins or ns.plot or cont is not None
    if ns.knn and details:
        raise UserError("--output-word-probs, --output-word-stats, --post-process, --freq-bins and --plot report "
                        "the LM's own scores: run them without --knn")  # fmt: skip
    if ns.plot:  # the figure's real name (a folder gets freq_bins.png, a bare name .png), checked before the work
        from adaptive_lm.cli.plot import figure_path

        ns.plot = str(figure_path(ns.plot, "freq_bins.png", "--plot"))
    from adaptive_lm.inference.loading import NoDictionary

    try:
        lm = load_model(ns)
    except NoDictionary:  # a bare fairseq checkpoint: the data's dictionary, as fairseq-eval-lm always takes
        if ns.dict is not None or not (Path(ns.data) / "dict.txt").is_file():
            raise
        ns.dict = str(Path(ns.data) / "dict.txt")
        lm = load_model(ns)
    half_notice(ns, lm.device.type)
    cfg = config_from_args(EvalConfig, ns)
    lines = [f"model {ns.path}: {lm.model.num_parameters():,} parameters, vocabulary {len(lm.dictionary)}"]
    if ns.knn:
        from adaptive_lm.inference.knn import knn_evaluate, knn_summary_lines

        res = knn_evaluate(
            lm,
            cfg,
            ns.knn,
            k=ns.k,
            lmbda=ns.lmbda,
            temperature=ns.knn_temp,
            sim=ns.knn_sim,
            approximate=ns.knn_approx_dists,
            nprobe=ns.nprobe,
        )
        return emit(ns, lines + knn_summary_lines(res))
    scored = evaluate(lm, cfg, keep_scores=bool(details))  # per token (the <unk> note and frequency bands)
    res, pieces = post_process(scored, lm.dictionary, cont) if cont is not None else (scored, None)  # per word
    lines.append(res.plan)
    probs, stats = [], []
    if ns.output_word_probs or ns.output_word_stats:
        probs, stats = word_lines(res, lm.dictionary, cont, pieces, ns.output_word_probs, ns.output_word_stats)
    freq = _frequency_lines(ns, scored, lm) if ns.freq_bins or ns.plot else []
    unk = unk_line(scored.n_unk, scored.n_tokens, False, f"{ns.data}/{ns.gen_subset}", binarised=True)
    done, loss = summary_lines(res)  # fairseq prints the word stats between them
    # --quiet leaves out the plan and notes, not what was asked for (fairseq-eval-lm prints word probabilities and
    # statistics whatever --quiet says; the frequency bands and the plot are asked for too)
    asked = [*freq, *probs, done, *stats, loss]
    return emit(ns, lines + ([unk] if unk else []) + asked, closing=asked)


def _frequency_lines(ns: argparse.Namespace, res, lm) -> list[str]:
    from adaptive_lm.core.metrics import perplexity
    from adaptive_lm.inference.evaluate import frequency_bins

    bins = frequency_bins(res, lm)
    lines = ["loss by frequency band (ids are sorted by training frequency):"]
    lines += [f"  {name:>24}: {n:>9,} tokens, loss (base 2) {loss:.4f}, ppl {perplexity(loss):.2f}"
              for name, n, loss in bins]  # fmt: skip
    if ns.plot:
        from adaptive_lm.core.plots import plot_bins

        plot_bins(bins, ns.plot)
        lines.append(f"wrote {ns.plot}")
    return lines


def emit(ns: argparse.Namespace, lines: list[str], closing: list[str] | None = None) -> int:
    """Print (all lines, or with --quiet the closing ones: by default the last two) and, with --results-path, write
    them all to a file."""
    print("\n".join((closing or lines[-2:]) if ns.quiet else lines))
    if ns.results_path:
        from adaptive_lm.core.files import atomic_write_text

        Path(ns.results_path).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(ns.results_path) / f"eval-{ns.gen_subset}.txt", "\n".join(lines) + "\n")
    return 0
