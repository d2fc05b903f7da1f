"""The hub's text pipeline against fairseq's on what the beam references do not cover (tests/generation/
make_fairseq_text.py -> data/text_pipeline.json, made with fairseq's hub): ``decode`` keeps ``<pad>`` (fairseq's
``Dictionary.string`` drops only ``</s>`` and ``<s>``), an empty sentence's ``score`` is nan, and the Moses tokenizer
with fairseq's options, stored in the checkpoint's cfg or given as keywords. Found by the hub audit: ``decode``
dropped ``<pad>``, the empty score was 0.0, fairseq's Moses keywords were refused, and a checkpoint's stored Moses
options were ignored (no escaping, WikiText number separators, where fairseq's hub escapes ``'`` as ``&apos;``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptive_lm
from adaptive_lm.inference.tokenizer import _NUM_SEP

HERE = Path(__file__).parent / "generation"
MODELS = HERE / "models"
REF = json.loads((HERE / "data" / "text_pipeline.json").read_text(encoding="utf-8"))


def load(model: str, **kw) -> adaptive_lm.LanguageModel:
    return adaptive_lm.from_pretrained(MODELS / model, "model.pt", **kw)


def load_with_bpe(model: str) -> adaptive_lm.LanguageModel:
    """A generation model as fairseq's hub was given it (spm with its SentencePiece BPE)."""
    return load(model, **({"bpe": "sentencepiece"} if model == "spm" else {}))


@pytest.mark.parametrize("case", REF["decode"], ids=lambda c: f"{c['model']}-{c['ids']}")
def test_decode_keeps_pad_as_fairseq(case):
    lm = load_with_bpe(case["model"])
    assert lm.decode(torch.tensor(case["ids"])) == case["text"]
    assert lm.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("case", REF["score_empty"], ids=lambda c: f"{c['model']}-{len(c['sentences'])}")
def test_an_empty_sentence_scores_nan_as_fairseq(case):
    lm = load_with_bpe(case["model"])
    got = lm.score(case["sentences"])
    got = [got] if isinstance(case["sentences"], str) else got
    for g, r in zip(got, case["results"], strict=True):
        assert g["tokens"].tolist() == r["tokens"]
        torch.testing.assert_close(g["positional_scores"], torch.tensor(r["positional_scores"]), atol=1e-5, rtol=0)
        assert math.isnan(g["score"]) if math.isnan(r["score"]) else abs(g["score"] - r["score"]) <= 1e-5


def _with_stored_moses(tmp_path: Path, name: str) -> Path:
    """wiki_tied's checkpoint with a Moses ``cfg.tokenizer``, as make_fairseq_text.py gave fairseq's hub."""
    folder = tmp_path / name
    folder.mkdir()
    ckpt = torch.load(MODELS / "wiki_tied" / "model.pt", weights_only=True)
    ckpt["cfg"]["tokenizer"] = dict(REF["moses_cfgs"][name])
    torch.save(ckpt, folder / "model.pt")
    (folder / "dict.txt").write_bytes((MODELS / "wiki_tied" / "dict.txt").read_bytes())
    return folder


@pytest.mark.parametrize("case", REF["moses"], ids=lambda c: c["stored"] or json.dumps(c["kwargs"]))
def test_moses_with_fairseqs_options_as_fairseqs_hub(case, tmp_path):
    """A stored Moses cfg: fairseq's step exactly. Keywords: fairseq's options with fairseq's meaning; our WikiText
    number separators (docs/from-fairseq.md) still split 1,000.5, so texts with one are not compared."""
    if case["stored"]:
        lm = adaptive_lm.from_pretrained(_with_stored_moses(tmp_path, case["stored"]), "model.pt")
    else:
        lm = load("wiki_tied", **case["kwargs"])
    texts = [t for t in case["texts"] if case["stored"] or not _NUM_SEP.search(t["text"])]
    assert len(texts) >= len(case["texts"]) - 1
    for t in texts:
        assert lm.encode(t["text"]).tolist() == t["ids"], t["text"]
        assert lm.decode(lm.encode(t["text"])) == t["roundtrip"], t["text"]


def test_moses_options_are_checked():
    from adaptive_lm.core.errors import UserError

    with pytest.raises(UserError, match="moses_no_escape: options of tokenizer='moses', not of None"):
        load("wiki_tied", moses_no_escape=True)
    with pytest.raises(UserError, match="moses_no_dash_splits must be True or False, not 'yes'"):
        load("wiki_tied", tokenizer="moses", moses_no_dash_splits="yes")


def test_generate_reads_crlf_prompt_files_as_score_does():
    """Prompts piped to ``adaptive-lm generate`` from a CRLF file had kept the \\r (a GPT-2 BPE token of its own)."""
    folder = MODELS / "gpt2bpe"
    cmd = [sys.executable, "-m", "adaptive_lm", "generate", "--path", str(folder), "--bpe", "gpt2", "--beam", "2",
           "--max-len-b", "8"]  # fmt: skip
    crlf = subprocess.run(cmd, input=b"The game\r\nIn 1998,\r\n", capture_output=True, check=True)
    lf = subprocess.run(cmd, input=b"The game\nIn 1998,\n", capture_output=True, check=True)
    assert crlf.stdout == lf.stdout and lf.stdout.count(b"\n") == 2
    # bytes that are not UTF-8: one line, as adaptive-lm score says it (they had become <unk> words of the prompt)
    bad = subprocess.run(cmd, input=b"The \xff game\n", capture_output=True)
    assert bad.returncode == 2 and bad.stdout == b""
    assert (
        bad.stderr.decode() == "adaptive-lm generate: error: standard input: not valid UTF-8 (invalid start byte); "
        "convert it to UTF-8\n"
    )
    bom = subprocess.run(cmd, input=b"\xef\xbb\xbfThe game\nIn 1998,\n", capture_output=True, check=True)
    assert bom.stdout == lf.stdout  # a byte-order mark is not part of the first prompt


@pytest.mark.parametrize("case", REF["score_context"], ids=lambda c: f"{c['model']}-{c['sentence'][:12]}")
def test_a_sentence_after_its_context_scores_as_fairseq(case):
    """``score(sentence, context=...)`` is fairseq's hub score of context + "\\n" + sentence with
    ``replace_newline_with_eos``, at the sentence's positions only (user need 20: sentence 2 given sentence 1)."""
    lm = load_with_bpe(case["model"])
    n = case["words"]
    got = lm.score(case["sentence"], context=case["context"])
    assert got["tokens"].tolist() == case["tokens"][-n:]
    want = torch.tensor(case["positional_scores"][-n:])
    torch.testing.assert_close(got["positional_scores"], want, atol=1e-5, rtol=0)
    assert abs(got["score"] - float(want.double().mean())) <= 1e-5


@pytest.mark.parametrize("model", sorted({c["model"] for c in REF["score_context"]}))
def test_contexts_per_sentence_in_one_batch_score_as_fairseq(model):
    """One ``score`` call, a context per sentence (and the same sentence under different contexts): each as
    fairseq's."""
    cases = [c for c in REF["score_context"] if c["model"] == model]
    lm = load_with_bpe(model)
    got = lm.score([c["sentence"] for c in cases] * 2, context=[c["context"] for c in cases] + ["x"] * len(cases))
    for g, c in zip(got, cases, strict=False):
        torch.testing.assert_close(g["positional_scores"], torch.tensor(c["positional_scores"][-c["words"] :]),
                                   atol=1e-5, rtol=0)  # fmt: skip
    alone = lm.score([c["sentence"] for c in cases])
    for g, a in zip(got[len(cases) :], alone, strict=True):  # context "x" changes the scores, not the tokens
        assert g["tokens"].tolist() == a["tokens"].tolist()
        assert not torch.equal(g["positional_scores"], a["positional_scores"])


def test_score_context_lines_on_the_command_line_as_fairseq(tmp_path):
    """``adaptive-lm score --context-lines 2``: the third line scored after the first two (fairseq's numbers);
    the first line alone; bad contexts refused in one line."""
    case = next(c for c in REF["score_context"] if c["model"] == "wiki_tied" and "\n" in c["context"])
    text = tmp_path / "doc.txt"
    text.write_text(case["context"] + "\n" + case["sentence"] + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "adaptive_lm", "score", str(text), "--path", str(MODELS / "wiki_tied" / "model.pt"),
           "--context-lines", "2", "--no-progress-bar"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 3
    n = case["words"]
    tol = 1e-5 + 5e-7  # fp32 agreement, plus the JSON's rounding to 6 decimals
    assert all(abs(a - b) <= tol for a, b in zip(rows[2]["logprobs"], case["positional_scores"][-n:], strict=True))
    lm = load("wiki_tied")
    first = lm.score(case["context"].splitlines()[0])["positional_scores"].tolist()
    assert all(abs(a - b) <= tol for a, b in zip(rows[0]["logprobs"], first, strict=True))
    with pytest.raises(adaptive_lm.UserError, match="2 contexts for 3 sentences"):
        lm.score(["a", "b", "c"], context=["x", "y"])
    with pytest.raises(adaptive_lm.UserError, match="with its context is .* shorten the context"):
        lm.score("a", context=" ".join(["the"] * 2000))


def test_context_lines_skip_blank_lines_fit_the_model_and_name_the_line(tmp_path):
    """``--context-lines``: blank lines (WikiText puts one before every line) are not counted; an empty line with
    ``--score-eos`` scores its own </s> after the context's (not the context's again); a context too long for the
    model is cut from the left; a line too long by itself is named by its number."""
    lm = load("wiki_tied")
    lines = ["the first line", " ", "", "and the second one", "", "then the third"]
    rows = list(lm.score_rows(lines, score_eos=True, context_lines=1))
    want = lm.score("then the third", context="and the second one", score_eos=True)["positional_scores"]
    assert all(abs(a - b) <= 1e-5 + 5e-7 for a, b in zip(rows[5]["logprobs"], want.tolist(), strict=True))
    own = lm.score("and the second one", context="the first line", score_eos=True)["positional_scores"][-1]
    assert rows[4]["tokens"] == ["</s>"] and abs(rows[4]["logprobs"][0] - float(own)) > 1e-3  # not counted twice
    limit = lm.cfg.max_target_positions
    long = ["the " * (limit // 2)] * 3 + ["then the third"]
    last = list(lm.score_rows(long, context_lines=3))[-1]["logprobs"]  # the context cut to fit
    ids = [lm.ids(line) for line in long]
    eos = lm.dictionary.eos()
    cut = [*ids[0], eos, *ids[1], eos, *ids[2]][-(limit - 2 - len(ids[3])) :]  # </s> + the line + <start> beside it
    cut = cut[1:] if cut[0] == eos else cut
    assert abs(sum(last) - float(lm.score("then the third", context=[cut])["positional_scores"].sum())) <= 1e-4
    with pytest.raises(adaptive_lm.UserError, match=r"^line 2 has \d+ tokens"):
        list(lm.score_rows(["a", "the " * limit], context_lines=1))
