"""``adaptive-lm rescore``: LM scores equal to ``LanguageModel.score`` for every hypothesis (length-sorted batches,
output in input order), both input formats, the best-of-list selection, the weight grid on a case with a known
answer, WER by jiwer (extra ``asr``: imported plainly, CI installs it), and one line + exit code 2 for every bad
input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jiwer  # a plain import: a missing extra fails loudly
import numpy as np
import pytest
import torch

import adaptive_lm
from adaptive_lm.cli import main
from adaptive_lm.cli.rescore import parse_grid
from adaptive_lm.core.kernels import FastLinears
from adaptive_lm.core.kernels import linear as fast_linear
from adaptive_lm.inference.rescore import (
    LM_COLUMN,
    best_per_list,
    encode_hypotheses,
    grid_search,
    length_batches,
    sentence_logprobs,
    word_errors,
)
from conftest import PLAIN_OUTPUT_LAYER

HYPS = {  # utterance -> hypotheses (words of the fixture's dictionary, and a few unknown ones)
    "u1": ["the song war released in the united states", "the song was released in the united states"],
    "u2": [
        "he was born in the city of london",
        "he was born in the city",
        "he was born in a city of london and he was the first of his family to play for the club",
    ],
    "u3": ["the first season of the series", "the first season", "first the season of series the", "the"],
    "u4": ["it was the most successful album of the tear", "it was the most successful album of the year"],
}
REFS = {
    "u1": "the song was released in the united states",
    "u2": "he was born in the city of london",
    "u3": "the first season of the series",
    "u4": "it was the most successful album of the year",
}


@pytest.fixture(scope="module")
def model_path():
    from conftest import FAIRSEQ_TINY

    return str(FAIRSEQ_TINY / "model" / "checkpoint_last.pt")


@pytest.fixture(scope="module")
def lm(model_path):
    return adaptive_lm.from_pretrained(model_path)


def rows():
    """(id, hypothesis, am score) in an interleaved order (lists need not be contiguous)."""
    out, k = [], 0
    for round_ in range(4):
        for uid, hyps in HYPS.items():
            if round_ < len(hyps):
                out.append((uid, hyps[round_], round(-1.5 * round_ - 0.1 * k, 3)))
                k += 1
    return out


def write_tsv(path, header=True, refs=False):
    lines = ["#utt\ttext\tam\tref" if refs else "#utt\ttext\tam"] if header else []
    for uid, hyp, am in rows():
        lines.append(f"{uid}\t{hyp}\t{am}" + (f"\t{REFS[uid]}" if refs else ""))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def expected_lm(lm, text: str) -> float:
    return float(lm.score(text)["positional_scores"].double().sum())


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def read_output(text: str) -> tuple[str, list[list[str]]]:
    lines = text.rstrip("\n").split("\n")
    assert lines[0].startswith("#")
    return lines[0], [line.split("\t") for line in lines[1:]]


# ---- scoring ---------------------------------------------------------------------------------------------------
def test_sentence_logprobs_equal_languagemodel_score_with_length_sorted_batches(lm):
    texts = [h for _, h, _ in rows()]
    ids = encode_hypotheses(lm, texts)
    got = sentence_logprobs(lm, ids, max_tokens=24)  # several batches of different widths
    want = np.array([expected_lm(lm, t) for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    lengths = [len(x) for x in ids]
    batches = length_batches(lengths, 24)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(ids)))
    widths = [max(lengths[i] for i in b) for b in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    assert all(len(b) * max(lengths[i] for i in b) <= 24 or len(b) == 1 for b in batches)


def test_onednn_linears_equal_f_linear_only_inside_the_block(monkeypatch):
    """The thread-local switch inference and training run under, with oneDNN chosen for every shape: ``linear`` gives
    the same fp32 results and gradients as F.linear (up to summation order), and goes to F.linear outside the block
    or in another dtype."""
    monkeypatch.setenv("ADAPTIVE_LM_LINEARS", "onednn")
    assert FastLinears.available()  # PyTorch's CPU build ships the op; the benchmark's speed depends on it
    real, calls = torch.ops.mkldnn._linear_pointwise, []

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    x, w, b = torch.randn(4, 7, 16), torch.randn(9, 16), torch.randn(9)
    fast, linear = fast_linear, torch.nn.functional.linear
    with torch.no_grad(), FastLinears():
        y3, y2 = fast(x, w, b), fast(x[0], w)
        yd = fast(x.double(), w.double())
    assert calls == [(28, 16), (7, 16)] and yd.dtype == torch.float64  # float64: the usual path
    torch.testing.assert_close(y3, linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, x[0] @ w.T, atol=1e-5, rtol=1e-5)
    # with autograd (training): forward and both backward GEMMs on oneDNN, gradients as F.linear's. Tolerance:
    # fp32 sums of at most 28 products of O(1) terms in another order, |error| < 28 * 2 * eps * sum|ab| ~ 1e-5
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    with FastLinears():
        y = fast(xg, wg, bg)
    assert type(y.grad_fn).__name__ == "_FastLinearBackward" and len(calls) == 3
    gy = torch.randn_like(y)
    y.backward(gy)
    assert len(calls) == 5  # d(x) and d(W); d(b) is a sum
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    linear(*ref).backward(gy)
    for got, want in zip((y, xg.grad, wg.grad, bg.grad), (linear(x, w, b), *(t.grad for t in ref))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        fast(x, w)  # outside the block
    assert len(calls) == 5


def test_score_eos_adds_the_end_of_sentence_prediction(lm):
    texts = ["the song was released", "the"]
    ids = encode_hypotheses(lm, texts)
    with_eos = sentence_logprobs(lm, ids, score_eos=True)
    for t, v in zip(texts, with_eos):
        full = lm.encode(t)  # words + </s>
        src = torch.cat([torch.tensor([lm.dictionary.eos()]), full[:-1]])[None]
        with torch.no_grad():
            want = float(lm.model.target_log_probs(src, full[None]).double().sum())
        assert v == pytest.approx(want, abs=1e-5)
        assert v < expected_lm(lm, t)
    assert sentence_logprobs(lm, [[]])[0] == 0.0


def test_tsv_rescored_in_input_order(lm, model_path, tmp_path, capsys):
    src = write_tsv(tmp_path / "nbest.tsv")
    rc, out, err = run(
        ["rescore", src, "--path", model_path, "--max-tokens", "32", "--no-progress-bar", "--cpu"], capsys
    )
    assert rc == 0, err
    header, table = read_output(out)
    assert header == f"#utt\ttext\tam\t{LM_COLUMN}"
    assert [r[:3] for r in table] == [[u, h, str(a)] for u, h, a in rows()]  # every row, in input order
    for r in table:
        assert float(r[3]) == pytest.approx(expected_lm(lm, r[1]), abs=1e-5)
    assert "rescored 11 hypotheses (4 lists" in err


def test_tsv_without_header_and_named_columns(lm, model_path, tmp_path, capsys):
    path = tmp_path / "plain.tsv"
    path.write_text("".join(f"{a}\t{h}\t{u}\n" for u, h, a in rows()), encoding="utf-8")
    rc, out, _ = run(
        ["rescore", str(path), "--path", model_path, "--id-column", "3", "--text-column", "2", "--no-progress-bar"],
        capsys,
    )
    assert rc == 0
    header, table = read_output(out)
    assert header == f"#column1\thypothesis\tid\t{LM_COLUMN}"
    assert [float(r[3]) for r in table] == pytest.approx([expected_lm(lm, h) for _, h, _ in rows()], abs=1e-5)


def test_fairseq_generate_output(lm, model_path, tmp_path, capsys):
    """H- lines (several per id, ids out of order) get the LM column; S/T/D/P and log lines stay as they were;
    T- lines are the references."""
    lines = []
    for uid, n in (("2", "u3"), ("0", "u1"), ("1", "u2")):
        lines += [f"S-{uid}\tsource words {uid}", f"T-{uid}\t{REFS[n]}"]
        for k, h in enumerate(HYPS[n]):
            lines += [f"H-{uid}\t{-0.5 - k:.4f}\t{h}", f"D-{uid}\t{-0.5 - k:.4f}\t{h}", f"P-{uid}\t-0.1 -0.2"]
    lines.append("Generate test with beam=5: BLEU4 = 12.34")
    path = tmp_path / "gen.out"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    best = tmp_path / "best.txt"
    rc, out, err = run(
        ["rescore", str(path), "--path", model_path, "--best", str(best), "--no-progress-bar", "--lm-weight", "0"],
        capsys,
    )
    assert rc == 0, err
    got = out.rstrip("\n").split("\n")
    assert got[0].startswith("# fairseq-generate output; H- lines: H-<id>\tscore (fairseq, base 2)\thypothesis\t")
    assert len(got) == len(lines) + 1
    for line, orig in zip(got[1:], lines):
        if orig.startswith("H-"):
            assert line.startswith(orig + "\t")
            assert float(line.split("\t")[3]) == pytest.approx(expected_lm(lm, orig.split("\t")[2]), abs=1e-5)
        else:
            assert line == orig
    assert best.read_text().split("\n")[:3] == [f"2\t{HYPS['u3'][0]}", f"0\t{HYPS['u1'][0]}", f"1\t{HYPS['u2'][0]}"]
    assert "WER (jiwer) over 3 lists" in err  # the T- lines are references


# ---- best, WER, grid --------------------------------------------------------------------------------------------
def test_best_uses_existing_plus_weighted_lm_plus_word_bonus(lm, model_path, tmp_path, capsys):
    src = write_tsv(tmp_path / "nbest.tsv")
    best = tmp_path / "best.txt"
    argv = ["rescore", src, "--path", model_path, "--best", str(best), "--no-progress-bar"]
    rc, _, _ = run([*argv, "--lm-weight", "0.3", "--word-bonus", "0.7"], capsys)
    assert rc == 0
    want: dict[str, tuple[float, str]] = {}
    for uid, hyp, am in rows():  # first row wins ties
        s = am + 0.3 * expected_lm(lm, hyp) + 0.7 * len(hyp.split())
        if uid not in want or s > want[uid][0]:
            want[uid] = (s, hyp)
    order = list(dict.fromkeys(u for u, _, _ in rows()))
    assert best.read_text() == "".join(f"{u}\t{want[u][1]}\n" for u in order)


def test_best_per_list_ties_go_to_the_first_row():
    list_of = np.array([1, 0, 1, 0, 1])
    score = np.array([2.0, 1.0, 2.0, 3.0, 1.0])
    assert best_per_list(list_of, score, 2).tolist() == [3, 0]


def test_grid_search_known_answer():
    """Each list's correct hypothesis wins only in a known weight range; the grid finds the smallest such point.
    list 0: correct iff w > 0.5; list 1: iff w > 1.525; list 2: iff w < 1 (so w > 1.525 costs its 1 error, fewer
    than list 1's 2); list 3 (5 vs 4 words): iff word bonus > 1.1. Answer: w = 1.6, bonus = 1.25, WER 1/20."""
    list_of = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    existing = np.array([-1.0, 0.0, -3.05, 0.0, 0.0, -2.0, -1.1, 0.0])
    lm = np.array([-2.0, -4.0, -1.0, -3.0, -5.0, -3.0, -1.0, -1.0])
    n_words = np.array([5, 5, 5, 5, 5, 5, 5, 4], dtype=float)
    errors = np.array([0, 1, 0, 2, 0, 1, 0, 1])
    res = grid_search(list_of, existing, lm, n_words, errors, 20, parse_grid("0:2:0.1"), parse_grid("-2:2:0.25"))
    assert (res.lm_weight, res.word_bonus) == (1.6, 1.25)
    assert res.wer == pytest.approx(1 / 20)
    assert res.table.shape == (21, 17) and res.table.min() == pytest.approx(1 / 20)


def test_word_errors_are_jiwers():
    refs = ["a b c d", "a b c d", "x y", "x y"]
    hyps = ["a b c d", "a c d e f", "y", "x q y"]
    errs = word_errors(refs, hyps)
    assert errs.tolist() == [round(jiwer.wer(r, h) * len(r.split())) for r, h in zip(refs, hyps)]
    assert errs.sum() / 12 == pytest.approx(jiwer.wer(refs, hyps))


def test_grid_search_and_wer_report_on_references(lm, model_path, tmp_path, capsys):
    """References in a TSV column: first-pass WER (the acoustic scores prefer wrong hypotheses) against the grid's
    best, which is the smallest LM weight at which every list picks what the independent LM scores say."""
    src = write_tsv(tmp_path / "nbest.tsv", refs=True)
    rc, _, err = run(
        ["rescore", src, "--path", model_path, "--reference", "ref", "--no-progress-bar"]
        + ["--lm-weight-grid", "0:3:0.5", "--word-bonus-grid", "0:4:1"],
        capsys,
    )
    assert rc == 0, err
    r = rows()
    errs = word_errors([REFS[u] for u, _, _ in r], [h for _, h, _ in r])
    list_of = np.array([list(HYPS).index(u) for u, _, _ in r])
    am, lms = np.array([a for _, _, a in r]), np.array([expected_lm(lm, h) for _, h, _ in r])
    nw = np.array([len(h.split()) for _, h, _ in r])
    nref = sum(len(x.split()) for x in REFS.values())
    wer_at = {
        (w, b): errs[best_per_list(list_of, am + w * lms + b * nw, 4)].sum() / nref
        for w in (0, 0.5, 1, 1.5, 2, 2.5, 3)
        for b in (0, 1, 2, 3, 4)
    }
    best_w, best_b = min(wer_at, key=lambda wb: (wer_at[wb], wb[0], wb[1]))
    first = jiwer.wer(list(REFS.values()), [HYPS[u][int(np.argmax([a for x, _, a in r if x == u]))] for u in HYPS])
    assert f"{100 * first:6.2f}%" in err.split("first pass")[1].split("\n")[0]
    line = err.split("best on the grid:")[1].split("\n")[0]
    assert f"--lm-weight {best_w:g} --word-bonus {best_b:g}" in line
    assert f"{100 * wer_at[best_w, best_b]:6.2f}%" in line
    assert wer_at[best_w, best_b] < first


def test_wer_report_counts_reference_words_as_jiwer_does(model_path, tmp_path, capsys):
    """A no-break space joins two words for jiwer (it splits on spaces) but not for ``str.split``: the report counts
    the reference words jiwer's way, so its figures are jiwer's (it used to stop on an internal assertion)."""
    refs = {"u1": "the\u00a0song was released", "u2": "he was born in\u00a0the city"}
    hyps = {"u1": ["the song was released", "the song was"], "u2": ["he was born in the city", "he born in the city"]}
    path = tmp_path / "nbsp.tsv"
    lines = ["#utt\ttext\tam\tref"]
    lines += [f"{u}\t{h}\t{-k}\t{refs[u]}" for u in hyps for k, h in enumerate(hyps[u])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, _, err = run(["rescore", str(path), "--path", model_path, "--reference", "ref", "--no-progress-bar"], capsys)
    assert rc == 0, err
    first = jiwer.wer(list(refs.values()), [hyps[u][0] for u in hyps])  # the first pass picks each first row
    n_ref = sum(len(jiwer.process_words(r, r).references[0]) for r in refs.values())
    assert n_ref == 8  # 3 + 5 (str.split: 4 + 6): the no-break spaces join words
    assert f"WER (jiwer) over 2 lists, {n_ref} reference words" in err
    assert f"{100 * first:6.2f}%" in err.split("first pass")[1].split("\n")[0]


def test_references_file(model_path, tmp_path, capsys):
    src = write_tsv(tmp_path / "nbest.tsv")
    refs = tmp_path / "refs.txt"
    refs.write_text("".join(f"{u}\t{r}\n" for u, r in REFS.items()), encoding="utf-8")
    rc, _, err = run(["rescore", src, "--path", model_path, "--references", str(refs), "--no-progress-bar"], capsys)
    n_words = sum(len(r.split()) for r in REFS.values())
    assert rc == 0 and f"WER (jiwer) over 4 lists, {n_words} reference words" in err


def test_moses_tokenizer_on_raw_hypotheses(model_path, tmp_path, capsys):
    path = tmp_path / "raw.tsv"
    texts = ["It cost 1,000 dollars.", "The state-of-the-art model (2019) won."]
    path.write_text("".join(f"u{i}\t{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    rc, out, _ = run(["rescore", str(path), "--path", model_path, "--tokenizer", "moses", "--no-progress-bar"], capsys)
    assert rc == 0
    moses = adaptive_lm.from_pretrained(model_path, tokenizer="moses")
    got = [float(r[2]) for r in read_output(out)[1]]
    assert got == pytest.approx([float(moses.score(t)["positional_scores"].double().sum()) for t in texts], abs=1e-5)


# ---- bad input: one line naming the file and line, exit code 2 --------------------------------------------------
BAD = [
    ("ragged", "#id\ttext\tam\nu1\tthe song\t-1\nu1\tthe\n", [], ":3: 2 tab-separated columns where the header"),
    ("empty hypothesis", "u1\tthe song\t-1\nu1\t \t-2\n", [], ":2: empty hypothesis"),
    ("unknown id column", "#id\ttext\tam\nu1\tthe\t-1\n", ["--id-column", "utt"], ":1: --id-column 'utt' is no col"),
    ("unknown score column", "#id\ttext\tam\nu1\tthe\t-1\n", ["--score-column", "ac"], ":1: --score-column 'ac'"),
    ("column out of range", "u1\tthe\t-1\n", ["--score-column", "7"], ":1: --score-column 7, but the rows have 3"),
    ("column 0", "u1\tthe\t-1\n", ["--text-column", "0"], ":1: --text-column 0: columns are numbered from 1 (1 to 3"),
    ("non-numeric score", "#id\ttext\tam\nu1\tthe\t-1\nu1\tthe song\tabc\n", [], ":3: score column 'am' is 'abc'"),
    ("nan score", "u1\tthe\t-1\nu1\tthe song\tnan\n", [], ":2: score column 'column3' is 'nan'"),
    ("fairseq score", "S-0\tx\nH-0\t-0.5\tthe song\nH-0\tfoo\tthe\n", [], ":3: the H- score is 'foo'"),
    ("fairseq empty", "H-0\t-0.5\tthe song\nH-0\t-1\t\n", [], ":2: empty hypothesis"),
    ("no hypotheses", "#id\ttext\n\n", [], ": no hypotheses"),
    ("reference differs", "#i\tt\tr\nu1\tthe\ta b\nu1\tthe song\ta c\n", ["--reference", "r"], ":3: reference of"),
    ("too long", "#i\tt\nu1\tthe\nu1\t" + "the " * 300 + "\n", [], ":3: a hypothesis of 300 tokens, more than the 255"),
]


@pytest.mark.parametrize("name,content,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(name, content, extra, message, model_path, tmp_path, capsys):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    rc, out, err = run(["rescore", str(path), "--path", model_path, "--no-progress-bar", *extra], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("adaptive-lm rescore: error: ")
    assert f"{path}{message}" in err if message.startswith(":") else message in err


def test_bad_references_file(model_path, tmp_path, capsys):
    src = write_tsv(tmp_path / "nbest.tsv")
    refs = tmp_path / "refs.txt"
    for content, message in (
        ("u1\tthe song\nu2\n", f"{refs}:2: 1 tab-separated columns, expected 2"),
        ("u1\ta\nu1\tb\n", f"{refs}:2: id 'u1' again (first at line 1)"),
        ("u1\ta\nu2\tb\nu3\tc\n", f"{src}:5: no reference for utterance 'u4'"),
        ("u1\ta\nu2\tb\nu3\tc\nu4\t \n", f"{refs}:4: empty reference for 'u4'"),
    ):
        refs.write_text(content, encoding="utf-8")
        rc, _, err = run(["rescore", src, "--path", model_path, "--references", str(refs)], capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--lm-weight-grid", "2:0:0.1"], "is not START:STOP:STEP"),
        (["--lm-weight", "-1"], "must be zero or positive"),
        (["--word-bonus", "inf"], "is not a finite number"),
        (["--best", "/no/such/folder/best.txt"], "does not exist"),
        (["--max-tokens", "0"], "must be a positive integer"),
    ],
)
def test_bad_flags_fail_at_parse_time(extra, message, model_path, tmp_path, capsys):
    src = write_tsv(tmp_path / "nbest.tsv")
    with pytest.raises(SystemExit) as e:
        main(["rescore", src, "--path", model_path, *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err


def test_bad_input_through_the_console_script_has_no_traceback(model_path, tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("u1\tthe song\t-1\nu1\tthe\n", encoding="utf-8")
    p = subprocess.run(
        [sys.executable, "-m", "adaptive_lm", "rescore", str(path), "--path", model_path],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (
        f"adaptive-lm rescore: error: {path}:2: 2 tab-separated columns where line 1 has 3 (ragged TSV)\n"
    )
    assert "Traceback" not in p.stderr


def test_frame_lays_out_inputs_targets_and_counts_as_the_hub():
    """``framing.frame`` on a batch with an empty sentence, one word and three words (start 0, pad 1, eos 2): inputs
    are ``<start> w1 .. w(n-1)`` (``score_eos``: through wn), targets ``w1 .. wn`` (then ``</s>``), right-padded."""
    from adaptive_lm.inference.framing import frame

    ids = [[], [7], [4, 5, 6]]
    src, tgt, n = frame(ids, 0, 1, 2)
    assert src.tolist() == [[0, 1, 1], [0, 1, 1], [0, 4, 5]]
    assert tgt.tolist() == [[1, 1, 1], [7, 1, 1], [4, 5, 6]]
    assert n.tolist() == [0, 1, 3]
    src, tgt, n = frame(ids, 0, 1, 2, score_eos=True)
    assert src.tolist() == [[0, 1, 1, 1], [0, 7, 1, 1], [0, 4, 5, 6]]
    assert tgt.tolist() == [[2, 1, 1, 1], [7, 2, 1, 1], [4, 5, 6, 2]]
    assert n.tolist() == [1, 2, 4] and src.dtype == tgt.dtype == n.dtype == torch.long


# ---- shared prefixes -------------------------------------------------------------------------------------------
def test_plan_reuses_the_longest_shared_prefix_of_an_earlier_hypothesis():
    """Framed sequences (start token 2): a hypothesis reuses min(L - 1, n) positions of the earliest sorted one it
    shares its longest common prefix (L tokens) with, if at least MIN_SHARED (or all of them: a duplicate)."""
    from adaptive_lm.inference.scoring import plan

    seqs = [
        [2, 5, 6, 7, 8, 9, 10],  # 0
        [2, 5, 6, 7, 8, 9, 11, 12],  # 1: shares 6 tokens with 0 -> 5 positions
        [2, 5, 6, 7, 8, 9, 11, 13],  # 2: shares 7 with 1 (6 with 0) -> 6 positions of 1
        [2, 5, 6, 7, 8, 9, 10],  # 3: a duplicate of 0 -> all 6 positions
        [2, 5, 6, 4],  # 4: shares 3 tokens -> 2 positions, fewer than MIN_SHARED: whole
        [2, 5, 6],  # 5: a prefix of 4 (2 positions, all of it): sorted before 4, so 4 is not its parent
        [2, 5, 6],  # 6: a duplicate of 5
    ]
    n = np.array([len(s) - 1 for s in seqs])
    order, parent, shared = plan(seqs, n, min_shared=4)
    assert order.tolist() == [5, 6, 4, 0, 3, 1, 2]
    assert parent.tolist() == [-1, 0, 1, 0, -1, -1, 5]
    assert shared.tolist() == [0, 5, 6, 6, 0, 0, 2]


def test_plan_equals_pairwise_common_prefixes_and_one_long_hypothesis_costs_its_length():
    """The common prefix of each sorted hypothesis with the previous one, compared pair by pair in flat arrays, is the
    brute-force one on random lists (duplicates, prefixes, empty ones), and one 200,000-token hypothesis among 4,095
    short ones plans with memory of the order of the tokens (the padded (rows, longest) matrix of the earlier plan
    took 6.5 GB for this input)."""
    import tracemalloc

    from adaptive_lm.inference.scoring import plan

    rng = np.random.default_rng(0)
    for trial in range(30):
        base = rng.integers(3, 9, size=12).tolist()
        seqs = [[2] + base[: int(rng.integers(0, 13))] + rng.integers(3, 9, size=int(rng.integers(0, 4))).tolist()
                for _ in range(int(rng.integers(1, 40)))]  # fmt: skip
        n = np.array([len(x) - 1 for x in seqs])
        order, parent, shared = plan(seqs, n, min_shared=1)
        srt = [seqs[i] for i in order.tolist()]
        assert srt == sorted(seqs)
        for a in range(1, len(srt)):
            lcps = [next((j for j, (x, y) in enumerate(zip(srt[b], srt[a])) if x != y), min(len(srt[b]), len(srt[a])))
                    for b in range(a)]  # fmt: skip
            best = max(lcps)  # the longest common prefix with any earlier sorted hypothesis
            i, s_ = int(order[a]), min(best - 1, int(n[order[a]]))
            if s_ > 0:
                assert shared[i] == s_ and parent[i] == order[lcps.index(best)], trial  # the earliest sharing it
            else:
                assert shared[i] == 0 and parent[i] == -1, trial
    seqs = [[2, 7, 8, 9, 10, 11, int(x)] for x in rng.integers(3, 1000, size=4095)] + [[2] + [5] * 200_000]
    n = np.array([len(x) - 1 for x in seqs])
    tracemalloc.start()
    plan(seqs, n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 60 * 8 * sum(len(x) for x in seqs)  # a few flat int64 arrays of the tokens, not rows x 200,000


def test_bad_scoring_inputs_are_one_line_user_errors(lm):
    """A batch size below one, a word id outside the vocabulary (as the last word it would be a target only, scored
    silently), and a sentence longer than a learned position table fail with one line naming the problem; the
    kNN path of ``score`` checks the same."""
    from adaptive_lm.core.errors import UserError
    from adaptive_lm.inference.scoring import position_scores

    ids = [[10, 11, 12, 13, 14, 15], [10, 11, 12, 13, 14, 16]]
    for bad in (0, -1):
        with pytest.raises(UserError, match="positive number of sentences"):
            position_scores(lm, ids, max_sentences=bad)
        with pytest.raises(UserError, match="positive number of sentences"):
            lm.score(["the song", "the"], batch_size=bad)
    V = lm.model.cfg.vocab_size
    for share in (True, False):
        with pytest.raises(UserError, match=rf"sentence 2: 1 word ids outside the model's vocabulary \[0, {V}\)"):
            sentence_logprobs(lm, [[10, 11], [5, V]], share_prefixes=share)
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        sentence_logprobs(lm, [[-1, 5]])
    for model in (lm, adaptive_lm.from_pretrained(Path(__file__).parent / "generation" / "models" / "spm", "model.pt")):
        limit = model.cfg.max_target_positions  # sinusoidal (the fixture) and learned positions (spm) alike
        sentence_logprobs(model, [[5] * (limit - 1)], score_eos=True)  # with its </s>: the limit
        for share in (True, False):  # as fairseq's hub: words + </s> > max positions is refused
            message = rf"sentence 2 has {limit} tokens: with its </s> more than the model's {limit} positions"
            with pytest.raises(UserError, match=message):
                sentence_logprobs(model, [[5], [5] * limit], share_prefixes=share)
        with pytest.raises(UserError, match=message.replace("sentence 2", "sentence 1")):
            model.score([" ".join([model.dictionary[5]] * limit)])


def nbest_with_shared_prefixes(lm, lists=40, per=8, seed=0):
    """Word-id n-best lists made like bench_rescore's: edits of a random sentence (substitution, deletion,
    insertion), duplicates and prefixes included, lengths 0-30."""
    rng = np.random.default_rng(seed)
    V = len(lm.dictionary)
    out = []
    for _ in range(lists):
        base = rng.integers(4, V, size=int(rng.integers(1, 30))).tolist()
        for _ in range(per):
            h = list(base)
            for _ in range(int(rng.integers(0, 3))):
                i = int(rng.integers(0, len(h) + 1))
                op = rng.random()
                if op < 0.4 and i < len(h):
                    h[i] = int(rng.integers(4, V))
                elif op < 0.6 and i < len(h):
                    del h[i]
                elif op < 0.8:
                    h.insert(i, int(rng.integers(4, V)))
                else:
                    h = h[:i]
            out.append(h)
    return out


@pytest.mark.parametrize("score_eos", [False, True])
@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("cache_bytes", [None, 512 << 10])
def test_shared_prefixes_score_as_whole_hypotheses(lm, monkeypatch, score_eos, plain, cache_bytes):
    """Each hypothesis computed after the prefix it shares with an earlier one scores what it scores computed whole,
    within the fp32 rounding of other batch shapes (sums of up to 31 position scores); through our kernels and the
    plain ones, with segments cut by the key/value budget (512 KB: about 20 segments), and the model really runs on
    fewer positions."""
    from adaptive_lm.core.kernels import plain_kernels
    from adaptive_lm.inference import scoring

    if cache_bytes is not None:
        monkeypatch.setattr(scoring, "CACHE_BYTES", cache_bytes)
    ids = nbest_with_shared_prefixes(lm)
    fed = []
    hook = lm.model.register_forward_pre_hook(lambda m, args: fed.append(int((args[0] != lm.dictionary.pad()).sum())))
    try:
        with plain_kernels(plain):
            whole = sentence_logprobs(lm, ids, score_eos=score_eos, max_tokens=256, share_prefixes=False)
            n_whole, fed[:] = sum(fed), []
            shared = sentence_logprobs(lm, ids, score_eos=score_eos, max_tokens=256)
            n_shared = sum(fed)
            few = sentence_logprobs(lm, ids, score_eos=score_eos, max_tokens=256, max_sentences=3)
    finally:
        hook.remove()
    np.testing.assert_allclose(shared, whole, atol=2e-5, rtol=1e-6)
    np.testing.assert_allclose(few, whole, atol=2e-5, rtol=1e-6)
    assert n_shared < 0.6 * n_whole  # about half of the positions are shared here


def test_suffix_batches_trade_padding_for_fewer_batches():
    """Every index once, at most max_tokens padded positions per batch (or one row), widest first; without a cost per
    batch nothing is padded, and the dearer a batch, the fewer batches and the more padding (the optimum of padding
    + cost x batches moves that way)."""
    from adaptive_lm.inference.scoring import suffix_batches

    widths = np.random.default_rng(0).integers(1, 40, size=500)
    seen = []
    for per_batch in (0.0, 10.0, 50.0, 1e9):
        batches = suffix_batches(widths, 256, per_batch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(widths)))
        tops = [int(widths[b].max()) for b in batches]
        assert tops == sorted(tops, reverse=True)
        assert all(len(b) * widths[b].max() <= 256 or len(b) == 1 for b in batches)
        padding = sum(int(widths[b].max()) * len(b) - int(widths[b].sum()) for b in batches)
        seen.append((len(batches), padding))
    assert seen[0][1] == 0
    assert [b for b, _ in seen] == sorted((b for b, _ in seen), reverse=True) and seen[-1][0] < seen[0][0]
    assert [p for _, p in seen] == sorted(p for _, p in seen) and seen[-1][1] > 0


def test_hypotheses_sharing_little_are_scored_whole(lm):
    """Below MIN_SAVED of shared positions every sentence is scored whole (the model fed each one's positions in
    full): sentences of running text share about 1% of their positions, and the waves would cost more than they
    save."""
    from adaptive_lm.inference.scoring import MIN_SAVED, plan

    rng = np.random.default_rng(1)
    ids = [rng.integers(4, len(lm.dictionary), size=int(rng.integers(5, 30))).tolist() for _ in range(50)]
    ids += [ids[0][:4] + [5, 6, 7]]  # one shares 4 positions: planned, but too little overall
    seqs = [[2, *x] for x in ids]
    _, parent, shared = plan(seqs, np.array([len(x) for x in ids]))
    assert (parent >= 0).sum() == 1 and shared.sum() == 4 < MIN_SAVED * sum(len(x) for x in ids)
    fed = []
    hook = lm.model.register_forward_pre_hook(lambda m, args: fed.append(int((args[0] != lm.dictionary.pad()).sum())))
    try:
        sentence_logprobs(lm, ids)
    finally:
        hook.remove()
    assert sum(fed) == sum(len(x) for x in ids)  # <start> + all but the last word of each: its positions


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # wiki103's shape: pre-LN, adaptive input and softmax, sinusoidal positions
        dict(decoder_normalize_before=False),  # post-LN (fairseq 0.12's plain transformer_lm)
        dict(decoder_learned_pos=True, layernorm_embedding=True),
        dict(no_token_positional_embeddings=True, no_scale_embedding=True),
        dict(scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=True),  # NormFormer
        dict(PLAIN_OUTPUT_LAYER, activation_fn="gelu"),
    ],
)
def test_shared_prefixes_equal_whole_scores_across_model_configurations(overrides):
    """Differential over model kinds, float64 random weights: every position of a hypothesis computed after a
    shared prefix (positions, layer norms, embeddings, output layer) equals the whole computation to float64
    rounding; the model ran on fewer positions."""
    from adaptive_lm import build_model
    from adaptive_lm.core.dictionary import Dictionary
    from adaptive_lm.inference.hub import LanguageModel

    d = Dictionary.from_counts({f"w{i}": 100 - i for i in range(60)})
    torch.manual_seed(0)
    lm = LanguageModel(build_model("tiny", len(d), **overrides).double().eval(), d)
    ids = [h[:40] for h in nbest_with_shared_prefixes(lm, lists=12, per=6, seed=3)]  # the preset has 64 positions
    fed = []
    hook = lm.model.register_forward_pre_hook(lambda m, args: fed.append(int(args[0].numel())))
    try:
        whole = sentence_logprobs(lm, ids, max_tokens=128, share_prefixes=False)
        n_whole, fed[:] = sum(fed), []
        shared = sentence_logprobs(lm, ids, max_tokens=128)
    finally:
        hook.remove()
    np.testing.assert_allclose(shared, whole, atol=1e-9, rtol=0)
    assert sum(fed) < 0.7 * n_whole


def test_languagemodel_score_of_a_list_shares_prefixes_and_keeps_input_order(lm):
    """``LanguageModel.score(list)`` runs the same position scorer (length-sorted batches, shared prefixes): each
    sentence's positional scores equal those of scoring it alone (one sentence, nothing shared) within the fp32
    rounding of other batch shapes, in input order, with its tokens and mean; ``batch_size`` caps the rows of every
    model call; the model ran on fewer positions than the sentences have."""
    ids = nbest_with_shared_prefixes(lm, lists=10, per=5, seed=5)
    texts = [" ".join(lm.dictionary[i] for i in x) for x in ids]
    alone = [lm.score(t)["positional_scores"] for t in texts]
    fed: list[tuple[int, int]] = []  # (rows, real positions) of every model call
    pad = lm.dictionary.pad()
    hook = lm.model.register_forward_pre_hook(lambda m, a: fed.append((a[0].shape[0], int((a[0] != pad).sum()))))
    try:
        got = lm.score(texts)
        n_fed = sum(n for _, n in fed)
        fed.clear()
        capped = lm.score(texts, batch_size=3)
    finally:
        hook.remove()
    assert n_fed < 0.7 * sum(len(x) for x in ids) and max(b for b, _ in fed) <= 3
    for x, a, g, c in zip(ids, alone, got, capped):
        assert g["tokens"].tolist() == x and len(g["positional_scores"]) == len(x)
        torch.testing.assert_close(g["positional_scores"], a, atol=1e-5, rtol=0)  # the per-token fp32 bound
        torch.testing.assert_close(c["positional_scores"], a, atol=1e-5, rtol=0)
        assert g["score"] == pytest.approx(float(g["positional_scores"].mean()) if len(x) else 0.0)


def test_score_command_records_in_chunks_equal_per_line_scores(lm, model_path, tmp_path, monkeypatch, capsys):
    """``adaptive-lm score`` scores its lines ``SCORE_CHUNK_LINES`` at a time (here 7: several chunks) through
    ``LanguageModel.score`` (length-sorted, shared prefixes): one record per line, in input order, each line's
    log-probs those of scoring it alone (within the per-token fp32 bound, then rounded to 6 decimals), with and
    without ``--batch-size``."""
    from adaptive_lm.inference import hub

    monkeypatch.setattr(hub, "SCORE_CHUNK_LINES", 7)
    texts = [h for _, h, _ in rows()] + ["", "the"]
    (tmp_path / "s.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    for extra in ([], ["--batch-size", "2"]):
        assert main(["score", str(tmp_path / "s.txt"), "--path", model_path, *extra]) == 0
        got = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
        assert [r["text"] for r in got] == texts
        for r, t in zip(got, texts):
            want = lm.score(t)["positional_scores"].tolist()
            assert len(r["logprobs"]) == len(want) and all(
                abs(a - b) <= 1e-5 + 5e-7 for a, b in zip(r["logprobs"], want)
            )
