"""``adaptive-lm quickstart``: the whole pipeline on a generated corpus (no network): corpus -> preprocess -> train
(the recipe's NAG + cosine, scaled down) -> validation perplexity against the best possible -> a sample.

It works in a folder of its own: a new or empty one, or one it made before (marked by ``MARKER``), whose
checkpoints it replaces after a finished run (``DONE``) and resumes from after an interrupted one. Any other
non-empty folder is refused: it never deletes what it did not create.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from adaptive_lm.cli.common import console_log, creatable_dir, positive_int
from adaptive_lm.core.errors import UserError

MARKER = ".adaptive-lm-quickstart"
DONE = ".adaptive-lm-quickstart-done"  # the last run finished: the next one starts afresh


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="quickstart-run", type=creatable_dir,
                   help="working folder: new, empty, or an earlier quickstart's (default: quickstart-run)")  # fmt: skip
    p.add_argument("--updates", type=positive_int, default=300, help="training updates (default: 300)")


def run(ns: argparse.Namespace) -> int:
    result = quickstart(ns.dir, ns.updates)
    if result.get("signal"):  # training saved and stopped: nothing to report, the same command resumes
        print(f"quickstart interrupted during training: `adaptive-lm quickstart --dir {ns.dir}` resumes it",
              file=sys.stderr)  # fmt: skip
        return 128 + result["signal"]
    return 0


def claim_folder(d: Path) -> None:
    """Make ``d`` ours (new or empty), or reuse it if an earlier quickstart made it; refuse anything else."""
    if d.exists() and any(d.iterdir()) and not (d / MARKER).is_file():
        raise UserError(f"{d}: not empty and not a quickstart folder (no {MARKER}); pass --dir with a new folder")
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("made by adaptive-lm quickstart; it may replace the files it wrote here\n")
    if (d / DONE).is_file():  # ours (the marker says so): a fresh run after a finished one, else training resumes
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
        (d / DONE).unlink()


def quickstart(run_dir: str = "quickstart-run", updates: int = 300) -> dict[str, Any]:
    from adaptive_lm.core.corpus import Corpus
    from adaptive_lm.core.metrics import perplexity, perplexity_nats
    from adaptive_lm.core.preprocess import PreprocessConfig, preprocess
    from adaptive_lm.inference.loading import from_pretrained
    from adaptive_lm.training.loop import train

    t0 = time.time()
    d = Path(run_dir)
    claim_folder(d)
    corpus = Corpus()
    h = corpus.entropy_rate()
    print(f"[1/3] generating a corpus: {corpus.vocab} Zipfian word types, exact entropy rate {h:.3f} nats/token "
          f"(best possible perplexity {perplexity_nats(h):.1f})")  # fmt: skip
    corpus.write(d / "train.txt", 200_000)
    corpus.write(d / "valid.txt", 20_000)
    print("[2/3] preprocessing")
    pc = PreprocessConfig(trainpref=str(d / "train.txt"), validpref=str(d / "valid.txt"), destdir=str(d / "data-bin"))
    print("      " + "\n      ".join(preprocess(pc)))
    print(f"[3/3] training a small adaptive-input model for {updates} updates (NAG, cosine, clip 0.1)")
    with console_log():
        result = train(small_recipe(d, updates))
        if not result["signal"] and not result["history"]:
            # the checkpoint had already reached --updates (interrupted after training, during the sample; a folder
            # of an older version; a smaller --updates): nothing trained, nothing validated (perplexity nan before)
            print("      the checkpoint had already done these updates: training afresh")
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
            result = train(small_recipe(d, updates))
    if result["signal"]:
        return {"signal": result["signal"]}
    val = result["valid_loss"]
    ppl = perplexity(val) if val is not None else float("nan")
    lm = from_pretrained(d / "checkpoints" / "checkpoint_last.pt")
    sample = lm.sample(corpus.words[0][0], sampling=True, sampling_topk=20, seed=0, max_len_b=25)
    _report(d, time.time() - t0, ppl, perplexity_nats(h), sample, corpus.words[0][0])
    (d / DONE).write_text("")
    return {"valid_ppl": ppl, "best_ppl": perplexity_nats(h), "sample": sample}


def small_recipe(d: Path, updates: int) -> Any:
    """The seed recipe's optimisation (NAG, lr 1.0, warmup, one cosine period, clip 0.1) on a 2-layer d=128 model."""
    from adaptive_lm.training.config import TrainConfig

    warmup = max(1, updates // 10)
    model = dict(decoder_layers=2, decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_attention_heads=4,
                 adaptive_input_cutoff=(2000, 6000), adaptive_softmax_cutoff=(2000, 6000), dropout=0.1)  # fmt: skip
    return TrainConfig(
        data=str(d / "data-bin"), save_dir=str(d / "checkpoints"), arch="transformer_lm_wiki103",
        model_overrides=model, max_update=updates, lr=1.0, warmup_updates=warmup, warmup_init_lr=1e-7,
        min_lr=1e-4, lr_period_updates=updates - warmup, t_mult=2, lr_shrink=0.75, clip_norm=0.1, max_tokens=2048,
        tokens_per_sample=256, log_interval=max(1, updates // 6), no_epoch_checkpoints=True, cpu=True,
    )  # fmt: skip


def _report(d: Path, seconds: float, ppl: float, best: float, sample: str, word: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:  # optional
        plot_note = "\n  (pip install 'adaptive-lm[plot]' for a PNG of the curves)"
    else:
        from adaptive_lm.core.plots import plot_run

        try:
            plot_run(d / "checkpoints", d / "curves.png")
            plot_note = f"\n  curves:      {d / 'curves.png'}"
        except UserError as e:
            plot_note = f"\n  (no curves: {e})"
    ckpt = d / "checkpoints" / "checkpoint_last.pt"
    print(f"\nquickstart done in {seconds:.0f}s")
    print(f"  data:        {d / 'data-bin'}")
    print(f"  checkpoints: {d / 'checkpoints'}{plot_note}")
    print(f"  validation perplexity {ppl:.1f}; best possible on this corpus {best:.1f} (exact entropy rate)")
    print(f"  a sample:    {sample}")
    print("next:")
    print(f"  adaptive-lm eval {d / 'data-bin'} --path {ckpt} --gen-subset valid --context-window 128")
    print(f"  adaptive-lm generate --path {ckpt} --prompt '{word}' --sampling --sampling-topk 20")
    print(f"  adaptive-lm plot {d / 'checkpoints'}")
