"""``from_pretrained``: one entry point for every model file a user may hold.

Accepted: a fairseq checkpoint (``model.pt`` / ``checkpoint_best.pt``) with ``dict.txt`` beside it or in a
``data-bin/`` folder beside it, one of our training checkpoints (it carries its dictionary), an exported
model folder (``config.json`` + ``model.safetensors`` + ``dict.txt``), or a folder holding any of these.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import FORMAT
from .config import ModelConfig
from .dictionary import Dictionary
from .errors import UserError
from .fairseq_io import config_from_fairseq, load_into, safe_load, state_dict_from_fairseq, stored_settings
from .kernels import fast_linears
from .model import TransformerLM, prune_layers


@dataclass
class LanguageModel:
    """A model with its dictionary: what ``from_pretrained`` returns (scoring and generation build on it)."""

    model: TransformerLM
    dictionary: Dictionary
    source: str = ""
    tokens_per_sample: int | None = None
    tokenizer: Any = None

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
        if self.tokenizer is None:
            return text
        return self.tokenizer.tokenize(text)

    def detokenize(self, text: str) -> str:
        if self.tokenizer is None:
            return text
        return self.tokenizer.detokenize(text)

    def encode(self, sentence: str) -> torch.Tensor:
        """Tokenise (if a tokenizer was given), map words to ids, append ``</s>`` (fairseq's hub ``encode``)."""
        return torch.tensor(self.dictionary.encode_line(self.tokenize(sentence)), dtype=torch.long)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        """ids -> text, dropping ``</s>``/``<s>``/``<pad>``, then detokenise."""
        ids = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        return self.detokenize(self.dictionary.string(ids))

    def _ids(self, sentence: str, replace_newline_with_eos: bool = False) -> list[int]:
        if replace_newline_with_eos:
            ids: list[int] = []
            for line in sentence.split("\n"):
                ids += self.encode(line).tolist()
            return ids
        return self.encode(sentence).tolist()

    # ---- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(
        self,
        sentences: str | list[str],
        replace_newline_with_eos: bool = False,
        batch_size: int = 16,
        knn: Any = None,
        lmbda: float = 0.25,
    ) -> dict | list[dict]:
        """Per sentence: ``tokens`` (its words), ``positional_scores`` (ln p of each word given the words before
        it, starting from ``</s>``, or ``<s>`` with ``add_bos_token``) and ``score`` (their mean). As in fairseq's
        hub, the final ``</s>`` is not scored: a two-word sentence has two scores. Perplexity =
        ``positional_scores.mean().neg().exp()``.

        ``knn``: an ``adaptive_lm.knn.KNN`` (a datastore of this model) makes the scores kNN-LM's,
        ln(lmbda p_kNN + (1 - lmbda) p_LM), with ``lm_positional_scores`` and ``knn_positional_scores`` beside them
        (``adaptive_lm.knn.knn_score``)."""
        if knn is not None:
            from .knn import knn_score

            return knn_score(self, sentences, knn, lmbda, batch_size, replace_newline_with_eos)
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        out = []
        for b in range(0, len(items), batch_size):
            seqs = [self._ids(s, replace_newline_with_eos)[:-1] for s in items[b : b + batch_size]]
            src, tgt = self.sentence_batch(seqs)
            with fast_linears(self.device):
                lp = self.model.target_log_probs(src.to(self.device), tgt.to(self.device)).float().cpu()  # (B, W)
            for r, x in enumerate(seqs):
                ps = lp[r, : len(x)]
                out.append(
                    {
                        "tokens": torch.tensor(x, dtype=torch.long),
                        "positional_scores": ps,
                        "score": float(ps.mean()) if len(x) else 0.0,
                    }
                )
        return out[0] if single else out

    def sentence_batch(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, W) inputs ``<start> w1 .. wn`` and targets ``w1 .. wn`` of word-id sequences: a
        sentence scored the way fairseq's hub ``score`` does (the final ``</s>`` not predicted)."""
        pad = self.dictionary.pad()
        W = max(1, max((len(x) for x in seqs), default=0) + 1)
        src = torch.full((len(seqs), W), pad, dtype=torch.long)
        tgt = torch.full((len(seqs), W), pad, dtype=torch.long)
        for r, x in enumerate(seqs):
            src[r, : len(x) + 1] = torch.tensor([self.start_token] + list(x))
            tgt[r, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        return src, tgt

    def score_rows(self, lines: list[str], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """``adaptive-lm score``'s records, one per line in order: the text, its tokens, each token's ln p, their
        sum and mean, and the perplexity exp(-mean)."""
        for b in range(0, len(lines), batch_size):
            chunk = lines[b : b + batch_size]
            for line, r in zip(chunk, self.score(chunk, batch_size=batch_size)):  # type: ignore[arg-type]
                ps = r["positional_scores"].tolist()
                total = float(sum(ps))
                mean = total / len(ps) if ps else 0.0
                yield {
                    "text": line,
                    "tokens": [self.dictionary[i] for i in r["tokens"].tolist()],
                    "logprobs": [round(x, 6) for x in ps],
                    "sum": total,
                    "mean": mean,
                    "ppl": math.exp(-mean),
                }

    @torch.no_grad()
    def features(self, sentences: str | list[str], all_layers: bool = False):
        """Hidden states before the softmax, (T, d) per sentence (input = ``</s>`` + words), optionally the
        states after the embedding and after every layer (kNN-LM-style research needs them)."""
        single = isinstance(sentences, str)
        res = []
        for s in [sentences] if single else sentences:
            ids = self._ids(s)[:-1]
            src = torch.tensor([[self.start_token] + ids], device=self.device)
            x, states = self.model(src, return_all_hiddens=True)
            res.append([h[0] for h in states] + [x[0]] if all_layers else x[0])
        return res[0] if single else res

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, tokenized: list[torch.Tensor], beam: int = 5, verbose: bool = False, **kwargs: Any):
        """fairseq's hub ``generate``: encoded prompts (with their trailing ``</s>``) -> nbest hypothesis dicts."""
        from .generate import GenerationConfig, generate

        cfg = GenerationConfig(beam=beam, **kwargs)
        prompts = [t.tolist()[:-1] if len(t) and int(t[-1]) == self.dictionary.eos() else t.tolist() for t in tokenized]
        d = self.dictionary
        return generate(self.model, prompts, d.eos(), d.pad(), d.unk(), cfg, start=self.start_token)

    def sample(self, sentences: str | list[str], beam: int = 1, verbose: bool = False, **kwargs: Any):
        """Prompt(s) in, continuation(s) out (the prompt included): a str for a str, a list for a list."""
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        hyps = self.generate([self.encode(s) for s in items], beam=beam, verbose=verbose, **kwargs)
        texts = [self.decode(h[0]["tokens"]) for h in hyps]
        return texts[0] if single else texts


def find_dictionary(model_path: Path, tried: list[Path] | None = None) -> Path:
    """dict.txt next to the model, in data-bin/ next to it, or one level up: say which paths were tried."""
    base = model_path if model_path.is_dir() else model_path.parent
    candidates = [base / "dict.txt", base / "data-bin" / "dict.txt", base.parent / "dict.txt"]
    for c in candidates:
        if c.is_file():
            return c
    tried_s = ", ".join(str(c) for c in candidates)
    raise UserError(f"{model_path}: no dict.txt found (tried {tried_s}); pass dictionary=PATH")


def _pick_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.pt", "checkpoint_best.pt", "checkpoint_last.pt"):
        if (folder / name).is_file():
            return folder if name == "model.safetensors" else folder / name
    raise UserError(
        f"{folder}: no model here (looked for model.safetensors, model.pt, checkpoint_best.pt, checkpoint_last.pt)"
    )


def load_fairseq(
    path: Path,
    dictionary: Dictionary,
    ckpt: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overrides: dict[str, Any] | None = None,
) -> TransformerLM:
    """Build from the checkpoint's stored settings (never the arch name alone), with fairseq-style load-time
    ``overrides`` (e.g. ``decoder_layers_to_keep``), and load its weights."""
    ckpt = ckpt if ckpt is not None else safe_load(path)
    cfg = config_from_fairseq(stored_settings(ckpt), len(dictionary), overrides, state_keys=ckpt["model"].keys())
    return _build(cfg, state_dict_from_fairseq(ckpt["model"], cfg), str(path), dtype, dictionary)


def _build(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None, dictionary: Dictionary
) -> TransformerLM:
    with torch.device("meta"):  # no random init, no second copy: the weights are assigned from the file
        model = TransformerLM(cfg, dictionary.symbols)
    load_into(model, sd, source=source, dtype=dtype)
    model.materialize_buffers(symbols=dictionary.symbols)
    return model


def stored_vocab_size(sd: dict[str, torch.Tensor]) -> int | None:
    """The vocabulary size a fairseq state dict was trained with (None if its layout does not say)."""
    for k in ("decoder.embed_tokens.weight", "decoder.output_projection.weight", "decoder.embed_out"):
        if k in sd:
            return int(sd[k].shape[0])
    bands = [k for k in sd if k.startswith("decoder.embed_tokens.embeddings.") and k.endswith(".0.weight")]
    if bands:
        return sum(int(sd[k].shape[0]) for k in bands)
    return None


def _check_vocab(d: Dictionary, vocab: int | None, model: Path, given: Any) -> None:
    """A dictionary of another size than the model's output would give ids the model never learned."""
    if vocab is not None and len(d) != vocab:
        where = f"--dict {given}" if given else f"the dictionary found for {model}"
        raise UserError(
            f"{where} has {len(d)} symbols but the model was trained with {vocab}: use the model's own dict.txt"
        )


def _with_overrides(cfg: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """Our stored config with load-time overrides (the fields of ModelConfig, as fairseq's ``arg_overrides``)."""
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown model override(s): {', '.join(unknown)} (use ModelConfig field names)")
    out = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    out.validate()
    return out


def _dictionary_from_checkpoint(ckpt: dict[str, Any]) -> Dictionary:
    d = Dictionary()
    syms, counts = ckpt["dictionary"]["symbols"], ckpt["dictionary"]["counts"]
    for sym, c in zip(syms[d.nspecial :], counts[d.nspecial :]):
        d.add_symbol(sym, n=c, overwrite=True)
    return d


def make_tokenizer(name: str | None):
    """``None``/"space": text is already tokenised; "moses": sacremoses with fairseq's LM settings (no escaping,
    aggressive dash splits -> ``@-@``), as the maintainers advise for both released models."""
    if name in (None, "space", "none"):
        return None
    if name == "moses":
        from .tokenize import MosesTokenizer

        return MosesTokenizer()
    raise UserError(f"unknown tokenizer {name!r}: use 'moses' or leave it unset (pre-tokenised text)")


def from_pretrained(
    path: str | os.PathLike,
    dictionary: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> LanguageModel:
    """Load a model and its dictionary from any supported layout; returns it in eval mode.

    ``path``: a fairseq checkpoint (``dict.txt`` beside it or in ``data-bin/``), a fairseq ``.tar.bz2`` archive
    (extracted safely into the cache), one of our training checkpoints, an exported model folder, a folder
    holding one of these, or a released model's name (``wiki103``, ``gbw``: downloaded once, then cached).
    ``dtype`` loads straight into that dtype; ``tokenizer="moses"`` lets ``score``/``sample`` take raw text.
    ``overrides``: model settings to change at load, as fairseq's ``arg_overrides`` / ``--model-overrides`` (for
    example ``{"decoder_layers_to_keep": "0,2"}`` to evaluate a LayerDrop-trained model with fewer layers, or
    dropout values for further training).
    """
    from .pretrained import RELEASED, fetch, open_archive

    p = Path(path)
    if not p.exists() and str(path) in RELEASED:
        p = fetch(str(path))
    if not p.exists():
        raise UserError(f"{p}: no such file or folder (or a released model name: {', '.join(RELEASED)})")
    if p.is_file() and p.name.endswith((".tar.bz2", ".tar.gz", ".tgz", ".tar")):
        p = open_archive(p)
    if p.is_dir():
        p = _pick_file(p)
    tok = make_tokenizer(tokenizer)
    if p.is_dir():  # exported model folder
        if not (p / "config.json").is_file():
            raise UserError(
                f"{p}: an exported model folder needs config.json beside model.safetensors (written by "
                f"adaptive-lm convert); it is missing"
            )
        meta = json.loads((p / "config.json").read_text())
        from safetensors.torch import load_file

        d = Dictionary.load(Path(dictionary) if dictionary else p / "dict.txt")
        _check_vocab(d, meta["model"]["vocab_size"], p, dictionary)
        cfg = _with_overrides(ModelConfig.from_dict(meta["model"]), overrides)
        sd = prune_layers(load_file(str(p / "model.safetensors")), cfg.decoder_layers_to_keep)
        model = _build(cfg, sd, str(p), dtype, d)
        lm = LanguageModel(model, d, str(p), meta.get("tokens_per_sample"), tok)
        return lm.to(device).eval()
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{p}: not a model checkpoint (no 'model' entry)")
    if ckpt.get("format") == FORMAT:  # ours: config and dictionary travel inside
        d = Dictionary.load(dictionary) if dictionary else _dictionary_from_checkpoint(ckpt)
        _check_vocab(d, ckpt["config"]["model"]["vocab_size"], p, dictionary)
        cfg = _with_overrides(ModelConfig.from_dict(ckpt["config"]["model"]), overrides)
        model = _build(cfg, prune_layers(ckpt["model"], cfg.decoder_layers_to_keep), str(p), dtype, d)
        tps = ckpt["config"].get("tokens_per_sample")
        return LanguageModel(model, d, str(p), tps, tok).to(device).eval()
    d = Dictionary.load(Path(dictionary) if dictionary else find_dictionary(p))
    _check_vocab(d, stored_vocab_size(ckpt["model"]), p, dictionary)
    model = load_fairseq(p, d, ckpt, dtype, overrides)
    tps = stored_settings(ckpt).get("tokens_per_sample")
    return LanguageModel(model, d, str(p), tps, tok).to(device).eval()
