"""FAISS, the optional ``[knn]`` extra: imported only when an index is built or searched, so that the rest of kNN-LM
(and ``import adaptive_lm.inference.knn``) works without it; and the few things the index and the search share."""

from __future__ import annotations

from typing import Any

from adaptive_lm.core.errors import UserError


def import_faiss(what: str) -> Any:
    """faiss, imported only when an index is built or searched (it is an optional extra)."""
    try:
        import faiss
    except ImportError:
        raise UserError(f"{what} needs faiss: pip install 'adaptive-lm[knn]'") from None
    return faiss


def to_gpu(faiss: Any, index: Any) -> Any:
    """The index on the GPU when faiss-gpu sees one (float16 lookup tables: 64-byte codes need them); else itself."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True
    g = faiss.index_cpu_to_gpu(res, 0, index, co)
    g.referenced_resources = res  # keep the resources alive as long as the index
    return g


def describe_index(meta: dict[str, Any]) -> str:
    """An index record (``index.json``) in a few words."""
    if meta["type"] == "flat":
        return f"flat ({meta['metric']}, exact)"
    opq = ", OPQ" if meta.get("opq") else ""
    return (
        f"ivfpq ({meta['metric']}, {meta['ncentroids']} lists, {meta['code_size']}-byte codes{opq}, "
        f"nprobe {meta['probe']})"
    )
