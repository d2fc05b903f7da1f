"""Peak RSS and time to load a ~1B-parameter fairseq checkpoint shaped like the Billion Word "huge" model.

    python benchmarks/bench_load.py [--dir /tmp/gbw-synthetic]

Shape (assumed; the archive's stored args are not available offline): d=1280, FFN 8192, 16 heads, 32 pre-LN
layers, adaptive input/softmax with cutoffs 60000,100000,640000, factor 4, tied embeddings and projections,
V = 793,472 (GBW's ~800k types). That is 1.02B unique parameters, the paper's 1026M within 1%.
The checkpoint is written in fairseq's layout (tied tensors under every name, split q/k/v, an argparse
Namespace under ``args``), then loaded in a fresh process by ``adaptive_lm.from_pretrained`` (fp32 and bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from common import run, save, table

SHAPE = dict(
    decoder_layers=32,
    decoder_embed_dim=1280,
    decoder_ffn_embed_dim=8192,
    decoder_attention_heads=16,
    adaptive_input_cutoff=(60000, 100000, 640000),
    adaptive_softmax_cutoff=(60000, 100000, 640000),
    max_target_positions=512,
)
VOCAB = 793_472

LOADER = """
import json, resource, sys, time, torch
t0 = time.time()
import adaptive_lm
dtype = None if sys.argv[2] == "fp32" else torch.bfloat16
lm = adaptive_lm.from_pretrained(sys.argv[1], dtype=dtype)
with torch.no_grad():
    out = lm.model.target_log_probs(torch.tensor([[2, 5, 70000, 700000]]), torch.tensor([[5, 70000, 700000, 9]]))
assert torch.isfinite(out).all()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda k: int(status[k].split()[0]) / 1024
print(json.dumps({"seconds": time.time() - t0, "params": lm.model.num_parameters(),
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mib": kib("RssAnon"), "file_mib": kib("RssFile")}))
"""


def build(dest: Path) -> Path:
    from adaptive_lm import build_model
    from adaptive_lm.core.dictionary import Dictionary
    from adaptive_lm.core.fairseq_format import to_fairseq_checkpoint
    from adaptive_lm.inference.hub import LanguageModel

    path = dest / "model.pt"
    if path.exists():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = build_model(
            "transformer_lm_gbw", VOCAB, adaptive_input=True, tie_adaptive_weights=True, tie_adaptive_proj=True, **SHAPE
        )
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.tie_weights()
    model.materialize_buffers()
    d = Dictionary()
    for i in range(VOCAB - 4):
        d.add_symbol(f"w{i}", n=1)
    lm = LanguageModel(model, d, "", 512)
    ck = to_fairseq_checkpoint(lm.model, lm.cfg, lm.tokens_per_sample)
    settings = ck["cfg"]["model"]
    settings["arch"] = settings.pop("_name")
    ck["args"], ck["cfg"] = argparse.Namespace(**settings), None
    torch.save(ck, path)
    d.save(dest / "dict.txt")
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, {model.num_parameters():,} parameters)")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/gbw-synthetic")
    args = ap.parse_args()
    path = build(Path(args.dir))
    size = path.stat().st_size / 2**20
    rows = []
    for dtype in ("fp32", "bf16"):
        os.system("sync")
        r = run([sys.executable, "-c", LOADER, str(path), dtype])
        info = json.loads(r["stdout"].strip().splitlines()[-1])
        rows.append(
            {
                "dtype": dtype,
                "params": f"{info['params']:,}",
                "file_mib": round(size),
                "load_s": round(info["seconds"], 1),
                "peak_rss_mib": round(info["maxrss_mib"]),
                "rss/file": round(info["maxrss_mib"] / size, 2),
                "anon_after_mib": round(info["anon_mib"]),
                "mapped_file_after_mib": round(info["file_mib"]),
            }
        )
    print(
        table(
            rows,
            [
                "dtype",
                "params",
                "file_mib",
                "load_s",
                "peak_rss_mib",
                "rss/file",
                "anon_after_mib",
                "mapped_file_after_mib",
            ],
        )
    )
    print("peak RSS counts the memory-mapped checkpoint pages read (page cache, reclaimable), not only allocations")
    save("load", {"rows": rows, "shape": {**SHAPE, "vocab": VOCAB}})


if __name__ == "__main__":
    main()
