"""Evaluation, scoring and generation: fairseq's numbers and semantics."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import adaptive_lm
from adaptive_lm.cli import main
from adaptive_lm.core.data import IndexedWriter, LMDataset, block_spans
from adaptive_lm.core.errors import UserError
from adaptive_lm.inference.evaluate import EvalConfig, context_windows, evaluate, summary_lines

# fairseq-eval-lm on the fixture: float64 sums of fairseq's per-token scores (reference/valid_logprobs.npz, printed by
# tests/fixtures/make_fairseq_tiny.sh); its own float32 sums print the lines in reference/eval_cw{0,128}.log
FAIRSEQ = {0: (20_897, 7.012615950995327, 129.12423136536324), 128: (20_897, 7.00868601452198, 128.77297244639897)}


def fairseq_printed(path) -> tuple[int, float, float]:
    """(tokens, loss, perplexity) from fairseq-eval-lm's two summary lines."""
    lines = path.read_text().splitlines()
    loss, ppl = (float(x) for x in re.findall(r"[\d.]+", lines[1].split(":", 1)[1]))
    return int(lines[0].split()[1].replace(",", "")), loss, ppl


@pytest.fixture(scope="module")
def tiny_lm():
    from conftest import FAIRSEQ_TINY

    return adaptive_lm.from_pretrained(FAIRSEQ_TINY / "model" / "checkpoint_last.pt")


@pytest.mark.parametrize("cw", [0, 128])
def test_eval_matches_fairseq_eval_lm(tiny_lm, fixture_dir, cw):
    cfg = EvalConfig(
        data=str(fixture_dir / "data-bin"), gen_subset="valid", context_window=cw, batch_size=8, softmax_batch=1000
    )
    res = evaluate(tiny_lm, cfg, keep_scores=True)
    n, loss, ppl = FAIRSEQ[cw]
    assert res.n_tokens == n
    assert abs(res.loss_base2 - loss) < 2e-6 and abs(res.ppl - ppl) < 2e-3
    full = np.load(fixture_dir / "reference" / "valid_logprobs.npz")[f"logprobs_cw{cw}_fairseq_pipeline_full"]
    assert np.abs(res.scores - full).max() < 1e-5  # every token, in stream order, equals fairseq's score
    assert summary_lines(res)[1].startswith("Loss (base 2): ")
    printed_n, printed_loss, _ = fairseq_printed(fixture_dir / "reference" / f"eval_cw{cw}.log")
    assert printed_n == n and abs(res.loss_base2 - printed_loss) <= 5e-5 + 1e-5  # 4 decimals (+ its float32 sum)


@pytest.mark.parametrize("impl", ["raw", None])
def test_raw_text_evaluates_as_fairseq_eval_lm_reads_it(tiny_lm, fixture_dir, tmp_path, impl):
    """fairseq's ``--dataset-impl raw``: the split is a text file (data/valid, no .idx), encoded as it is loaded;
    without the flag fairseq infers it from the files. The fixture's valid split as text gives fairseq's numbers
    (reference/eval_raw_cw*.log, tests/fixtures/make_fairseq_raw.sh) and every token's fairseq score."""
    from conftest import decoded_text

    (tmp_path / "valid").write_text(decoded_text(fixture_dir / "data-bin", "valid", 400), encoding="utf-8")
    (tmp_path / "dict.txt").write_bytes((fixture_dir / "data-bin" / "dict.txt").read_bytes())
    for cw in (0, 128):
        cfg = EvalConfig(data=str(tmp_path), gen_subset="valid", context_window=cw, batch_size=8, dataset_impl=impl)
        res = evaluate(tiny_lm, cfg, keep_scores=True)
        n, loss, _ = FAIRSEQ[cw]
        assert res.n_tokens == n and abs(res.loss_base2 - loss) < 2e-6
        full = np.load(fixture_dir / "reference" / "valid_logprobs.npz")[f"logprobs_cw{cw}_fairseq_pipeline_full"]
        assert np.abs(res.scores - full).max() < 1e-5
        printed_n, printed_loss, _ = fairseq_printed(fixture_dir / "reference" / f"eval_raw_cw{cw}.log")
        assert printed_n == n and abs(res.loss_base2 - printed_loss) <= 5e-5 + 1e-5
    with pytest.raises(UserError, match=r"with --dataset-impl raw the split is a text file named test"):
        evaluate(tiny_lm, EvalConfig(data=str(tmp_path), gen_subset="test", dataset_impl="raw"))


@pytest.mark.parametrize("mode", ["eos", "complete"])
def test_blocks_longer_than_the_model_are_skipped_as_fairseq_eval_lm_skips_them(tiny_lm, fixture_dir, mode):
    """eval-lm's batches ignore invalid inputs: with whole lines as blocks, the 8 valid lines longer than the model's
    256 positions are left out (with a warning naming them), the rest scored as fairseq scores them (its logs:
    tests/fixtures/make_fairseq_tiny.sh). Ours had scored them (a learned table would have failed)."""
    warning, evaluated, loss_line = (fixture_dir / "reference" / f"eval_{mode}.log").read_text().splitlines()
    cfg = EvalConfig(data=str(fixture_dir / "data-bin"), gen_subset="valid", sample_break_mode=mode, batch_size=8,
                     tokens_per_sample=256)  # fmt: skip
    res = evaluate(tiny_lm, cfg)
    assert res.n_tokens == int(evaluated.split()[1].replace(",", "")) == 18_660
    assert abs(res.loss_base2 - float(re.findall(r"[\d.]+", loss_line)[1])) <= 5e-5 + 1e-5  # printed to 4 decimals
    skipped = int(warning.split()[0])
    assert f"warning: {skipped} blocks longer than the model's 256 positions are skipped" in res.plan


def test_windows_past_sinusoidal_positions_run_as_in_fairseq(tiny_lm, fixture_dir):
    """A sinusoidal table extends past the trained length (fairseq's too): --tokens-per-sample 320 with a window of
    128 scores blocks of 192 after up to 128 tokens of context, inputs of 320 positions against the model's 256.
    fairseq runs it (it checks the 192-token blocks against the 256 positions); ours had refused it."""
    cfg = EvalConfig(data=str(fixture_dir / "data-bin"), gen_subset="valid", context_window=128, batch_size=8,
                     tokens_per_sample=320)  # fmt: skip
    res = evaluate(tiny_lm, cfg)
    n, loss, ppl = fairseq_printed(fixture_dir / "reference" / "eval_tps320_cw128.log")
    assert res.n_tokens == n == 20_897 and "warning" not in res.plan
    assert abs(res.loss_base2 - loss) <= 5e-5 + 1e-5 and abs(res.ppl - ppl) <= 5e-3 + 2e-3  # printed to 4 / 2 decimals


@pytest.mark.parametrize("mode", ["none", "complete", "complete_doc", "eos"])
@pytest.mark.parametrize("block,cw", [(7, 0), (5, 3), (4, 9), (1, 3)])
def test_every_token_scored_exactly_once_with_its_context(mode, block, cw):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=40)
    stream = rng.integers(4, 50, size=int(sizes.sum()))
    stream[np.cumsum(sizes) - 1] = 2  # every line ends in </s>
    ds = LMDataset(stream, block_spans(sizes, block, mode), eos=2, pad=1)
    scored = []
    for inp, tgt, start in context_windows(ds, cw, block):
        assert start <= cw and len(inp) - start == len(tgt)
        s = ds.spans[len(scored)]
        scored.append(s)
        if mode == "none":  # contiguous context: the input is exactly the stream shifted by one
            x = np.concatenate([[2], stream[:-1]])
            assert inp.tolist() == x[s[0] - start : s[1]].tolist()
    positions = np.concatenate([np.arange(a, b) for a, b in scored])
    if mode in ("none", "complete", "eos"):
        assert positions.tolist() == list(range(len(stream)))  # each token once, in order
    else:
        assert len(set(positions.tolist())) == len(positions)


def test_window_at_or_above_block_is_refused(tiny_lm, fixture_dir):
    with pytest.raises(UserError, match="--context-window 256 must be smaller"):
        evaluate(tiny_lm, EvalConfig(data=str(fixture_dir / "data-bin"), gen_subset="valid", context_window=256))


def test_dictionary_mismatch_is_explained(tiny_lm, tmp_path):
    from adaptive_lm.core.dictionary import Dictionary

    d = Dictionary.from_counts({"a": 2, "b": 1})
    d.save(tmp_path / "dict.txt")
    with pytest.raises(UserError, match="first difference at id 4"):
        evaluate(tiny_lm, EvalConfig(data=str(tmp_path), gen_subset="valid"))


def test_score_eos_sums_to_fairseq_eval_lm_with_a_block_per_line(tiny_lm, fixture_dir, tmp_path, capsys):
    """``score(..., score_eos=True)`` and ``adaptive-lm score --score-eos`` score each line's words and its own
    ``</s>`` from a ``</s>`` context: what fairseq-eval-lm ``--sample-break-mode eos`` scores per line (blank lines
    too: a lone ``</s>``). Over the fixture's valid split, the lines that fit the model's 256 positions give its
    18,660 tokens and printed loss (reference/eval_eos.log); without the ``</s>`` the count is short by a line each."""
    from adaptive_lm.core.data import IndexedDataset
    from conftest import decoded_text

    n_lines = len(IndexedDataset(fixture_dir / "data-bin" / "valid"))
    lines = [x.strip() for x in decoded_text(fixture_dir / "data-bin", "valid", n_lines).splitlines()]
    fits = [x for x in lines if len(x.split()) + 1 <= 256]  # eval-lm skips the 8 longer blocks
    _, evaluated, loss_line = (fixture_dir / "reference" / "eval_eos.log").read_text().splitlines()
    tokens, loss = int(evaluated.split()[1].replace(",", "")), float(re.findall(r"[\d.]+", loss_line)[1])
    scores = [r["positional_scores"] for r in tiny_lm.score(fits, score_eos=True)]
    assert sum(len(s) for s in scores) == tokens == 18_660 and len(fits) == n_lines - 8
    total = sum(float(s.double().sum()) for s in scores)
    assert abs(-total / tokens / math.log(2) - loss) <= 5e-5 + 1e-5  # printed to 4 decimals
    assert sum(len(r["positional_scores"]) for r in tiny_lm.score(fits)) == tokens - len(fits)

    text = tmp_path / "valid.txt"  # the command line: the same numbers, line by line (the first 300 lines)
    text.write_text("\n".join(fits[:300]) + "\n", encoding="utf-8")
    assert main(["score", str(text), "--path", str(fixture_dir / "model" / "checkpoint_last.pt"), "--score-eos"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [len(r["logprobs"]) for r in rows] == [len(s) for s in scores[:300]] and rows[0]["tokens"][-1] == "</s>"
    assert max(abs(r["sum"] - float(s.sum())) for r, s in zip(rows, scores)) < 1e-4


def test_score_has_fairseq_hub_semantics(tiny_lm):
    r = tiny_lm.score("the game was played")
    assert len(r["positional_scores"]) == 4  # one per word; the final </s> is not scored
    ids = tiny_lm.encode("the game was played")
    assert int(ids[-1]) == 2
    src = torch.tensor([[2] + ids[:-1].tolist()])
    with torch.no_grad():
        full = tiny_lm.model.log_probs(src)[0]
    expected = full[torch.arange(4), ids[:-1]]
    torch.testing.assert_close(r["positional_scores"], expected, atol=1e-5, rtol=0)
    batch = tiny_lm.score(["the game was played", "a"])
    torch.testing.assert_close(batch[0]["positional_scores"], r["positional_scores"], atol=1e-5, rtol=0)
    assert tiny_lm.decode(ids) == "the game was played"


def test_cached_generation_equals_uncached_and_costs_one_position(tiny_lm):
    p = [tiny_lm.encode("the game was")]
    a = tiny_lm.generate(p, beam=1, max_len_b=30, min_len=30, use_cache=True)[0][0]
    b = tiny_lm.generate(p, beam=1, max_len_b=30, min_len=30, use_cache=False)[0][0]
    assert torch.equal(a["tokens"], b["tokens"])
    torch.testing.assert_close(a["positional_scores"], b["positional_scores"], atol=1e-4, rtol=0)
    assert len(a["tokens"]) == 31 and int(a["tokens"][-1]) == 2  # max length counts the prompt; </s> at the end
    # cache: the per-layer keys hold exactly one entry per position seen
    model = tiny_lm.model
    cache = model.new_cache()
    toks = torch.tensor([[2, 5, 6, 7]])
    model(toks, cache=cache)
    model(torch.tensor([[8]]), cache=cache, positions=torch.tensor([[6]]))
    assert cache[0]["k"].shape[2] == 5
    with torch.no_grad():
        full = model(torch.tensor([[2, 5, 6, 7, 8]]))
        inc = model(torch.tensor([[9]]), cache=cache, positions=torch.tensor([[7]]))
        ref = model(torch.tensor([[2, 5, 6, 7, 8, 9]]))
    torch.testing.assert_close(inc[0, -1], ref[0, -1], atol=1e-5, rtol=0)
    assert full.shape == (1, 5, 64)


def test_sampling_options_and_unk_suppression(tiny_lm):
    s1 = tiny_lm.sample("the", sampling=True, sampling_topk=5, seed=3, max_len_b=15)
    s2 = tiny_lm.sample("the", sampling=True, sampling_topk=5, seed=3, max_len_b=15)
    assert s1 == s2 and s1.startswith("the")
    out = tiny_lm.sample(["the", "in the"], sampling=True, sampling_topp=0.9, seed=1, max_len_b=15, unkpen=1e9)
    assert isinstance(out, list) and len(out) == 2 and all("<unk>" not in o for o in out)
    beams = tiny_lm.generate([tiny_lm.encode("the")], beam=4, nbest=3, max_len_b=10)[0]
    assert len(beams) == 3 and beams[0]["score"] >= beams[1]["score"] >= beams[2]["score"]
    feats = tiny_lm.features("the game", all_layers=True)
    assert len(feats) == 2 + 2 and feats[-1].shape == (3, 64)


def test_cli_eval_score_generate(fixture_dir, tmp_path, capsys):
    path = str(fixture_dir / "model" / "checkpoint_last.pt")
    assert (
        main(
            [
                "eval",
                str(fixture_dir / "data-bin"),
                "--path",
                path,
                "--gen-subset",
                "valid",
                "--cpu",
                "--batch-size",
                "8",
                "--context-window",
                "128",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("Evaluated 20,897 tokens in ") and out[-1] == "Loss (base 2): 7.0087, Perplexity: 128.77"
    (tmp_path / "s.txt").write_text("the game\nhello world .\n")
    assert main(["score", str(tmp_path / "s.txt"), "--path", path]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and len(rows[1]["logprobs"]) == 3 and abs(rows[1]["sum"] - sum(rows[1]["logprobs"])) < 1e-4
    assert main(["score", str(tmp_path / "s.txt"), "--path", path, "--base2"]) == 0  # bits: ln p / ln 2
    bits = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    for r, b in zip(rows, bits, strict=True):
        assert b["tokens"] == r["tokens"] and b["ppl"] == r["ppl"] and abs(b["mean"] * math.log(2) - r["mean"]) < 1e-9
        assert all(abs(x * math.log(2) - y) < 2e-6 for x, y in zip(b["logprobs"], r["logprobs"], strict=True))
    assert main(["generate", "--path", path, "--prompt", "the", "--max-len-b", "8", "--beam", "2"]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_a_bare_checkpoint_evaluates_with_the_datas_dictionary(fixture_dir, tmp_path, capsys):
    """fairseq-eval-lm takes the dictionary from the data folder; a checkpoint copied alone (no dict.txt beside it)
    had failed with 'no dict.txt found'."""
    shutil.copy(fixture_dir / "model" / "checkpoint_last.pt", tmp_path / "alone.pt")
    args = ["eval", str(fixture_dir / "data-bin"), "--path", str(tmp_path / "alone.pt"), "--gen-subset", "valid",
            "--cpu", "--batch-size", "8"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "Loss (base 2): 7.0126, Perplexity: 129.12"


def test_a_checkpoint_stored_in_fp16_runs_in_fp32_as_fairseq(fixture_dir, tmp_path):
    """fairseq copies the stored weights into its fp32 model; ours had kept a checkpoint's fp16 weights and run in
    fp16 (ln p off by 1e-2, silently). An explicit dtype still decides."""
    source = fixture_dir / "model" / "checkpoint_last.pt"
    ck = torch.load(source, weights_only=True)
    ck["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
    (tmp_path / "m").mkdir()
    torch.save(ck, tmp_path / "m" / "checkpoint.pt")
    shutil.copy(fixture_dir / "model" / "dict.txt", tmp_path / "m" / "dict.txt")
    lm = adaptive_lm.from_pretrained(tmp_path / "m" / "checkpoint.pt")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    ref = adaptive_lm.from_pretrained(source)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.copy_(p.half().float())  # the same fp32 values the stored halves give
    got, want = lm.score("the game was released in"), ref.score("the game was released in")
    assert torch.equal(got["positional_scores"], want["positional_scores"])
    half = adaptive_lm.from_pretrained(tmp_path / "m" / "checkpoint.pt", dtype=torch.float16)
    assert {p.dtype for p in half.model.parameters()} == {torch.float16}


def test_post_ln_fairseq_checkpoint_on_every_entry_point(fixture_dir, tmp_path):
    """A post-LN model made by ``fairseq-train --arch transformer_lm`` (tests/fixtures/fairseq_postln): loaded post-LN
    from its stored cfg, evaluated to fairseq-eval-lm's numbers, scored, generated from (the cache changes nothing)
    and converted both ways without a change."""
    from pathlib import Path

    from adaptive_lm.inference.convert import convert

    postln = Path(__file__).parent / "fixtures" / "fairseq_postln"
    lm = adaptive_lm.from_pretrained(postln / "checkpoint.pt")
    assert not lm.cfg.decoder_normalize_before and lm.model.layer_norm is None
    for cw in (0, 128):
        res = evaluate(lm, EvalConfig(data=str(fixture_dir / "data-bin"), gen_subset="valid", context_window=cw,
                                      batch_size=8, progress=False))  # fmt: skip
        n, loss, ppl = fairseq_printed(postln / f"eval_cw{cw}.log")
        assert res.n_tokens == n == 20_897
        assert abs(res.loss_base2 - loss) <= 5e-5 + 1e-5  # fairseq prints 4 decimals (+ its float32 sum)
        assert abs(res.ppl - ppl) <= 5e-3 + ppl * 1e-5 * math.log(2)
    x = torch.tensor([[2, 5, 30, 4, 11, 3, 40, 9]])
    with torch.no_grad():
        ref = lm.model.log_probs(x)
    r = lm.score("the game was played")
    assert len(r["positional_scores"]) == 4 and torch.isfinite(r["positional_scores"]).all()
    a = lm.generate([lm.encode("the game")], beam=2, max_len_b=10, use_cache=True)[0][0]["tokens"]
    b = lm.generate([lm.encode("the game")], beam=2, max_len_b=10, use_cache=False)[0][0]["tokens"]
    assert torch.equal(a, b)
    folder = convert(str(postln / "checkpoint.pt"), str(tmp_path / "folder"))
    back = convert(str(folder), str(tmp_path / "fs" / "model.pt"), to="fairseq")
    for path in (folder, back):
        other = adaptive_lm.from_pretrained(path)
        assert not other.cfg.decoder_normalize_before
        with torch.no_grad():
            torch.testing.assert_close(other.model.log_probs(x), ref, atol=1e-6, rtol=0)


# fairseq-eval-lm's per-word outputs, its subword merging and its token count, recorded by
# tests/fixtures/make_fairseq_eval_words.sh: (log, model, data, flags)
EVAL_WORDS = Path(__file__).parent / "fixtures" / "eval_words"
WORDS = ["--tokens-per-sample", "64", "--output-word-probs", "--output-word-stats", "--post-process", "@@ "]
EVAL_WORDS_CASES = {
    "pieces_cw0.log": ("tiny", "pieces", [*WORDS, "--batch-size", "3"]),
    "pieces_cw16_eos.log": (
        "tiny",
        "pieces",
        [*WORDS, "--max-tokens", "500", "--context-window", "16", "--sample-break-mode", "eos"],
    ),  # fmt: skip
    "pieces_complete_doc.log": ("tiny", "pieces", [*WORDS, "--batch-size", "3", "--sample-break-mode", "complete_doc"]),
    "keep_layer0.log": (
        "tiny",
        "pieces",
        ["--tokens-per-sample", "64", "--model-overrides", "{'decoder_layers_to_keep': '0'}"],
    ),  # fmt: skip
    "remove_bpe_bare.log": ("tiny", "pieces", ["--tokens-per-sample", "64", "--remove-bpe"]),
    "bos_complete.log": (
        "bos",
        "bos",
        ["--tokens-per-sample", "32", "--sample-break-mode", "complete", "--batch-size", "4"],
    ),  # fmt: skip
}
NUMBER = re.compile(r"-?\d+\.\d+")


def eval_words_data(tmp_path: Path, fixture_dir: Path, which: str) -> tuple[Path, Path]:
    """(data folder, dictionary): the split the script binarised and what fairseq read it with ("pieces": the tiny
    model's dictionary with "@@" after every third line's word, as the script's awk writes it)."""
    data = tmp_path / which
    data.mkdir()
    src = EVAL_WORDS / ("bos" if which == "bos" else "tiny")
    for f in ("valid.bin", "valid.idx"):
        shutil.copy(src / f, data)
    if which == "bos":
        shutil.copy(Path(__file__).parent / "generation" / "models" / "bos" / "dict.txt", data)
    else:
        lines = (fixture_dir / "model" / "dict.txt").read_text().splitlines()
        words = [ln.split(" ", 1) for ln in lines]
        (data / "dict.txt").write_text("".join(f"{w}{'@@' if i % 3 == 2 else ''} {c}\n" for i, (w, c) in
                                               enumerate(words)))  # fmt: skip
    return data, data / "dict.txt"


def word_output(lines: list[str]) -> list[str]:
    """Word-prob lines ("ID w [lp]\\t..."), word-stat lines (6 tab-separated fields), the two summary lines (timing
    dropped)."""
    keep = [ln for ln in lines if re.match(r"\d+ ", ln) or ln.count("\t") == 5 or ln.startswith(("Evaluated", "Loss"))]
    return [re.sub(r" in [\d.]+s \(.*tokens/s\)$", "", ln) for ln in keep]


@pytest.mark.parametrize("log", sorted(EVAL_WORDS_CASES))
def test_word_outputs_and_subword_merging_as_fairseq_eval_lm(fixture_dir, tmp_path, capsys, log):
    """--output-word-probs had no block ids and our own block order, --output-word-stats printed the 50 most frequent
    words in our own columns, --post-process / --remove-bpe were refused, and "Evaluated N tokens" left out the <s> of
    each block that fairseq counts. Now every line is fairseq's: the same words (pieces merged), ids, order and
    columns, the summary lines exactly; the numbers within 1e-5 relative (our per-token scores are fairseq's within
    float32 round-off of differently ordered sums, ~1e-6; the sums printed here add terms of one sign)."""
    model, which, flags = EVAL_WORDS_CASES[log]
    data, dictionary = eval_words_data(tmp_path, fixture_dir, which)
    path = fixture_dir / "model" / "checkpoint_last.pt"
    if model == "bos":
        path = Path(__file__).parent / "generation" / "models" / "bos" / "model.pt"
    args = ["eval", str(data), "--path", str(path), "--dict", str(dictionary), "--gen-subset", "valid", "--cpu"]
    assert main([*args, "--no-progress-bar", *flags]) == 0
    ours = word_output(capsys.readouterr().out.splitlines())
    theirs = word_output((EVAL_WORDS / log).read_text().splitlines())
    evaluated = [x for x in ours if x.startswith("Evaluated")]
    assert len(ours) == len(theirs) and evaluated == [x for x in theirs if x.startswith("Evaluated")] != []
    for a, b in zip(ours, theirs):
        assert NUMBER.sub("#", a) == NUMBER.sub("#", b), (a, b)
        for x, y in zip(NUMBER.findall(a), NUMBER.findall(b)):
            # the summary's loss and perplexity are printed to 4 and 2 decimals: two roundings of sums that differ
            # by float32 round-off may be one unit of the last digit apart
            unit = 10.0 ** -len(y.split(".")[1]) if b.startswith("Loss") else 0.0
            assert abs(float(x) - float(y)) <= unit + 1e-5 * max(1.0, abs(float(y))), (x, y, b)
    if log == "pieces_cw0.log":  # --quiet drops our plan and notes, not what was asked for (it dropped it all)
        assert main([*args, "--no-progress-bar", *flags, "--quiet"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert word_output(out) == ours and len(out) == len(ours)


def test_post_process_values_fairseq_does_not_implement_are_refused(fixture_dir, tmp_path, capsys):
    data, dictionary = eval_words_data(tmp_path, fixture_dir, "pieces")
    code = main(["eval", str(data), "--path", str(fixture_dir / "model" / "checkpoint_last.pt"), "--dict",
                 str(dictionary), "--gen-subset", "valid", "--post-process", "sentencepiece"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--post-process 'sentencepiece': fairseq-eval-lm 0.12 implements only 'subword_nmt' and '@@ '" in err[0]


def test_eval_of_a_split_with_ids_beyond_the_dictionary_is_one_line(tmp_path, fixture_dir, capsys):
    """A .bin binarised with a larger dictionary next to the model's dict.txt: eval had failed inside the model with
    a ValueError traceback; now the split is checked against the dictionary as training checks it."""
    (tmp_path / "dict.txt").write_bytes((fixture_dir / "data-bin" / "dict.txt").read_bytes())
    w = IndexedWriter(tmp_path / "valid", np.dtype(np.uint16))
    w.add_array(np.array([5, 7000, 2, 9, 2]), np.array([3, 2]))
    w.finalize()
    args = ["eval", str(tmp_path), "--path", str(fixture_dir / "model" / "checkpoint_last.pt"), "--gen-subset", "valid",
            "--cpu", "--batch-size", "8", "--tokens-per-sample", "256"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "valid.bin: token id 7000 is not in the dictionary (6000 symbols in" in err[0], err
