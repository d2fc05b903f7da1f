"""Peak memory of scoring 3,072 tokens with the wiki103 preset at V = 267,744: target-only path vs the full
distribution, each in a fresh process (peak RSS), plus the model-only baseline.

    python benchmarks/bench_score_memory.py

The target-only path never builds a rows x V tensor (head: rows x 20,002; each tail only for its own rows), so
its extra memory does not grow with V x tokens; the full distribution is 3,072 x 267,744 floats = 3.3 GB.
"""

from __future__ import annotations

import json
import sys

from common import run, save, table

CODE = """
import json, resource, sys, time, torch
import adaptive_lm
torch.manual_seed(0)
with torch.device("meta"):
    m = adaptive_lm.build_model("transformer_lm_wiki103", 267_744)
m.to_empty(device="cpu"); m.tie_weights(); m.materialize_buffers()
with torch.no_grad():
    for p in m.parameters():
        p.normal_(0, 0.02)
m.eval()
x = torch.randint(4, 267_744, (1, 3072)); y = torch.randint(4, 267_744, (1, 3072))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.time()
with torch.no_grad():
    if sys.argv[1] == "target":
        out = m.target_log_probs(x, y)
    elif sys.argv[1] == "full":
        out = m.log_probs(x).gather(-1, y[..., None])[..., 0]
    else:
        out = m(x)
print(json.dumps({"seconds": time.time() - t0, "model_rss_mib": base,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    rows = []
    for mode in ("features only", "target", "full"):
        r = run([sys.executable, "-c", CODE, mode.split()[0]])
        info = json.loads(r["stdout"].strip().splitlines()[-1])
        rows.append(
            {
                "path": mode,
                "tokens": 3072,
                "seconds": round(info["seconds"], 1),
                "rss_after_model_mib": round(info["model_rss_mib"]),
                "peak_rss_mib": round(info["peak_rss_mib"]),
                "extra_over_model_mib": round(info["peak_rss_mib"] - info["model_rss_mib"]),
            }
        )
    print(table(rows, ["path", "tokens", "seconds", "rss_after_model_mib", "peak_rss_mib", "extra_over_model_mib"]))
    save("score_memory", {"rows": rows})


if __name__ == "__main__":
    main()
