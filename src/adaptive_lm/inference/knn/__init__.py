"""kNN-LM (Khandelwal et al., ICLR 2020) on our models: a datastore, a FAISS index over it, interpolated evaluation.

The released WikiText-103 model is mostly used today as the base of kNN-LM (valid 17.96 -> 16.06, test 18.65 ->
16.12), through ``urvashik/knnlm``, an unmaintained 2019 fairseq fork whose datastore is written in one
unresumable pass of ~400 GB with int16 values that overflow WikiText-103's ids (knnlm#6). Here:

* ``adaptive-lm knn-store DATA --path MODEL --dstore DIR`` (``store``) walks a split with ``adaptive-lm eval``'s
  exact block and context-window semantics (``evaluate.plan`` / ``evaluate.scored_batches``) and writes, for every
  scored token, the key (``keys``: ``last_ffn_input``, the input of the last layer's ``fc1``, knnlm's default; or
  ``final``, the features before the softmax), the value (the target id, int32) and the LM's log-prob of the token,
  into ``.npy`` files preallocated from the plan's token count (memory bounded whatever the split's size).
  ``manifest.json`` (``records``) holds what the store was made from (model weights, dictionary, settings, data)
  and how far it got: an interrupted run continues where it stopped, and a store of another model, dictionary or
  setting is refused, never overwritten.
* ``adaptive-lm knn-index DIR`` (``index``) builds knnlm's IVF-PQ index (or an exact flat one) with FAISS, recorded
  against the store's fingerprint in ``index.json``.
* ``adaptive-lm eval ... --knn DIR`` (``evaluate.knn_evaluate``) and the Python API (``search.KNN``, ``knn_score``)
  interpolate: ``log(lambda * p_kNN + (1 - lambda) * p_LM)``, where p_kNN is the softmax over the k neighbours of
  ``-(squared L2 distance) / temperature`` (or the inner product), recomputed in float64 from the stored keys
  (knnlm's ``--knn-sim-func`` recomputation) unless ``approximate`` asks for the index's own distances, summed per
  token id. Everything is done with logsumexp, so no probability underflows to 0 by accident.

No pickles: JSON and ``.npy`` only (the FAISS index is FAISS's own binary format). FAISS (the ``[knn]`` extra) is
imported only when an index is built or searched (``backend``).

Modules, bottom to top: ``records`` (JSON records, digests), ``keys`` (what is captured), ``rows`` (writing rows),
``backend`` (FAISS) <- ``store``, ``index``, ``search`` <- ``evaluate``. The names below are the public ones.
"""

from __future__ import annotations

from adaptive_lm.inference.knn.backend import import_faiss
from adaptive_lm.inference.knn.evaluate import (
    LAMBDA_GRID,
    LAMBDA_SHOWN,
    KNNResult,
    knn_evaluate,
    knn_score,
    knn_summary_lines,
    lambda_sweep,
)
from adaptive_lm.inference.knn.index import (
    AUTO_FLAT_BELOW,
    POINTS_PER_CENTROID,
    PQ_CENTROIDS,
    IndexConfig,
    build_index,
)
from adaptive_lm.inference.knn.keys import KEYTYPES, KeyCapture, key_dim
from adaptive_lm.inference.knn.records import (
    INDEX,
    INDEX_FORMAT,
    INDEX_META,
    KEYS,
    LM_LOGPROBS,
    MANIFEST,
    STORE_FORMAT,
    VALS,
    VERSION,
    file_digest,
    load_manifest,
    model_file_digest,
    weights_digest,
)
from adaptive_lm.inference.knn.rows import RowWriter
from adaptive_lm.inference.knn.search import GATHER_BYTES, KNN, interpolate
from adaptive_lm.inference.knn.store import StoreConfig, build_store, first_blocks

__all__ = [
    "AUTO_FLAT_BELOW",
    "GATHER_BYTES",
    "INDEX",
    "INDEX_FORMAT",
    "INDEX_META",
    "KEYS",
    "KEYTYPES",
    "KNN",
    "LAMBDA_GRID",
    "LAMBDA_SHOWN",
    "LM_LOGPROBS",
    "MANIFEST",
    "POINTS_PER_CENTROID",
    "PQ_CENTROIDS",
    "STORE_FORMAT",
    "VALS",
    "VERSION",
    "IndexConfig",
    "KNNResult",
    "KeyCapture",
    "RowWriter",
    "StoreConfig",
    "build_index",
    "build_store",
    "file_digest",
    "first_blocks",
    "import_faiss",
    "interpolate",
    "key_dim",
    "knn_evaluate",
    "knn_score",
    "knn_summary_lines",
    "lambda_sweep",
    "load_manifest",
    "model_file_digest",
    "weights_digest",
]
