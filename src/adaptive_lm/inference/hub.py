"""``LanguageModel``: a model with its dictionary and text pipeline, as fairseq's hub interface offers it
(``encode``, ``decode``, ``score``, ``generate``, ``sample``), plus ``features`` for research on hidden states.

``from_pretrained`` (``loading.py``) returns one. Sentences are framed by ``framing.frame`` (``</s>`` first, or
``<s>`` for ``add_bos_token`` models) and scored through the target-only softmax: no (tokens x V) tensor.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaptive_lm.core.config import ModelConfig
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.kernels import fast_linears
from adaptive_lm.core.model import TransformerLM
from adaptive_lm.core.precision import HALF, autocast
from adaptive_lm.inference.framing import frame
from adaptive_lm.inference.scoring import check_inputs, position_scores

log = logging.getLogger("adaptive_lm.generate")


def _scored(ids: list[int], row: dict[str, Any]) -> dict[str, Any]:
    """``LanguageModel.score``'s record of one sentence: its tokens, ``row`` (the positional scores, and kNN-LM's
    parts), and the mean score."""
    ps = row["positional_scores"]  # an empty sentence's mean is nan, as fairseq's hub gives
    return {"tokens": torch.tensor(ids, dtype=torch.long), **row, "score": float(ps.mean()) if len(ps) else math.nan}


SCORE_CHUNK_LINES = 4096  # ``score_rows``: lines scored at a time (records come out as each chunk finishes)


@dataclass
class LanguageModel:
    """A model with its dictionary: what ``from_pretrained`` returns (scoring and generation build on it).

    ``tokenizer``: raw text <-> the model's words (``tokenizer.make_pipeline``: Moses, GPT-2 BPE or SentencePiece,
    as fairseq's hub applies them); None when the text is already tokenised."""

    model: TransformerLM
    dictionary: Dictionary
    source: str = ""
    tokens_per_sample: int | None = None
    tokenizer: Any = None
    batching: tuple[int | None, int | None] = (None, None)  # the hub's prompt batches: training max_tokens, batch size

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def start_token(self) -> int:
        """What every sentence is conditioned on: ``</s>``, or ``<s>`` for ``add_bos_token`` models (fairseq's
        ``build_dataset_for_inference`` and ``inference_step``)."""
        return self.dictionary.bos() if self.cfg.add_bos_token else self.dictionary.eos()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> LanguageModel:
        self.model.to(*args, **kwargs)
        return self

    def eval(self) -> LanguageModel:
        self.model.eval()
        return self

    # ---- text <-> ids -----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> str:
        """Raw text -> the space-separated symbols the dictionary holds (tokenizer, then BPE)."""
        return text if self.tokenizer is None else self.tokenizer.encode(text)

    def detokenize(self, text: str) -> str:
        return text if self.tokenizer is None else self.tokenizer.decode(text)

    def encode(self, sentence: str) -> torch.Tensor:
        """Tokenise (if a tokenizer was given), map words to ids, append ``</s>`` (fairseq's hub ``encode``)."""
        if not isinstance(sentence, str):
            raise UserError(f"encode takes one str, not {type(sentence).__name__} (a list: encode each)")
        return torch.tensor(self._line_ids(sentence), dtype=torch.long)

    def _line_ids(self, line: str) -> list[int]:
        """``encode``'s ids as a list (rescoring calls ``ids`` per hypothesis: no tensor round trip)."""
        return self.dictionary.encode_line(self.tokenize(line))

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        """ids -> text, dropping ``</s>`` and ``<s>`` (fairseq's ``Dictionary.string``: ``<pad>`` is kept as its
        symbol), then detokenise."""
        ids = _decodable(tokens)
        d = self.dictionary
        return self.detokenize(d.string([i for i in ids if i not in (d.eos(), d.bos())], keep_special=True))

    def ids(self, sentence: str, replace_newline_with_eos: bool = False) -> list[int]:
        """A sentence's word ids as fairseq's hub scores them: ``encode``'s ids (with ``replace_newline_with_eos``
        each of ``str.splitlines()``'s lines encoded, ``</s>`` after each), then every ``</s>`` at either end
        dropped (``StripTokenDataset``), so a leading, trailing or blank line adds nothing."""
        lines = sentence.splitlines() if replace_newline_with_eos else [sentence]
        return _strip([i for line in lines for i in self._line_ids(line)], self.dictionary.eos())

    # ---- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        sentences: str | list[str],
        replace_newline_with_eos: bool = False,
        batch_size: int | None = None,
        knn: Any = None,
        lmbda: float = 0.25,
        score_eos: bool = False,
        autocast_dtype: str | None = None,
        context: str | list[str | list[int]] | None = None,
    ) -> dict | list[dict]:
        """Per sentence: ``tokens`` (its words), ``positional_scores`` (ln p of each word given the words before
        it, starting from ``</s>``, or ``<s>`` with ``add_bos_token``) and ``score`` (their mean). As in fairseq's
        hub, the final ``</s>`` is not scored (``score_eos=True``: it is, last): a two-word sentence has two scores.
        Perplexity = ``positional_scores.mean().neg().exp()``. ``autocast_dtype``: "bf16" or "fp16".

        ``context``: text each sentence is scored after (one str for all, or one per sentence; its lines end with
        ``</s>`` each), read but not scored: sentence 2 given sentence 1. The scores are fairseq's hub's for
        ``score(context + "\n" + sentence, replace_newline_with_eos=True)`` at the sentence's positions. A context
        may also be word ids (``ids()``'s, ``</s>`` between lines). A sentence without words after a context scores
        nothing, or with ``score_eos`` its own ``</s>`` after the context's (fairseq's hub has no such case).

        Batches: length-sorted, of at most 4,096 positions and ``batch_size`` sentences, sentences that share
        prefixes (an n-best list) computed once (``scoring.position_scores``; the same scores up to the rounding of
        other batch shapes). ``knn``: an ``adaptive_lm.knn.KNN`` (a datastore of this model) makes the scores
        kNN-LM's, ln(lmbda p_kNN + (1 - lmbda) p_LM), with ``lm_positional_scores`` and ``knn_positional_scores``
        beside them; then ``batch_size`` (default 16) sentences per batch, in input order.
        """
        single = isinstance(sentences, str)
        items = [sentences] if single else _items(sentences, "score")  # any iterable, read once (a tensor: refused)
        if not all(isinstance(s, str) for s in items):
            raise UserError("score takes text: a str or a list of str (for word ids: rescore.sentence_logprobs)")
        _check_batch_size(batch_size)
        d, out = self.dictionary, []
        half = self._autocast(autocast_dtype)
        words = [self.ids(s, replace_newline_with_eos) for s in items]
        ctx = _contexts(self, context, len(items))
        if knn is None:
            out = _score_words(self, words, ctx, score_eos, batch_size, half)
            return out[0] if single else out
        ids = _in_context(words, ctx, d.eos(), score_eos, self.cfg.max_target_positions)
        kept = [len(x) + int(score_eos) for x in words]  # the sentence's own positions: the last ones
        knn.check_model(self)
        check_inputs(self, ids, batch_size)
        batch_size = batch_size or 16
        with knn.capture(self.model) as keys_of, fast_linears(self.device, packed=True), autocast(self.device, half):
            for b in range(0, len(items), batch_size):
                seqs = ids[b : b + batch_size]
                src, tgt, n = frame(seqs, self.start_token, d.pad(), d.eos(), score_eos)  # (B, W), (B, W), (B,)
                src, tgt = src.to(self.device), tgt.to(self.device)
                feats = self.model(src)  # (B, W, d)
                lp = self.model.target_log_probs_from_features(feats, tgt).float().cpu()  # (B, W)
                skip = [int(n[r]) - k for r, k in zip(range(len(seqs)), kept[b:])]  # context positions: no search
                rows = [{"positional_scores": lp[r, skip[r] : int(n[r])]} for r in range(len(seqs))]
                rows = knn.interpolate_rows(keys_of(src), tgt, rows, lmbda, skip)
                out += [_scored(x, row) for x, row in zip(words[b:], rows)]
        return out[0] if single else out

    def _autocast(self, name: Any) -> torch.dtype | None:
        """``autocast_dtype``: "bf16"/"fp16" (or the torch dtype, or its name) for an fp32 model; None: no autocast."""
        if name is None:
            return None
        half = (
            name
            if name in (torch.bfloat16, torch.float16)
            else HALF.get({"bfloat16": "bf16", "float16": "fp16"}.get(name, name))
        )
        if half is None:
            raise UserError(f"autocast_dtype {name!r}: use 'bf16' or 'fp16' (None: the model's own dtype)")
        dtype = next(self.model.parameters()).dtype
        if dtype != torch.float32:
            raise UserError(f"autocast_dtype {name!r} needs an fp32 model; this one is {dtype}")
        return half

    def score_rows(
        self,
        lines: list[str],
        batch_size: int | None = None,
        score_eos: bool = False,
        autocast: str | None = None,
        context_lines: int = 0,
        base2: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """``adaptive-lm score``'s records, one per line in order: the text, its tokens, each token's ln p, their
        sum and mean, and the perplexity exp(-mean). Lines are scored ``SCORE_CHUNK_LINES`` at a time (``score``:
        length-sorted batches of at most ``batch_size`` sentences, shared prefixes), so records come out as chunks
        finish. ``context_lines``: each line scored after up to that many lines with words before it (blank lines,
        such as WikiText's, do not count), as ``score``'s ``context``, the earliest tokens left out where the
        context would not fit the model's positions. ``base2``: log-probabilities, sum and mean in bits (log2 p)
        instead of nats."""
        if isinstance(lines, str):
            raise UserError("score_rows takes a list of lines, not one str")
        _check_batch_size(batch_size)
        half = self._autocast(autocast)
        line_ids = [self.ids(line) for line in lines] if context_lines > 0 else None  # each line encoded once
        contexts = _line_contexts(self, line_ids, context_lines) if line_ids is not None else None
        for b in range(0, len(lines), SCORE_CHUNK_LINES):
            chunk = lines[b : b + SCORE_CHUNK_LINES]
            ids = line_ids[b : b + len(chunk)] if line_ids is not None else [self.ids(line) for line in chunk]
            ctx = contexts[b : b + len(chunk)] if contexts is not None else [[] for _ in chunk]
            try:
                scored = _score_words(self, ids, ctx, score_eos, batch_size, half)
            except UserError as e:  # the chunk's sentence number -> the line's
                where = re.sub(r"^sentence (\d+)", lambda m, b=b: f"line {int(m.group(1)) + b}", str(e))
                raise UserError(where) from None
            for line, r in zip(chunk, scored):  # type: ignore[arg-type]
                tokens = [self.dictionary[i] for i in r["tokens"].tolist()] + (["</s>"] if score_eos else [])
                yield _record(line, tokens, r["positional_scores"].tolist(), base2)

    @torch.no_grad()
    def features(self, sentences: str | list[str], all_layers: bool = False):
        """Hidden states before the softmax, (T, d) per sentence (input = ``</s>`` + words), optionally the
        states after the embedding and after every layer (kNN-LM-style research needs them)."""
        single = isinstance(sentences, str)
        res = []
        for s in [sentences] if single else sentences:
            ids = self.ids(s)
            check_inputs(self, [ids])
            src = torch.tensor([[self.start_token] + ids], device=self.device)
            x, states = self.model(src, return_all_hiddens=True)
            res.append([h[0] for h in states] + [x[0]] if all_layers else x[0])
        return res[0] if single else res

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(
        self, tokenized_sentences: Any, beam: int = 5, verbose: bool = False, seed: int | None = None, **kwargs: Any
    ) -> Any:
        """fairseq's hub ``generate``: encoded prompts (``encode``'s tensors, ``</s>`` last) -> for each, every
        finished hypothesis of the beam, best first: dicts with ``tokens`` (prompt + continuation + ``</s>``),
        ``score`` and ``positional_scores``, the numbers fairseq's ``SequenceGenerator`` gives
        (``inference/generate.py``). ``kwargs``: ``GenerationConfig``'s fields (fairseq's names: ``lenpen``,
        ``sampling_topk``, ``max_len_b``, ...). ``seed``: ``torch.manual_seed(seed)`` first (fairseq leaves seeding
        to the caller); ``verbose`` logs fairseq's S/H/P lines."""
        from adaptive_lm.inference.generate import GenerationConfig, Special, generate

        if torch.is_tensor(tokenized_sentences) and tokenized_sentences.dim() == 1:
            return self.generate(tokenized_sentences.unsqueeze(0), beam, verbose, seed, **kwargs)[0]
        unknown = sorted(set(kwargs) - set(GenerationConfig.__dataclass_fields__))
        if unknown:
            raise UserError(f"generate: unknown option(s) {', '.join(unknown)} (see GenerationConfig)")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
                raise UserError(f"seed must be an integer in [-2**63, 2**64), not {seed!r}")
            torch.manual_seed(seed)
        d = self.dictionary
        prompts_in = _items(tokenized_sentences, "generate")
        given = [_prompt_ids(t, i, self.cfg.vocab_size) for i, t in enumerate(prompts_in)]
        prompts = [_strip(ids, d.eos()) for ids in given]
        special = Special(bos=self.start_token, eos=d.eos(), pad=d.pad(), unk=d.unk())
        cfg = GenerationConfig(beam=beam, **kwargs)
        out = generate(self.model, prompts, special, cfg, *self.batching, lengths=[len(ids) for ids in given])
        if verbose:
            for p, hyps in zip(prompts, out):
                log.info("S\t%s", d.string(p))
                for h in hyps:
                    log.info("H\t%s\t%s", float(h["score"]), self.decode(h["tokens"]))
                    log.info("P\t%s", " ".join(f"{x:.4f}" for x in h["positional_scores"].tolist()))
        return out

    def sample(self, sentences: str | list[str], beam: int = 1, verbose: bool = False, **kwargs: Any):
        """fairseq's hub ``sample``: prompt(s) in, the best hypothesis' text out (the prompt included); a str for a
        str, a list for a list."""
        single = isinstance(sentences, str)
        items = [sentences] if single else _items(sentences, "sample")
        if not all(isinstance(s, str) for s in items):
            raise UserError("sample takes text: a str or a list of str (for word ids: generate)")
        hyps = self.generate([self.encode(s) for s in items], beam=beam, verbose=verbose, **kwargs)
        if any(not h for h in hyps):  # no hypothesis finished: nothing to return for that prompt
            raise UserError("no hypothesis finished for a prompt (every candidate was forbidden); relax the options")
        texts = [self.decode(h[0]["tokens"]) for h in hyps]
        return texts[0] if single else texts


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))):
        raise UserError(f"batch_size must be a positive integer (None: no limit), not {batch_size!r}")


def _score_words(
    lm: LanguageModel,
    words: list[list[int]],
    contexts: list[list[int]],
    score_eos: bool,
    batch_size: int | None,
    half: torch.dtype | None,
) -> list[dict[str, Any]]:
    """``score``'s records (no kNN) of sentences given as word ids, each after its context (``[]``: none): the
    sentence's positions are the last ones of its scores. ``half``: the autocast dtype (None: none)."""
    ids = _in_context(words, contexts, lm.dictionary.eos(), score_eos, lm.cfg.max_target_positions)
    with torch.no_grad(), fast_linears(lm.device, packed=True), autocast(lm.device, half):
        scores, offsets = position_scores(lm, ids, score_eos, max_sentences=batch_size)
    out = []
    for x, b in zip(words, offsets[1:].tolist()):
        k = len(x) + int(score_eos)  # the sentence's own positions
        out.append(_scored(x, {"positional_scores": torch.from_numpy(scores[b - k : b])}))  # a view, float32
    return out


def _record(line: str, tokens: list[str], ln_p: list[float], base2: bool) -> dict[str, Any]:
    """``score_rows``' record of one line; the perplexity is the same in either base (2^-mean bits = e^-mean
    nats)."""
    mean = sum(ln_p) / len(ln_p) if ln_p else 0.0
    scale = 1 / math.log(2) if base2 else 1.0
    ps = [x * scale for x in ln_p]
    return {"text": line, "tokens": tokens, "logprobs": [round(x, 6) for x in ps], "sum": float(sum(ps)),
            "mean": mean * scale, "ppl": math.exp(-mean) if -mean < 709.0 else math.inf}  # fmt: skip


def _contexts(lm: LanguageModel, context: Any, n: int) -> list[list[int]]:
    """``score``'s ``context`` as word ids per sentence (each of its lines followed by ``</s>``, as fairseq's
    ``replace_newline_with_eos``, the ends stripped): one str for every sentence, or one per sentence (a str or
    word ids)."""
    if context is None:
        return [[] for _ in range(n)]
    given = [context] * n if isinstance(context, str) else _items(context, "score's context")
    if len(given) != n:
        raise UserError(f"{len(given)} contexts for {n} sentences: give one per sentence (or one str for all)")
    made: dict[str, list[int]] = {}
    out = []
    for c in given:
        if isinstance(c, str):
            if c not in made:
                made[c] = lm.ids(c, replace_newline_with_eos=True)
            out.append(made[c])
        elif isinstance(c, (list, tuple)) and all(isinstance(i, (int, np.integer)) for i in c):
            out.append([int(i) for i in c])
        else:
            raise UserError("context takes text or word ids: a str, or a list with one str (or id list) per sentence")
    return out


def _in_context(
    words: list[list[int]], contexts: list[list[int]], eos: int, score_eos: bool, limit: int
) -> list[list[int]]:
    """Each sentence after its context and a ``</s>``. A sentence without words needs its context only to score
    its ``</s>`` (``score_eos``): then it is the context and that ``</s>``, otherwise nothing. A context that makes
    a sentence too long for the model is refused here, naming it (a sentence too long by itself is
    ``check_inputs``' to report)."""
    out = []
    for i, (c, x) in enumerate(zip(contexts, words)):
        full = [*c, eos, *x] if c and (x or score_eos) else x
        if c and len(full) + 1 > limit >= len(x) + 1:
            raise UserError(
                f"sentence {i + 1} with its context is {len(full)} tokens: with its </s> more than the model's "
                f"{limit} positions; shorten the context"
            )
        out.append(full)
    return out


def _line_contexts(lm: LanguageModel, ids: list[list[int]], n: int) -> list[list[int]]:
    """``score_rows``' contexts: for each line (its word ids), the word ids of the last ``n`` earlier lines that
    have words, ``</s>`` between them, cut from the left to what fits the model's positions with the line."""
    eos, limit = lm.dictionary.eos(), lm.cfg.max_target_positions
    out, recent = [], []  # recent: the last n lines with words before this one
    for x in ids:
        ctx = [t for j, r in enumerate(recent) for t in ([eos, *r] if j else r)]
        room = max(0, limit - 2 - len(x))  # context + </s> + the line + the start symbol
        out.append(_strip(ctx[len(ctx) - room :], eos) if len(ctx) > room else ctx)  # no leading </s> once cut
        if x:
            recent = [*recent, x][-n:]
    return out


def _items(xs: Any, what: str) -> list[Any]:
    """A list argument of ``score``/``sample``/``generate`` (any iterable) as a list; anything else is refused."""
    try:
        return list(xs)
    except TypeError:
        raise UserError(f"{what} takes a list (or any iterable) of inputs, not {type(xs).__name__}") from None


def _decodable(tokens: Any) -> list[int]:
    """``decode``'s input as a list of ints: a 1-D integer tensor or array, or a sequence of ints."""
    if torch.is_tensor(tokens) or isinstance(tokens, np.ndarray):
        t = torch.as_tensor(tokens)
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise UserError(f"decode takes 1-D integer ids (one sentence), not a {t.dim()}-D {t.dtype} tensor")
        return t.tolist()
    if isinstance(tokens, (list, tuple)) and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in tokens
    ):
        return [int(x) for x in tokens]
    raise UserError(f"decode takes a 1-D tensor or list of int ids (one sentence), not {type(tokens).__name__}")


def _prompt_ids(t: Any, i: int, vocab: int) -> list[int]:
    """Prompt ``i`` of ``generate`` as a list of word ids, checked: a 1-D integer tensor or a list of ints (what
    ``encode`` returns), each a word of the dictionary."""
    if isinstance(t, str):
        raise UserError(f"prompt {i + 1} is text: generate takes encoded prompts (lm.encode(text)); sample takes text")
    if torch.is_tensor(t):
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise UserError(f"prompt {i + 1}: a {t.dim()}-D {t.dtype} tensor; give 1-D integer ids (lm.encode(text))")
        ids = t.tolist()
    elif isinstance(t, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in t):
        ids = list(t)
    else:
        raise UserError(
            f"prompt {i + 1} is {type(t).__name__}: give a list of prompts, each a 1-D tensor of ids or a list of "
            "ints (one prompt: [lm.encode(text)])"
        )
    bad = [x for x in ids if not 0 <= x < vocab]
    if bad:
        raise UserError(f"prompt {i + 1}: word id {bad[0]} outside the vocabulary [0, {vocab})")
    return ids


def _strip(ids: list[int], eos: int) -> list[int]:
    """fairseq's ``StripTokenDataset``: the prompt without the ``</s>`` symbols at its ends."""
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    while ids and ids[0] == eos:
        ids = ids[1:]
    return ids
