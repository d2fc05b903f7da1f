"""Text generation with a key/value cache: greedy, beam, top-k / top-p sampling, temperature (fairseq's
``SequenceGenerator`` options and defaults: ``fairseq/sequence_generator.py``, ``fairseq/dataclass/configs.py``).

As in fairseq's language-model inference, generation starts from ``</s>``, the prompt is forced as a prefix,
and the length limit ``max_len_a * prompt_len + max_len_b`` counts the prompt. Temperature divides the decoder
features before the (linear, bias-free) adaptive softmax, which is what fairseq does. With the cache every new
token costs one position; ``use_cache=False`` recomputes the whole prefix each step (for comparison).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adaptive_lm.core.model import TransformerLM


@dataclass
class GenerationConfig:
    beam: int = 5
    sampling: bool = False
    sampling_topk: int = -1
    sampling_topp: float = -1.0
    temperature: float = 1.0
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    unkpen: float = 0.0
    lenpen: float = 1.0
    nbest: int = 1
    no_repeat_ngram_size: int = 0
    use_cache: bool = True
    seed: int | None = None


class _Stepper:
    """Feeds tokens to the model, with or without a cache, and returns next-token log-probs (rows, V)."""

    def __init__(self, model: TransformerLM, use_cache: bool, temperature: float) -> None:
        self.model, self.use_cache, self.temperature = model, use_cache, temperature
        self.cache = model.new_cache() if use_cache else None

    def __call__(self, tokens: Tensor, new: int) -> Tensor:
        """``tokens``: (rows, T) everything so far; ``new``: how many of the last positions are not cached yet."""
        if self.use_cache:
            T = tokens.shape[1]
            pos = torch.arange(T - new, T, device=tokens.device) + self.model.padding_idx + 1  # (new,)
            feats = self.model(tokens[:, -new:], cache=self.cache, positions=pos.expand(tokens.shape[0], -1))
        else:
            feats = self.model(tokens)
        x = feats[:, -1]  # (rows, d)
        if self.temperature != 1.0:
            x = x / self.temperature
        return self.model.log_probs_from_features(x).float()  # (rows, V)

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            for layer in self.cache:
                for k in layer:
                    layer[k] = layer[k].index_select(0, index)


def _block_ngrams(tokens: Tensor, lp: Tensor, n: int, start: int) -> None:
    """Forbid tokens that would repeat an n-gram already in the generated part (fairseq's no_repeat_ngram)."""
    if n <= 0 or tokens.shape[1] - start < n:
        return
    for r in range(tokens.shape[0]):
        seq = tokens[r, start:].tolist()
        prefix = tuple(seq[-(n - 1) :]) if n > 1 else ()
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
        if banned:
            lp[r, banned] = -math.inf


def _mask(lp: Tensor, step: int, max_len: int, cfg: GenerationConfig, eos: int, pad: int, unk: int) -> None:
    lp[:, pad] = -math.inf
    lp[:, unk] -= cfg.unkpen
    if step < cfg.min_len:
        lp[:, eos] = -math.inf
    if step >= max_len:  # force the end
        keep = lp[:, eos].clone()
        lp[:] = -math.inf
        lp[:, eos] = keep.clamp(min=-1e9)


def _sample(lp: Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> Tensor:
    """One token per row from fairseq's Sampling search: top-p, else top-k, else the whole distribution."""
    if cfg.sampling_topp > 0:
        probs, idx = lp.exp().sort(dim=-1, descending=True)  # (rows, V)
        keep = probs.cumsum(-1) - probs < cfg.sampling_topp  # smallest set reaching p, always >= 1 token
        probs = probs.masked_fill(~keep, 0.0)
        choice = torch.multinomial(probs, 1, generator=gen)
        return idx.gather(1, choice).squeeze(1)
    if cfg.sampling_topk > 0:
        top, idx = lp.topk(cfg.sampling_topk, dim=-1)
        choice = torch.multinomial(top.exp(), 1, generator=gen)
        return idx.gather(1, choice).squeeze(1)
    return torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompts: list[list[int]],
    eos: int = 2,
    pad: int = 1,
    unk: int = 3,
    cfg: GenerationConfig | None = None,
    start: int | None = None,
) -> list[list[dict]]:
    """For each prompt (word ids, no trailing ``</s>``): the ``nbest`` hypotheses, each a dict with ``tokens``
    (prompt + continuation + ``</s>``), ``score`` (mean ln p of the generated tokens) and ``positional_scores``."""
    cfg = cfg or GenerationConfig()
    model.eval()
    device = next(model.parameters()).device
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out: list[list[dict]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for L, ids in by_len.items():
        first = eos if start is None else start  # <s> for add_bos_token models
        batch = torch.tensor([[first] + list(prompts[i]) for i in ids], dtype=torch.long, device=device)  # (B, L+1)
        max_len = int(cfg.max_len_a * L + cfg.max_len_b)
        hyps = _search(model, batch, L, max_len, cfg, eos, pad, unk, gen)
        for i, h in zip(ids, hyps):
            out[i] = h
    return out


def _search(model, batch, L, max_len, cfg, eos, pad, unk, gen) -> list[list[dict]]:
    B = batch.shape[0]
    k = max(1, cfg.beam)
    step_fn = _Stepper(model, cfg.use_cache, cfg.temperature)
    lp = step_fn(batch, batch.shape[1])  # (B, V): distribution of the first new token
    tokens = batch.repeat_interleave(k, dim=0)  # (B*k, L+1)
    if k > 1:
        step_fn.reorder(torch.arange(B, device=batch.device).repeat_interleave(k))
        lp = lp.repeat_interleave(k, dim=0)
    scores = torch.zeros(B * k, device=batch.device)
    pos_scores: list[Tensor] = []
    finished: list[list[dict]] = [[] for _ in range(B)]
    alive = torch.ones(B * k, dtype=torch.bool, device=batch.device)
    first = True
    for step in range(L, max_len + 1):
        _mask(lp, step, max_len, cfg, eos, pad, unk)
        _block_ngrams(tokens, lp, cfg.no_repeat_ngram_size, L + 1)
        if cfg.sampling or k == 1:
            nxt = _sample(lp, cfg, gen) if cfg.sampling else lp.argmax(-1)  # (B*k,)
            tok_lp = lp.gather(1, nxt[:, None]).squeeze(1)
            order = torch.arange(B * k, device=lp.device)
        else:  # beam search over k rows per sentence
            cand = (scores[:, None] + lp).view(B, -1)  # (B, k*V)
            if first:  # all k rows are the same: take candidates from row 0 only
                cand = cand.view(B, k, -1)[:, 0]
            top, idx = cand.topk(k, dim=-1)  # (B, k)
            V = lp.shape[1]
            src_row = (idx // V if not first else torch.zeros_like(idx)) + torch.arange(B, device=lp.device)[
                :, None
            ] * k
            order = src_row.view(-1)
            nxt = (idx % V).view(-1)
            tok_lp = top.view(-1) - scores[order]
        first = False
        tokens = torch.cat([tokens[order], nxt[:, None]], dim=1)
        scores = scores[order] + tok_lp
        pos_scores = [p[order] for p in pos_scores] + [tok_lp]
        alive = alive[order]
        if not torch.equal(order, torch.arange(B * k, device=lp.device)):
            step_fn.reorder(order)
        ended = (nxt == eos) & alive
        for r in ended.nonzero().flatten().tolist():
            n_gen = tokens.shape[1] - (L + 1)
            ps = torch.stack([p[r] for p in pos_scores])[-n_gen:]
            finished[r // k].append(
                {
                    "tokens": tokens[r, 1:].clone(),
                    "score": float(scores[r]) / (n_gen**cfg.lenpen),
                    "positional_scores": ps.clone(),
                }
            )
        alive &= ~ended
        if k > 1 and not cfg.sampling:
            scores = scores.masked_fill(ended, -math.inf)  # finished rows cannot be extended
        done = all(len(f) >= (k if not cfg.sampling else k) for f in finished) or not alive.any()
        if done or step >= max_len:
            break
        lp = step_fn(tokens, 1)
    result = []
    for f in finished:
        f.sort(key=lambda h: -h["score"])
        result.append(f[: max(1, cfg.nbest)])
    return result
