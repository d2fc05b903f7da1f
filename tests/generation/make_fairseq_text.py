"""Reference data for the hub's text pipeline from real fairseq: tests/generation/data/text_pipeline.json.

Run with the side venv (fairseq-fixed 0.12.3.1 plus tokenizers, sentencepiece and sacremoses; fairseq is never a
dependency of the project and none of its code is here):
    ~/fairseq-venv/bin/pip install sacremoses
    ~/fairseq-venv/bin/python tests/generation/make_fairseq_text.py
It loads models of tests/generation/models/ through fairseq's hub (TransformerLanguageModel.from_pretrained) and
records what ``decode``, ``encode`` and ``score`` return for inputs the beam-search references do not cover:

- ``decode``: ids holding <pad>, <s>, </s>, <unk> and out-of-band symbols (fairseq's ``Dictionary.string`` drops eos
  and bos only);
- ``score``: the empty sentence (no position to score: fairseq's mean is nan);
- ``score_context``: a sentence after a context (our ``score(sentence, context=...)``) is fairseq's
  ``score(context + "\n" + sentence, replace_newline_with_eos=True)`` at the sentence's positions: that call's
  tokens and positional scores, and the sentence's own token count (``encode`` without its ``</s>``);
- ``moses``: the Moses tokenizer, (a) stored in the checkpoint's ``cfg.tokenizer`` (wiki_tied's model.pt with
  ``MOSES_CFGS[name]`` written into its cfg, into a temporary folder: the test makes the same file), applied by the
  hub without any keyword, and (b) asked for by keyword with fairseq's Moses options on wiki_tied itself: ``encode``
  ids and ``decode(encode(text))``.
Deterministic: no weights are trained, only the committed models are run (CPU, fp32).
"""

import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
import logging  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import fairseq  # noqa: E402
from fairseq.models.transformer_lm import TransformerLanguageModel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
OUT = os.path.join(HERE, "data", "text_pipeline.json")

MOSES_CFGS = {  # cfg.tokenizer as fairseq-train stores --tokenizer moses (every field of MosesTokenizerConfig)
    "moses_escape": {"_name": "moses", "source_lang": "en", "target_lang": "en", "moses_no_dash_splits": False,
                     "moses_no_escape": False},
    "moses_plain": {"_name": "moses", "source_lang": "en", "target_lang": "en", "moses_no_dash_splits": True,
                    "moses_no_escape": True},
}  # fmt: skip
MOSES_KWARGS = [  # from_pretrained keywords on wiki_tied (texts without digit separators: see the test)
    {"tokenizer": "moses", "moses_no_escape": False},
    {"tokenizer": "moses", "moses_no_escape": True, "moses_no_dash_splits": True},
    {"tokenizer": "moses", "moses_no_dash_splits": True, "moses_no_escape": True, "source_lang": "fr",
     "target_lang": "fr"},
]  # fmt: skip
MOSES_TEXTS = [
    "The game's music was composed by him.",
    "It cost 1,000.5 dollars for a state-of-the-art car.",
    "\"Quoted\" & <tagged> 'single' [brackets] | pipe",
    "Don't you think so?  Yes!",
    "U.S. Army in 1998 -- they said...",
    "e-mail and 3-2 win",
    "l'homme qu'il a vu",
    "",
]
CONTEXT_CASES = [  # (context, sentence): one line, two lines (each ends with </s>), none
    ("The game was released in 2010 .", "It was well received by critics ."),
    ("the first line\nand the second one", "then the third"),
    ("", "no context at all"),
]
DECODE_IDS = [[4, 1, 5, 2], [1, 1], [0, 4, 3, 2, 1], [2, 0, 1, 3, 2]]
GPT2_KW = {"bpe": "gpt2", "gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"}


def hub(folder, **kw):
    kw = {k: (os.path.join(folder, v) if k.startswith("gpt2_") else v) for k, v in kw.items()}
    return TransformerLanguageModel.from_pretrained(folder, "model.pt", **kw).eval()


def main():
    torch.set_num_threads(1)
    out = {"fairseq_version": fairseq.__version__, "torch_version": torch.__version__, "moses_cfgs": MOSES_CFGS,
           "decode": [], "score_empty": [], "score_context": [], "moses": []}  # fmt: skip
    for model in ("wiki_tied", "bos", "spm"):
        h = hub(os.path.join(MODELS, model), **({"bpe": "sentencepiece"} if model == "spm" else {}))
        for ids in DECODE_IDS:
            out["decode"].append({"model": model, "ids": ids, "text": h.decode(torch.tensor(ids))})
        for sentences in ("", ["", "the", ""]):
            r = h.score(sentences)
            rows = [r] if isinstance(sentences, str) else r
            out["score_empty"].append({"model": model, "sentences": sentences, "results": [
                {"tokens": x["tokens"].tolist(), "score": float(x["score"]),
                 "positional_scores": x["positional_scores"].tolist()} for x in rows]})  # fmt: skip
        for context, sentence in CONTEXT_CASES:
            r = h.score(context + "\n" + sentence, replace_newline_with_eos=True)
            out["score_context"].append({"model": model, "context": context, "sentence": sentence,
                                         "words": len(h.encode(sentence)) - 1, "tokens": r["tokens"].tolist(),
                                         "positional_scores": r["positional_scores"].tolist()})  # fmt: skip
    wiki = os.path.join(MODELS, "wiki_tied")
    with tempfile.TemporaryDirectory() as tmp:
        for name, tok in MOSES_CFGS.items():
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            ckpt = torch.load(os.path.join(wiki, "model.pt"), weights_only=False)
            ckpt["cfg"]["tokenizer"] = dict(tok)
            torch.save(ckpt, os.path.join(folder, "model.pt"))
            shutil.copy(os.path.join(wiki, "dict.txt"), folder)
            out["moses"].append(run_moses(hub(folder), {"stored": name, "kwargs": {}}))
    for kw in MOSES_KWARGS:
        out["moses"].append(run_moses(hub(wiki, **kw), {"stored": None, "kwargs": kw}))
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


def run_moses(h, case):
    case["texts"] = [{"text": t, "ids": h.encode(t).tolist(), "roundtrip": h.decode(h.encode(t))} for t in MOSES_TEXTS]
    return case


if __name__ == "__main__":
    main()
