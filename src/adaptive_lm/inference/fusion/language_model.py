"""``FusionLanguageModel``: pyctcdecode's ``AbstractLanguageModel`` over a word-level ``LanguageModel``, with the
semantics of pyctcdecode's KenLM class so that tuned settings carry over:

* ``score(state, word)`` returns ``alpha * ln p(word | state) + beta`` -- natural log, as pyctcdecode's KenLM class
  returns after converting KenLM's log10 (``LOG_BASE_CHANGE_FACTOR``); ``alpha``/``beta`` mean the same there and
  here. A word outside the model's dictionary is scored as ``<unk>`` plus ``unk_score_offset``, which, as in that
  class, is in log10 units (added before the base change: ``alpha * (ln p + offset * ln 10)``).
* ``score_boundary=True``: the last word also gets ``alpha * ln p(</s> | text)``. The sentence starts as
  ``framing.frame`` and ``LanguageModel.score`` start it: from ``</s>``, or from ``<s>`` for ``add_bos_token``
  models (KenLM's null context has no counterpart here).
* ``score_partial_token(part)``: 0 if ``part`` begins some vocabulary word, else ``unk_score_offset`` (scaled by
  ``len / 6`` beyond 6 characters), exactly pyctcdecode's rule; the prefix test is a binary search over the
  sorted vocabulary (the same answers as its character trie, without building one for 267k words).

States carry the key/value cache. A state holds a tuple of per-position key/value tensors (one (L, 2, H, hd)
tensor per position) shared by reference with its ancestors; extending a prefix by a word feeds one token to
the model with the stacked cache and adds one tensor to the child's tuple, so beams branch freely and no state
is ever modified after it is computed. A child is computed lazily, when a word is first scored after it (most
scored words fall off the beam before that); ``score_many`` computes many at once (``decoder.FusionDecoderCTC``
hands it all the words of a decoding step).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adaptive_lm.inference.fusion.backend import (
    AVG_TOKEN_LEN,
    LOG_BASE_CHANGE_FACTOR,
    AbstractLanguageModel,
    require_pyctcdecode,
)


class LMState:
    """A decoding prefix: its token ids and, once computed, its key/value cache and last feature vector.

    ``prefix``: the parent's cache (a tuple of (L, 2, H, hd) tensors, one per position, shared by reference);
    ``kv``: ``prefix`` plus this state's own position, ``hidden``: the (d_out,) features that predict the next
    word. Both stay None until the state is first extended (lazy), and never change afterwards."""

    __slots__ = ("tokens", "prefix", "kv", "hidden")

    def __init__(self, tokens: tuple[int, ...], prefix: tuple[Tensor, ...] | None) -> None:
        self.tokens, self.prefix = tokens, prefix
        self.kv: tuple[Tensor, ...] | None = None
        self.hidden: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.hidden is not None

    def __repr__(self) -> str:
        return f"LMState({len(self.tokens)} tokens, {'computed' if self.ready else 'pending'})"


@dataclass
class FusionStats:
    """What the model computed: forward calls, positions fed (a cached extension feeds 1), states computed."""

    forwards: int = 0
    positions: int = 0
    states: int = 0
    words_scored: int = 0
    widths: Counter = field(default_factory=Counter)  # forward calls by the number of positions T they fed

    def reset(self) -> None:
        self.forwards = self.positions = self.states = self.words_scored = 0
        self.widths.clear()


class FusionLanguageModel(AbstractLanguageModel):  # type: ignore[misc,valid-type]
    """pyctcdecode language model over an adaptive-lm ``LanguageModel`` (see the module docstring).

    ``normalize`` maps a decoded word to the LM's spelling before lookup, e.g. ``str.lower`` for a wav2vec 2.0
    alphabet of capitals and a lower-cased LM; ``unigrams`` restricts the known words (default: the dictionary
    without its special symbols). ``use_cache=False`` recomputes the whole prefix for every extension (for
    comparison only)."""

    def __init__(
        self,
        lm: Any,
        alpha: float = 0.5,
        beta: float = 1.5,
        unk_score_offset: float = -10.0,
        score_boundary: bool = True,
        unigrams: Collection[str] | None = None,
        normalize: Callable[[str], str] | None = None,
        use_cache: bool = True,
    ) -> None:
        require_pyctcdecode()
        self.lm, self.model, self.dictionary = lm, lm.model, lm.dictionary
        self.alpha, self.beta = float(alpha), float(beta)
        self.unk_score_offset, self.score_boundary = float(unk_score_offset), bool(score_boundary)
        self.normalize, self.use_cache = normalize, use_cache
        self.model.eval()
        self.device = next(self.model.parameters()).device
        d = self.dictionary
        self.eos, self.unk = d.eos(), d.unk()
        words = [w for w in d.symbols[d.nspecial :] if not w.startswith("madeupword")]
        if unigrams is not None:
            words = sorted(set(unigrams) & set(words))
        self._known = set(words)  # KenLM's "unigrams": outside them a word also gets unk_score_offset
        self._sorted = sorted(self._known)  # for the prefix test
        self.window = int(lm.tokens_per_sample or self.model.cfg.max_target_positions)
        self.stats = FusionStats()
        self._prefetched: dict[tuple[int, str, bool], tuple[float, LMState, LMState]] = {}
        self._root: LMState | None = None

    # ---- pyctcdecode's interface ------------------------------------------------------------------------------
    @property
    def order(self) -> int:
        """The context the model sees, in tokens: pyctcdecode's ``prune_history`` then only merges beams whose
        whole visible history is the same."""
        return self.window

    def get_start_state(self) -> LMState:
        """A fresh start state per utterance (``</s>``, or ``<s>`` for ``add_bos_token`` models: ``framing.frame``
        starts a sentence the same way; its cache computed once and shared), so nothing of one utterance
        is kept alive by the next."""
        if self._root is None:
            root = LMState((self.lm.start_token,), ())
            self._materialize([root])
            self._root = root
        state = LMState(self._root.tokens, ())
        state.kv, state.hidden = self._root.kv, self._root.hidden
        return state

    def score_partial_token(self, partial_token: str) -> float:
        """pyctcdecode's rule: 0 while the partial word begins some known word, else ``unk_score_offset`` (times
        ``len / 6`` beyond 6 characters)."""
        is_oov = not self.is_prefix(partial_token)
        score = self.unk_score_offset * is_oov
        if len(partial_token) > AVG_TOKEN_LEN:
            score = score * len(partial_token) / AVG_TOKEN_LEN
        return score

    def score(self, prev_state: LMState, word: str, is_last_word: bool = False) -> tuple[float, LMState]:
        """``alpha * ln p(word | prev_state) + beta`` (+ ``alpha * ln p(</s>)`` for the last word when
        ``score_boundary``) and the state after the word. An empty ``word`` (pyctcdecode's final step for a beam
        ending in a space) adds only the end-of-sentence term."""
        hit = self._prefetched.get((id(prev_state), word, is_last_word))
        if hit is not None and hit[2] is prev_state:
            return hit[0], hit[1]
        return self.score_many([(prev_state, word, is_last_word)])[0]

    def reset_params(self, **params: Any) -> None:
        """alpha, beta, unk_score_offset, score_boundary: as pyctcdecode's KenLM class (``decoder.reset_params``)."""
        for name, kind in (("alpha", float), ("beta", float), ("unk_score_offset", float), ("score_boundary", bool)):
            v = params.get(name)
            if v is not None:
                if not isinstance(v, kind):
                    raise ValueError(f"{name} must be a {kind.__name__}. Got {type(v)}.")
                setattr(self, name, v)

    # ---- the work -----------------------------------------------------------------------------------------------
    def word_id(self, word: str) -> tuple[int, bool]:
        """(dictionary id of a decoded word after ``normalize`` (``<unk>``'s when absent), whether it is known)."""
        w = self.normalize(word) if self.normalize else word
        return self.dictionary.indices.get(w, self.unk), w in self._known

    def is_prefix(self, part: str) -> bool:
        """Whether some known word begins with ``part`` (binary search in the sorted vocabulary)."""
        p = self.normalize(part) if self.normalize else part
        i = bisect.bisect_left(self._sorted, p)
        return i < len(self._sorted) and self._sorted[i].startswith(p)

    @torch.inference_mode()
    def score_many(self, items: Sequence[tuple[LMState, str, bool]]) -> list[tuple[float, LMState]]:
        """``score`` for many (state, word, is_last_word) at once: one forward per distinct prefix length for the
        states that were still pending, one softmax call for all the words."""
        if not items:
            return []
        self._materialize([s for s, _, _ in items])
        looked = [self.word_id(w) if w else (self.unk, True) for _, w, _ in items]
        ids = [i for i, _ in looked]
        rows = [k for k, (_, w, _) in enumerate(items) if w]
        word_lp = [0.0] * len(items)
        if rows:
            lp = self._target_logprobs([items[k][0] for k in rows], [ids[k] for k in rows])
            for k, v in zip(rows, lp):
                word_lp[k] = v
            self.stats.words_scored += len(rows)
        children = [
            s if not w else LMState(s.tokens + (i,), s.kv if self.use_cache else None)
            for (s, w, _), i in zip(items, ids)
        ]
        eos_lp = [0.0] * len(items)
        last = [k for k, (_, _, is_last) in enumerate(items) if is_last and self.score_boundary]
        if last:
            self._materialize([children[k] for k in last])
            for k, v in zip(last, self._target_logprobs([children[k] for k in last], [self.eos] * len(last))):
                eos_lp[k] = v
        out = []
        for k, (_, w, _) in enumerate(items):
            raw = word_lp[k] + eos_lp[k]
            if w and not looked[k][1]:
                raw += self.unk_score_offset * LOG_BASE_CHANGE_FACTOR  # pyctcdecode adds it in log10 units
            out.append((self.alpha * raw + (self.beta if w else 0.0), children[k]))
        return out

    def prefetch(self, items: Sequence[tuple[LMState, str, bool]]) -> None:
        """Score a decoding step's words in one batch; the decoder's ``score`` calls that follow find them."""
        seen: dict[tuple[int, str, bool], tuple[LMState, str, bool]] = {}
        for it in items:
            seen.setdefault((id(it[0]), it[1], it[2]), it)
        todo = [it for key, it in seen.items() if key not in self._prefetched]
        for (s, w, last), (score, child) in zip(todo, self.score_many(todo)):
            self._prefetched[(id(s), w, last)] = (score, child, s)

    def clear_prefetched(self) -> None:
        self._prefetched.clear()

    @torch.inference_mode()
    def _target_logprobs(self, states: Sequence[LMState], targets: Sequence[int]) -> list[float]:
        x = torch.stack([s.hidden for s in states])  # (N, d_out)
        t = torch.tensor(targets, dtype=torch.long, device=self.device)  # (N,)
        return self.model.target_log_probs_from_features(x, t).float().tolist()

    @torch.inference_mode()
    def _materialize(self, states: Sequence[LMState]) -> None:
        """Compute the pending states among ``states``: one forward per prefix length (equal lengths need no
        attention mask), feeding one token per state on top of the stacked cache of its parent."""
        groups: dict[int, dict[int, LMState]] = {}
        for s in states:
            if not s.ready:
                n = len(s.prefix) if self.use_cache and s.prefix is not None else len(s.tokens) - 1
                groups.setdefault(n, {})[id(s)] = s
        for n, group in sorted(groups.items()):
            batch = list(group.values())
            if not self.use_cache:
                self._recompute(batch, len(batch[0].tokens))
            elif n + 1 > self.window:  # beyond the model's context: restart from the last half window
                for s in batch:
                    self._recompute([s], self.window // 2)
            else:
                self._extend(batch, n)
            self.stats.states += len(batch)

    def _forward(self, tokens: Tensor, cache: list[dict[str, Tensor]] | None, positions: Tensor | None) -> Tensor:
        self.stats.forwards += 1
        self.stats.positions += tokens.numel()
        self.stats.widths[tokens.shape[1]] += 1
        return self.model(tokens, cache=cache, positions=positions)  # (B, T, d_out)

    def _extend(self, batch: list[LMState], n: int) -> None:
        """``n`` cached positions per state: stack them into the model's cache layout, feed the new tokens."""
        B, L = len(batch), len(self.model.layers)
        cache: list[dict[str, Tensor]] = [{} for _ in range(L)]
        if n:
            shape = batch[0].prefix[0].shape  # type: ignore[index]  # (L, 2, H, hd)
            kv = torch.stack([t for s in batch for t in s.prefix]).view(B, n, *shape)  # type: ignore[union-attr]
            for layer in range(L):  # (B, n, H, hd) -> (B, H, n, hd)
                cache[layer]["k"] = kv[:, :, layer, 0].transpose(1, 2)
                cache[layer]["v"] = kv[:, :, layer, 1].transpose(1, 2)
        tokens = torch.tensor([[s.tokens[-1]] for s in batch], dtype=torch.long, device=self.device)  # (B, 1)
        pos = torch.full((B, 1), n + self.model.padding_idx + 1, dtype=torch.long, device=self.device)  # (B, 1)
        feats = self._forward(tokens, cache, pos)  # (B, 1, d_out)
        new = torch.stack(
            [torch.stack([c["k"][:, :, -1], c["v"][:, :, -1]], dim=1) for c in cache], dim=1
        )  # (B, L, 2, H, hd): this position's keys and values only
        for i, s in enumerate(batch):
            s.kv = s.prefix + (new[i],)  # type: ignore[operator]
            s.hidden = feats[i, -1]

    def _recompute(self, batch: list[LMState], keep: int) -> None:
        """No cache: feed the last ``keep`` tokens of every state (the comparison path, and the restart after the
        model's context is full)."""
        tokens = torch.tensor([list(s.tokens[-keep:]) for s in batch], dtype=torch.long, device=self.device)
        if not self.use_cache:
            feats = self._forward(tokens, None, None)  # (B, T, d_out)
            for i, s in enumerate(batch):
                s.hidden = feats[i, -1]
            return
        cache: list[dict[str, Tensor]] = [{} for _ in self.model.layers]
        feats = self._forward(tokens, cache, None)
        per_pos = torch.stack([torch.stack([c["k"], c["v"]], dim=1) for c in cache], dim=1)  # (B, L, 2, H, T, hd)
        per_pos = per_pos.permute(0, 4, 1, 2, 3, 5)  # (B, T, L, 2, H, hd)
        for i, s in enumerate(batch):
            s.kv = tuple(per_pos[i].unbind(0))
            s.hidden = feats[i, -1]
