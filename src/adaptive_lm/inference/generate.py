"""Generation exactly as fairseq 0.12's hub does it for a language model (``GeneratorHubInterface.generate`` ->
``LanguageModelingTask.inference_step`` -> ``SequenceGenerator._generate`` with ``search.BeamSearch`` or
``search.Sampling``), on our model with a key/value cache.

The rules, each as fairseq has it (``tests/generation/SPEC.md`` cites the lines):

* Prompts are batched in input order by the model's stored ``--max-tokens`` / ``--batch-size`` (the hub's
  ``_build_batches``); a batch's prompts are right-padded, start with ``</s>`` (``<s>`` for ``add_bos_token``) and are
  forced as a prefix, a row whose prompt is shorter generating freely once its prompt is done. The prompt's tokens
  count in the score.
* ``max_len = min(int(max_len_a * W + max_len_b), max_target_positions - 1)`` where W is the batch's padded width
  (longest prompt + 1); at step ``max_len`` only ``</s>`` is allowed. ``min_len`` forbids ``</s>`` before that step,
  except while a prompt is being forced.
* Every step: NaN -> -inf, ``<pad>`` -inf, ``<unk>`` minus ``unkpen``, n-gram blocking, then the search. Beam search
  takes the best ``2 x beam`` candidates (from the first beam only at step 0); a candidate ending in ``</s>`` is
  finished only when it ranks among the first ``beam``, with score = cumulative ln p / length ** ``lenpen`` (length =
  tokens including ``</s>``) and per-position scores; the other ``beam`` best continue. A sentence is done once it
  has ``beam`` finished hypotheses (or at ``max_len``), and leaves the batch. All finished hypotheses are returned,
  best first (``nbest`` keeps the first n; the hub itself returns them all).
* Temperature divides the decoder output (the features before an adaptive softmax, the logits of a plain one).
  Sampling draws from ``search.Sampling``'s filtered distribution (``sampling_filter``) with the same
  ``torch.multinomial`` calls on the same shapes, so a seed gives fairseq's draws (see ``docs``).
* ``no_repeat_ngram_size`` bans what the n-gram would repeat in the whole sequence so far (prompt included), as
  fairseq's CUDA kernel does. fairseq's CPU fallback looks at the end of the padded buffer instead and so blocks
  nothing (fairseq#4709, #5206); we do not reproduce that bug.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from adaptive_lm.core.data import batch_by_size
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.kernels import fast_linears, topk_rows
from adaptive_lm.core.model import TransformerLM
from adaptive_lm.core.options import opt


@dataclass
class GenerationConfig:
    """fairseq's generation options (``fairseq/dataclass/configs.py::GenerationConfig``) for language models."""

    beam: int = opt(5, "beam size (with --sampling: independent samples per prompt)", kind="positive")
    nbest: int | None = opt(None, "hypotheses per prompt (unset: all of the beam's, as fairseq's hub)", kind="positive")
    max_len_a: float = opt(0.0, "length limit a * W + b, W = the batch's longest prompt + 1 (fairseq's src_len)",
                           kind="nonneg")  # fmt: skip
    max_len_b: int = opt(200, "the b of the length limit, prompt included", kind="nonneg")
    min_len: int = opt(1, "no </s> before this many tokens (prompt tokens count)", kind="nonneg")
    lenpen: float = opt(1.0, "score = sum ln p / length ** lenpen (length includes </s>)", kind="finite")
    unkpen: float = opt(0.0, "subtracted from <unk>'s ln p at every step", kind="finite")
    unnormalized: bool = opt(False, "scores are sums of ln p, not divided by length ** lenpen")
    no_repeat_ngram_size: int = opt(0, "never repeat an n-gram of this size (prompt included)", kind="nonneg")
    sampling: bool = opt(False, "sample instead of beam search")
    sampling_topk: int = opt(-1, "sample from the k most likely words (-1: off)", kind="topk")
    sampling_topp: float = opt(-1.0, "sample from the smallest set with probability mass p (-1: off)", kind="topp")
    temperature: float = opt(1.0, "divides the decoder output before the softmax", kind="positive")
    use_cache: bool = True  # False: recompute the whole prefix every step (the same numbers; for comparison)
    # with the cache: the positions every prompt of a batch forces computed in one pass, once per prompt rather than
    # once per beam row (the same numbers up to summation order; False: one position per step, as fairseq)
    prefill: bool = True

    def check(self) -> None:
        """Every value as the command line checks it (the Python API passes them straight here), and fairseq's
        asserts, as one line each."""

        def integer(name: str, low: int, off: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < low and v != off):
                also = f" (or {off}: off)" if off is not None else ""
                raise UserError(f"{name} must be an integer of at least {low}{also}, not {v!r}")

        def number(name: str, low: float | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise UserError(f"{name} must be a finite number, not {v!r}")
            if low is not None and v < low:
                raise UserError(f"{name} must be at least {low}, not {v!r}")

        integer("beam", 1)
        if self.nbest is not None:
            integer("nbest", 1)
        for name in ("max_len_b", "min_len", "no_repeat_ngram_size"):
            integer(name, 0)
        integer("sampling_topk", 1, off=-1)
        number("max_len_a", 0.0)
        for name in ("lenpen", "unkpen", "temperature"):
            number(name)
        if not self.temperature > 0:
            raise UserError(f"temperature must be positive, not {self.temperature}")
        number("sampling_topp")
        if self.sampling_topp != -1 and not 0 < self.sampling_topp <= 1:
            raise UserError(f"sampling_topp must be in (0, 1] (or -1: off), not {self.sampling_topp!r}")
        if self.sampling_topk > 0 and self.sampling_topp > 0:
            pass  # fairseq accepts both; top-p wins (search.Sampling)
        if (self.sampling_topk > 0 or self.sampling_topp > 0) and not self.sampling:
            raise UserError("--sampling-topk / --sampling-topp need --sampling (fairseq asserts the same)")


# ---- the searches (fairseq/search.py) ----------------------------------------------------------------------
def beam_step(step: int, lprobs: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``BeamSearch.step``: the best ``2 x beam`` (score, token, beam) candidates of each sentence.

    ``lprobs``: (bsz, beam, V) this step's ln p; ``scores``: (bsz, beam, step) cumulative scores so far. fairseq adds
    each beam's score to its whole row and takes the top of ``beam x V`` sums; adding a row's constant keeps the
    row's order, so the best ``2 x beam`` sums are among each row's best ``2 x beam`` ln p: those are found first
    (one pass over the rows, no ``beam x V`` sum), then the same float32 sums are ranked."""
    bsz, beam, V = lprobs.shape
    k = min(2 * beam, beam * V - 1 if step > 0 else V - 1)  # fairseq: -1, never pad
    if step == 0:  # all beams are the same prefix: only the first
        top_scores, top = topk_rows(lprobs[:, 0, :], k)  # (bsz, k)
        return top_scores, top, torch.zeros_like(top)
    per_row = min(k, V)
    row_lp, row_tok = topk_rows(lprobs, per_row)  # (bsz, beam, per_row)
    sums = (row_lp + scores[:, :, step - 1].unsqueeze(-1)).view(bsz, -1)  # (bsz, beam * per_row)
    top_scores, flat = torch.topk(sums, k=k)  # (bsz, k)
    return top_scores, row_tok.view(bsz, -1).gather(1, flat), torch.div(flat, per_row, rounding_mode="trunc")


def sampling_filter(lprobs: Tensor, topk: int = -1, topp: float = -1.0) -> tuple[Tensor, Tensor | None]:
    """fairseq's ``Sampling`` filter of (bsz, beam, V) log-probs: the probabilities ``torch.multinomial`` draws
    from, and the vocabulary ids of their columns (None: all of them, in order).

    top-p keeps the smallest prefix of the sorted distribution whose mass reaches p (the words before the
    cumulative sum reaches p, plus one), truncated to the widest row's set, the rest zeroed; top-k keeps the k
    most likely; otherwise the whole distribution."""
    if topp > 0:
        probs = lprobs.exp()
        sorted_probs, sorted_idx = probs.sort(descending=True)  # (bsz, beam, V)
        mask = sorted_probs.cumsum(dim=2).lt(topp)
        last = mask.cumsum(dim=2)[:, :, -1:].clamp_(0, mask.size(2) - 1)  # (bsz, beam, 1) the word that reaches p
        mask = mask.scatter_(2, last, 1)
        width = int(last.max()) + 1
        kept = sorted_probs[:, :, :width].masked_fill(~mask[:, :, :width], 0)  # (bsz, beam, width)
        return kept, sorted_idx[:, :, :width]
    if topk > 0:
        top, idx = lprobs.topk(topk)  # (bsz, beam, k)
        return top.exp(), idx
    return lprobs.exp(), None


def sampling_step(step: int, lprobs: Tensor, scores: Tensor, topk: int, topp: float) -> tuple[Tensor, Tensor, Tensor]:
    """``Sampling.step``: one draw per beam row (``beam`` draws from the first row at step 0), with the same
    ``torch.multinomial`` calls as fairseq, so that the same seed draws the same tokens."""
    bsz, beam, _ = lprobs.shape
    if step == 0:
        lprobs = lprobs[:, ::beam, :].contiguous()
    probs, columns = sampling_filter(lprobs, topk, topp)
    if step == 0:
        picked = _draw(probs.view(bsz, -1), beam).view(bsz, beam)
        probs = probs.expand(bsz, beam, -1)
    else:
        picked = _draw(probs.view(bsz * beam, -1), 1).view(bsz, beam)
    cand_scores = torch.gather(probs, dim=2, index=picked.unsqueeze(-1)).log_().view(bsz, -1)  # (bsz, beam)
    if columns is not None:
        picked = torch.gather(columns.expand(bsz, beam, -1), dim=2, index=picked.unsqueeze(-1)).squeeze(2)
    if step == 0:
        beams = picked.new_zeros(bsz, beam)
    else:
        beams = torch.arange(0, beam).to(picked).repeat(bsz, 1)
        cand_scores.add_(torch.gather(scores[:, :, step - 1], dim=1, index=beams))
    return cand_scores, picked, beams


def _draw(probs: Tensor, n: int) -> Tensor:
    """``torch.multinomial(probs, n, replacement=True)`` (fairseq's call); a row without any allowed word fails
    there, said as one line."""
    try:
        return torch.multinomial(probs, n, replacement=True)  # (rows, n)
    except RuntimeError as e:
        raise UserError(
            "sampling: a hypothesis has no allowed word left (n-gram blocking, min_len or the length limit forbid "
            f"them all; torch: {str(e).splitlines()[0]}); relax those options"
        ) from e


def block_repeated_ngrams(tokens: Tensor, lprobs: Tensor, step: int, n: int) -> None:
    """Forbid (in place) every token that would complete an n-gram already in ``tokens[:, : step + 1]``.

    fairseq's CUDA kernel: the last n-1 tokens are compared with every earlier window of n-1 tokens, and the token
    that followed a match is banned."""
    start = step + 2 - n
    if n <= 0 or start <= 0:
        return
    rows = tokens[:, : step + 1].tolist()
    for r, seq in enumerate(rows):
        tail = seq[start:]
        banned = [seq[i + n - 1] for i in range(start) if seq[i : i + n - 1] == tail]
        if banned:
            lprobs[r, banned] = -math.inf


# ---- one batch -----------------------------------------------------------------------------------------------
@dataclass
class Special:
    bos: int  # what every sequence starts with: </s>, or <s> for add_bos_token models
    eos: int
    pad: int
    unk: int


class _Stepper:
    """Next-token log-probs of every row, fp32 (rows, V): with the cache one new position per call."""

    def __init__(self, model: TransformerLM, cfg: GenerationConfig, capacity: int) -> None:
        self.model, self.cfg = model, cfg
        self.cache = model.new_cache(capacity) if cfg.use_cache else None
        self.prefilled: Tensor | None = None  # (bsz, S, d): the features of the prompts' first S positions
        self.k = 1

    def prefill(self, starts: Tensor, k: int) -> None:
        """Run the first S positions of every prompt at once: ``starts`` (bsz, S) = the start symbol and the first
        S - 1 prompt tokens, which every prompt of the batch forces. The cache of each of a prompt's ``k`` beam rows
        gets those S positions' keys and values; steps 0 .. S - 1 then read their distributions from the kept
        features instead of running the model.

        Why it gives fairseq's hypotheses: while a prompt is forced, the rows of a sentence other than its first
        hold -inf hypotheses (at step 0 only the first beam is searched), and a -inf score stays -inf whatever the
        row's tokens, cache or distribution; so only the first row's computation counts, and that is the prompt's.
        Sampling draws the prompt's token on every row (the only word of non-zero probability): every row is the
        prompt. The work of those positions drops from one step per position on bsz * k rows to one pass on bsz."""
        B, S = starts.shape
        pos = (torch.arange(S, device=starts.device) + self.model.padding_idx + 1).expand(B, S)  # (B, S)
        plain = self.model.new_cache()  # dicts: whole (B, H, S, hd) keys and values
        self.prefilled = self.model(starts, cache=plain, positions=pos)  # (B, S, d)
        assert self.cache is not None
        for layer, kv in zip(self.cache, plain):
            layer.append(kv["k"].repeat_interleave(k, 0), kv["v"].repeat_interleave(k, 0))  # (B * k, H, S, hd)
        self.k = k

    def __call__(self, tokens: Tensor, step: int) -> Tensor:
        """``tokens``: (rows, >= step + 1); the distribution of the token at ``step + 1``."""
        if self.prefilled is not None and step < self.prefilled.shape[1]:
            lp = self.model.log_probs_from_features(self.prefilled[:, step], self.cfg.temperature).float()  # (B, V)
            return lp.repeat_interleave(self.k, 0)  # (B * k, V)
        if self.cache is not None:
            pos = torch.full((tokens.shape[0], 1), step + self.model.padding_idx + 1, device=tokens.device)  # (rows, 1)
            feats = self.model(tokens[:, step : step + 1], cache=self.cache, positions=pos)  # (rows, 1, d)
        else:
            feats = self.model(tokens[:, : step + 1])  # (rows, step + 1, d)
        return self.model.log_probs_from_features(feats[:, -1], self.cfg.temperature).float()  # (rows, V)

    def reorder(self, rows: Tensor) -> None:
        if self.cache is not None:
            for layer in self.cache:
                layer.reorder(rows)


class _Batch:
    """``SequenceGenerator._generate`` for one batch of prompts: the buffers and the loop, step by step."""

    def __init__(self, model: TransformerLM, cfg: GenerationConfig, sp: Special, prefix: Tensor, max_len: int):
        self.cfg, self.sp, self.max_len = cfg, sp, max_len
        self.k = cfg.beam
        self.bsz = prefix.shape[0]
        rows = self.bsz * self.k
        device = prefix.device
        self.prefix = prefix  # (bsz, P) right-padded with <pad>
        self.tokens = torch.full((rows, max_len + 2), sp.pad, dtype=torch.long, device=device)
        self.tokens[:, 0] = sp.bos
        self.scores = torch.zeros(rows, max_len + 1, device=device)  # cumulative ln p, float32
        self.ignore = torch.zeros(self.bsz, self.k, dtype=torch.bool, device=device)  # finished candidates
        self.finalized: list[list[dict[str, Tensor]]] = [[] for _ in range(self.bsz)]
        self.finished = [False] * self.bsz
        self.remaining = self.bsz
        self.step_fn = _Stepper(model, cfg, max_len + 2)

    def forced_steps(self) -> int:
        """S: steps 0 .. S - 1 force a prompt token other than ``</s>`` in every sentence (so none can finish and
        the batch keeps its rows), below ``max_len``."""
        stop = self.prefix.eq(self.sp.pad) | self.prefix.eq(self.sp.eos)  # (bsz, P)
        cols = stop.any(0).nonzero()
        S = int(cols[0]) if cols.numel() else self.prefix.shape[1]
        return min(S, self.max_len)

    def run(self) -> list[list[dict[str, Tensor]]]:
        reorder: Tensor | None = None
        kept: Tensor | None = None  # the sentences still in the batch after the last step (None: all)
        S = self.forced_steps() if self.cfg.use_cache and self.cfg.prefill else 0
        S = S if S > 1 else 0  # positions computed at once (0: none)
        if S:
            starts = self.tokens[:: self.k, :S].clone()  # (bsz, S): start symbol, then the prompts' first S - 1
            starts[:, 1:] = self.prefix[:, : S - 1]
            self.step_fn.prefill(starts, self.k)
        for step in range(self.max_len + 1):  # the last step only ends hypotheses
            if reorder is not None and step <= S:  # the rows of a sentence hold the same prefilled cache
                reorder = None
            if reorder is not None:
                if kept is not None:  # rows of removed sentences are gone: shift the beam indices
                    shift = kept - torch.arange(kept.numel(), device=kept.device)
                    reorder.view(-1, self.k).add_(shift.unsqueeze(-1) * self.k)
                self.step_fn.reorder(reorder)
            lprobs = self._constrained(self.step_fn(self.tokens, step), step)  # (bsz * k, V)
            cand_scores, cand_tokens, cand_beams = self._search(step, lprobs)  # (bsz, 2k) each
            offsets = (torch.arange(self.bsz, device=lprobs.device) * self.k).unsqueeze(1)
            cand_rows = cand_beams + offsets  # (bsz, 2k) row of the beam each candidate extends
            eos_mask = cand_tokens.eq(self.sp.eos) & cand_scores.ne(-math.inf)
            eos_mask[:, : self.k][self.ignore] = False
            done = self._finish(step, cand_rows, cand_scores, eos_mask)
            if self.remaining == 0:
                break
            kept = self._drop(done) if done else None
            if kept is not None:
                eos_mask, cand_beams = eos_mask[kept], cand_beams[kept]
                cand_scores, cand_tokens = cand_scores[kept], cand_tokens[kept]
                offsets = (torch.arange(self.bsz, device=lprobs.device) * self.k).unsqueeze(1)
                cand_rows = cand_beams + offsets
            reorder = self._advance(step, eos_mask, cand_rows, cand_scores, cand_tokens)
        return self._sorted()

    def _constrained(self, lprobs: Tensor, step: int) -> Tensor:
        """This step's ln p after fairseq's rules: NaN, pad, unk penalty, max length, the prompt, min length,
        n-gram blocking."""
        sp = self.sp
        # fairseq's lprobs[lprobs != lprobs] = -inf. ln p is never +inf, so the sum is NaN exactly when an entry is
        # (a -inf with a +inf would be a harmless false alarm): one read of (rows, V) instead of a mask and its test
        if torch.isnan(lprobs.sum()):
            lprobs.masked_fill_(lprobs.isnan(), -math.inf)
        lprobs[:, sp.pad] = -math.inf
        lprobs[:, sp.unk] -= self.cfg.unkpen
        if step >= self.max_len:
            lprobs[:, : sp.eos] = -math.inf
            lprobs[:, sp.eos + 1 :] = -math.inf
        if step < self.prefix.shape[1] and step < self.max_len:
            lprobs = self._force_prefix(lprobs, step)
        elif step < self.cfg.min_len:
            lprobs[:, sp.eos] = -math.inf
        self.scores = self.scores.type_as(lprobs)
        if self.cfg.no_repeat_ngram_size > 0:
            block_repeated_ngrams(self.tokens, lprobs, step, self.cfg.no_repeat_ngram_size)
        return lprobs

    def _force_prefix(self, lprobs: Tensor, step: int) -> Tensor:
        """``_prefix_tokens``: where the prompt has a token at this step, only it is allowed, with its own ln p."""
        toks = self.prefix[:, step].unsqueeze(-1).repeat(1, self.k).view(-1)  # (bsz * k,)
        own = lprobs.gather(-1, toks.unsqueeze(-1)).squeeze(-1)  # (bsz * k,)
        rows = toks.ne(self.sp.pad).nonzero().squeeze(-1)  # the rows whose prompt has a token here
        lprobs.index_fill_(0, rows, -math.inf)  # in place: fairseq's masked copies of the rows, one pass
        lprobs.index_put_((rows, toks[rows]), own[rows])
        eos = toks.eq(self.sp.eos)
        if eos.any():  # a prompt holding </s>: every beam of that sentence copies the first
            first = eos.view(-1, self.k)[:, 0]
            self.tokens = _replicate_first_beam(self.tokens, first, self.k)
            self.scores = _replicate_first_beam(self.scores, first, self.k)
            lprobs = _replicate_first_beam(lprobs, first, self.k)
        return lprobs

    def _search(self, step: int, lprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lp = lprobs.view(self.bsz, -1, lprobs.shape[-1])  # (bsz, k, V)
        sc = self.scores.view(self.bsz, self.k, -1)[:, :, :step]  # (bsz, k, step)
        if self.cfg.sampling:
            return sampling_step(step, lp, sc, self.cfg.sampling_topk, self.cfg.sampling_topp)
        return beam_step(step, lp, sc)

    def _finish(self, step: int, cand_rows: Tensor, cand_scores: Tensor, eos_mask: Tensor) -> list[int]:
        """Finalize the candidates ending in ``</s>`` among the first ``beam``; the sentences now complete."""
        k = self.k
        rows = torch.masked_select(cand_rows[:, :k], mask=eos_mask[:, :k])
        if rows.numel() == 0:
            return []
        eos_scores = torch.masked_select(cand_scores[:, :k], mask=eos_mask[:, :k])
        done = self._finalize(step, rows, eos_scores)
        self.remaining -= len(done)
        return done

    def _finalize(self, step: int, rows: Tensor, eos_scores: Tensor) -> list[int]:
        """``finalize_hypos``: store the hypotheses (tokens without the start symbol, ``</s>`` last; per-position
        scores; the normalised score), and return the batch positions of the sentences that are now done."""
        tokens = self.tokens.index_select(0, rows)[:, 1 : step + 2]
        tokens[:, step] = self.sp.eos
        pos = self.scores.index_select(0, rows)[:, : step + 1]
        pos[:, step] = eos_scores
        pos[:, 1:] = pos[:, 1:] - pos[:, :-1]  # cumulative -> per position
        if not self.cfg.unnormalized:
            eos_scores = eos_scores / (step + 1) ** self.cfg.lenpen
        cum_fin, prev = [], 0  # original sentence of each position of the (shrunk) batch
        for f in self.finished:
            if f:
                prev += 1
            else:
                cum_fin.append(prev)
        unfin = torch.div(rows, self.k, rounding_mode="trunc")
        sent = unfin + torch.tensor(cum_fin, dtype=torch.long, device=rows.device).index_select(0, unfin)
        for i, s in enumerate(sent.tolist()):
            if len(self.finalized[s]) < self.k:
                self.finalized[s].append({"tokens": tokens[i], "score": eos_scores[i], "attention": torch.empty(0),
                                          "alignment": torch.empty(0), "positional_scores": pos[i]})  # fmt: skip
        done = []
        for seen in torch.unique((sent << 32) + unfin).tolist():
            s, u = seen >> 32, seen - ((seen >> 32) << 32)
            if not self.finished[s] and (len(self.finalized[s]) == self.k or step == self.max_len):
                self.finished[s] = True
                done.append(u)
        return done

    def _drop(self, done: list[int]) -> Tensor:
        """Remove the sentences that are done from every buffer; returns the kept batch positions."""
        keep = torch.ones(self.bsz, dtype=torch.bool, device=self.tokens.device)
        keep[done] = False
        kept = torch.arange(self.bsz, device=keep.device).masked_select(keep)
        new = self.bsz - len(done)
        self.prefix = self.prefix[kept]
        self.ignore = self.ignore[kept]
        self.scores = self.scores.view(self.bsz, -1)[kept].view(new * self.k, -1)
        self.tokens = self.tokens.view(self.bsz, -1)[kept].view(new * self.k, -1)
        self.bsz = new
        return kept

    def _advance(
        self, step: int, eos_mask: Tensor, cand_rows: Tensor, cand_scores: Tensor, cand_tokens: Tensor
    ) -> Tensor:
        """Keep the best ``beam`` candidates that did not end (or were not finished before); returns the row each
        new hypothesis continues (the cache's reorder)."""
        k, width = self.k, eos_mask.size(1)
        eos_mask[:, :k] = ~((~self.ignore) & (~eos_mask[:, :k]))
        active = eos_mask.long() * width + torch.arange(width, device=eos_mask.device)  # ended ones sort last
        new_ignore, picked = torch.topk(active, k=k, dim=1, largest=False)  # (bsz, k)
        self.ignore = new_ignore.ge(width)[:, :k]
        rows = torch.gather(cand_rows, dim=1, index=picked).view(-1)  # (bsz * k,)
        self.tokens[:, : step + 1] = torch.index_select(self.tokens[:, : step + 1], dim=0, index=rows)
        self.tokens.view(self.bsz, k, -1)[:, :, step + 1] = torch.gather(cand_tokens, dim=1, index=picked)
        if step > 0:
            self.scores[:, :step] = torch.index_select(self.scores[:, :step], dim=0, index=rows)
        self.scores.view(self.bsz, k, -1)[:, :, step] = torch.gather(cand_scores, dim=1, index=picked)
        return rows

    def _sorted(self) -> list[list[dict[str, Tensor]]]:
        out = []
        for hyps in self.finalized:
            order = torch.sort(torch.tensor([float(h["score"].item()) for h in hyps]), descending=True)[1]
            out.append([hyps[i] for i in order.tolist()])
        return out


def _replicate_first_beam(t: Tensor, mask: Tensor, k: int) -> Tensor:
    t = t.view(-1, k, t.size(-1))
    t[mask] = t[mask][:, :1, :]
    return t.view(-1, t.size(-1))


def _forced(prompt: list[int], max_len: int, sp: Special) -> list[int]:
    """What a prompt forces: the start symbol and its words up to ``max_len``, and only up to its first ``</s>``
    (a forced ``</s>`` ends every hypothesis there: fairseq finalizes it)."""
    forced = prompt[:max_len]
    return [sp.bos, *(forced[: forced.index(sp.eos) + 1] if sp.eos in forced else forced)]


def _check_ngrams(i: int, seq: list[int], n: int) -> None:
    """Refuse prompt ``i`` (forced as ``seq``, start symbol first) if it repeats an n-gram: the blocker (fairseq's
    CUDA rule) would ban its own forced word, leaving only -inf hypotheses."""
    seen: set[tuple[int, ...]] = set()
    for j in range(len(seq) - n + 1):
        gram = tuple(seq[j : j + n])
        if gram in seen:
            raise UserError(
                f"prompt {i + 1} repeats a {n}-gram (ids {list(gram)}): no_repeat_ngram_size {n} forbids its own "
                "forced words; use a larger size or another prompt"
            )
        seen.add(gram)


def _check_lenpen(cfg: GenerationConfig, limit: int) -> None:
    """Scores are divided by length ** lenpen: a lenpen that overflows (or underflows to 0) within the model's
    positions is refused (it failed with Python's OverflowError at the first finished hypothesis)."""
    if cfg.unnormalized:
        return
    try:
        ok = (limit + 1.0) ** -abs(cfg.lenpen) > 0 and math.isfinite((limit + 1.0) ** abs(cfg.lenpen))
    except OverflowError:
        ok = False
    if not ok:
        raise UserError(
            f"lenpen {cfg.lenpen:g} (--lenpen): length ** lenpen overflows for lengths up to the model's {limit} "
            "positions; use a value of a few units (fairseq's default 1; 0: no length normalisation)"
        )


# ---- the hub's entry point -----------------------------------------------------------------------------------
def prompt_batches(lengths: list[int], max_tokens: int | None, batch_size: int | None) -> list[list[int]]:
    """The hub's ``_build_batches``: prompts in input order (lengths with their ``</s>``), packed by the model's
    stored ``--max-tokens`` / ``--batch-size`` (fairseq's ``batch_by_size``, no multiple)."""
    sizes = np.asarray(lengths, dtype=np.int64)
    return [b.tolist() for b in batch_by_size(np.arange(len(sizes)), sizes, max_tokens, batch_size, bsz_mult=1)]


def _plan(
    ids: list[int], prompts: list[list[int]], cfg: GenerationConfig, special: Special, limit: int
) -> tuple[list[int], int, int]:
    """A batch's (prompt indices, W, max_len), its length limit and n-gram rules checked."""
    width = max(len(prompts[i]) for i in ids) + 1  # fairseq's src_len: the padded source with its start symbol
    max_len = min(int(cfg.max_len_a * width + cfg.max_len_b), limit - 1)
    if cfg.min_len > max_len:
        raise UserError(
            f"min_len {cfg.min_len} (--min-len) exceeds the length limit {max_len} = min(int(max_len_a * W + "
            f"max_len_b), the model's {limit} positions - 1) with W = {width} (the longest prompt + 1), "
            f"max_len_a {cfg.max_len_a:g}, max_len_b {cfg.max_len_b} (--max-len-a, --max-len-b): raise those "
            "or lower min_len"
        )
    n = cfg.no_repeat_ngram_size
    for i in ids if n > 0 else []:
        _check_ngrams(i, _forced(prompts[i], max_len, special), n)
    return ids, width, max_len


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompts: list[list[int]],
    special: Special,
    cfg: GenerationConfig | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    on_batch: Callable[[int], Any] | None = None,
    lengths: list[int] | None = None,
) -> list[list[dict[str, Tensor]]]:
    """For each prompt (word ids without ``</s>``): its finished hypotheses, best first, each a dict with ``tokens``
    (prompt + continuation + ``</s>``), ``score`` and ``positional_scores`` (one per token), as fairseq's hub.
    ``max_tokens`` / ``batch_size``: how the hub batches prompts (the model's training values; None: one batch).
    ``lengths``: each prompt's length as the caller gave it (fairseq's hub batches and checks the tensors' own
    lengths, ``</s>`` markers included); default: the prompt plus its ``</s>``."""
    cfg = cfg or GenerationConfig()
    cfg.check()
    model.eval()
    # fairseq's hub batches the prompts through a torch DataLoader, whose iterator draws its base seed from the
    # global generator: one int64 draw before any sampling. Drawn here too, so that a seed samples fairseq's tokens.
    torch.empty((), dtype=torch.int64).random_()
    device = next(model.parameters()).device
    limit = model.cfg.max_target_positions
    if cfg.sampling and cfg.sampling_topk > model.cfg.vocab_size:  # fairseq fails inside torch.topk
        raise UserError(f"--sampling-topk {cfg.sampling_topk} exceeds the model's {model.cfg.vocab_size} words")
    beam = min(cfg.beam, model.cfg.vocab_size - 1)
    run_cfg = cfg if beam == cfg.beam else GenerationConfig(**{**cfg.__dict__, "beam": beam})
    out: list[list[dict[str, Tensor]]] = [[] for _ in prompts]
    n = cfg.no_repeat_ngram_size
    if n == 1 and special.bos == special.eos:  # fairseq's CUDA rule bans </s> itself: nothing could ever finish
        raise UserError(
            "no_repeat_ngram_size 1 forbids </s> (every sequence starts with it), so no hypothesis could finish; "
            "use 2 or more"
        )
    _check_lenpen(cfg, limit)
    sizes = lengths if lengths is not None else [len(p) + 1 for p in prompts]
    longest = max(sizes, default=0)
    if longest > limit:  # the hub's max_positions check, before batching (whose limit is the stored --max-tokens)
        raise UserError(f"a prompt of {longest} tokens (its </s> included) does not fit the model's {limit} positions")
    if max_tokens is not None and longest > max_tokens:
        raise UserError(
            f"a prompt of {longest} tokens exceeds the {max_tokens} tokens of the hub's batches (the model's stored "
            "--max-tokens; fairseq's hub refuses it too): shorten it, or load with from_pretrained(..., "
            "max_tokens=...)"
        )
    plan = [_plan(ids, prompts, cfg, special, limit) for ids in prompt_batches(sizes, max_tokens, batch_size)]
    for ids, width, max_len in plan:  # every batch checked before any runs
        prefix = torch.full((len(ids), width - 1), special.pad, dtype=torch.long)  # (B, W - 1)
        for r, i in enumerate(ids):
            prefix[r, : len(prompts[i])] = torch.tensor(prompts[i], dtype=torch.long)
        with fast_linears(device, packed=True):
            hyps = _Batch(model, run_cfg, special, prefix.to(device), max_len).run()
        for i, h in zip(ids, hyps):
            out[i] = h[: cfg.nbest] if cfg.nbest else h
        if on_batch is not None:
            on_batch(len(ids))
    return out
