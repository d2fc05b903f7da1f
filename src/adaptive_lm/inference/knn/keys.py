"""The keys of a kNN-LM datastore: which features of the model are stored and searched, and how they are taken.

Why hooks: the keys are by-products of the forward pass that scores the tokens (``evaluate.scored_batches``), so
taking them must cost no second forward, and the store and the search must take them in exactly the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptive_lm.core.errors import UserError

KEYTYPES = ("last_ffn_input", "final")


def key_dim(model: torch.nn.Module, keytype: str) -> int:
    """Width of the keys of ``keytype`` for this model."""
    if keytype == "last_ffn_input":
        return int(model.layers[-1].fc1.in_features)  # type: ignore[index,union-attr]
    if keytype == "final":
        out = model.project_out_dim  # type: ignore[union-attr]
        return int(out.out_features) if out is not None else int(model.cfg.decoder_embed_dim)  # type: ignore[union-attr]
    raise UserError(f"unknown key type {keytype!r}: use one of {', '.join(KEYTYPES)}")


class KeyCapture:
    """Holds the keys of the last forward pass, captured by hooks, so that taking them costs no second forward.

    ``last_ffn_input``: a forward pre-hook on the last layer's ``fc1`` sees exactly its input (after the layer's
    LayerNorm in pre-LN models): knnlm's default key. ``final``: a forward hook on the model sees its output, the
    features before the softmax. Called as ``feature_fn(src) -> (B, W, k)`` by ``evaluate.scored_batches`` (with
    the positions its last layer computed: both kinds of key come from the last layer or after it).
    """

    def __init__(self, model: torch.nn.Module, keytype: str) -> None:
        key_dim(model, keytype)  # validates the name
        self.value: torch.Tensor | None = None
        if keytype == "last_ffn_input":
            self.handle = model.layers[-1].fc1.register_forward_pre_hook(self._pre)  # type: ignore[index,union-attr]
        else:
            self.handle = model.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]  # (B, W, d)

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.value = output if torch.is_tensor(output) else output[0]  # (B, W, d_out)

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None or tuple(v.shape[:2]) != tuple(src.shape):
            raise RuntimeError("KeyCapture: no keys from the last forward pass of this batch")
        return v

    def close(self) -> None:
        self.handle.remove()

    def __enter__(self) -> KeyCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
