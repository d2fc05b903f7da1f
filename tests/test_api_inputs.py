"""The Python API on bad input (found by an audit of every entry point): a message that says what is wrong and what
to do, never an error from deep inside torch or a number without meaning; and the hub under ``torch.inference_mode``.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch

import adaptive_lm
from adaptive_lm import AdaptiveInput, AdaptiveSoftmax
from adaptive_lm.core.errors import UserError

MODELS = Path(__file__).parent / "generation" / "models"


@cache
def load(name: str = "wiki_tied", **kw) -> adaptive_lm.LanguageModel:
    return adaptive_lm.from_pretrained(MODELS / name, "model.pt", **kw)


def test_the_hub_works_under_inference_mode_and_on_a_model_loaded_there():
    """Packed weights are keyed by version counters, which inference tensors lack: score, generate and sample failed
    under ``torch.inference_mode`` (and for a model loaded inside it)."""
    lm = load()
    prompt = [lm.encode("the first")]
    want_score = lm.score(["the first of the", "in the city"])
    want_hyps = lm.generate(prompt, beam=2, max_len_b=6)
    with torch.inference_mode():
        got_score = lm.score(["the first of the", "in the city"])
        got_hyps = lm.generate(prompt, beam=2, max_len_b=6)
        assert lm.sample("the first", beam=2, max_len_b=6) == lm.decode(want_hyps[0][0]["tokens"])
        loaded = adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt")
    for g, w in zip(got_score, want_score):
        assert torch.equal(g["positional_scores"], w["positional_scores"])
    assert [h["tokens"].tolist() for h in got_hyps[0]] == [h["tokens"].tolist() for h in want_hyps[0]]
    # the same batch as want_score: a batch of one runs other GEMM shapes, whose rounding differs on some CPUs
    for g, w in zip(loaded.score(["the first of the", "in the city"]), want_score):
        assert torch.equal(g["positional_scores"], w["positional_scores"])


@pytest.mark.parametrize(
    "prompts,message",
    [
        (["the first"], "prompt 1 is text"),
        ([4, 42], "prompt 1 is int"),
        ([torch.tensor([4, 5000])], "word id 5000 outside the vocabulary"),
        ([[4, -3]], "word id -3 outside"),
        ([torch.tensor([4.7, 42.2])], "1-D torch.float32 tensor"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "a 2-D torch.int64 tensor"),
    ],
)
def test_generate_checks_its_prompts(prompts, message):
    with pytest.raises(UserError, match=message):
        load().generate(prompts, beam=2, max_len_b=4)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(nbest=-1), "nbest must be an integer of at least 1"),
        (dict(nbest=0), "nbest must be"),
        (dict(beam=0), "beam must be an integer of at least 1"),
        (dict(beam=2.5), "beam must be"),
        (dict(sampling=True, sampling_topk=0), r"sampling_topk must be an integer of at least 1 \(or -1: off\)"),
        (dict(sampling=True, sampling_topk=2.5), "sampling_topk must be"),
        (dict(sampling=True, sampling_topp=0.0), r"sampling_topp must be in \(0, 1\]"),
        (dict(sampling=True, sampling_topp=1.5), "sampling_topp must be in"),
        (dict(sampling=True, sampling_topp=math.nan), "sampling_topp must be a finite number"),
        (dict(unkpen=-math.inf), "unkpen must be a finite number"),
        (dict(lenpen=math.nan), "lenpen must be a finite number"),
        (dict(max_len_b=-1), "max_len_b must be an integer of at least 0"),
        (dict(seed=2**70), r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
        (dict(lenpen=1e30), r"lenpen 1e\+30 \(--lenpen\): length \*\* lenpen overflows"),  # had: OverflowError
        (dict(lenpen=-1e30), r"lenpen -1e\+30 \(--lenpen\)"),  # had: every score -inf
        (dict(max_len_b=2, min_len=5), r"min_len 5 \(--min-len\) exceeds the length limit 2 = .* W = 3 "),
    ],
)
def test_generation_options_are_checked_in_the_api(options, message):
    """The command line checked them; the API passed them straight on (nbest=-1 dropped the last hypothesis, unkpen
    -inf gave <pad> and NaN scores, beam=0 failed inside a slice)."""
    with pytest.raises(UserError, match=message):
        lm = load()
        lm.generate([lm.encode("the first")], **{"beam": 2, "max_len_b": 4, **options})


def test_a_prompt_that_repeats_a_blocked_ngram_is_refused_and_others_run():
    """The blocker (fairseq's CUDA rule) bans what would repeat an n-gram, the prompt included: a prompt repeating
    an n-gram of that size would have its own forced word banned (-inf hypotheses, an empty list, sample failing)."""
    lm = load()
    repeats = lm.encode("the history of the city and the history of the state")
    with pytest.raises(UserError, match=r"prompt 1 repeats a 3-gram .*no_repeat_ngram_size 3"):
        lm.generate([repeats], beam=2, max_len_b=20, no_repeat_ngram_size=3)
    with pytest.raises(UserError, match="no_repeat_ngram_size 1 forbids </s>"):  # every sequence starts with it
        lm.sample("the city of the state", beam=2, max_len_b=12, no_repeat_ngram_size=1)
    with pytest.raises(UserError, match="no_repeat_ngram_size 1 forbids </s>"):  # sampling failed in multinomial
        lm.sample("the city", sampling=True, max_len_b=12, no_repeat_ngram_size=1)
    hyps = lm.generate([repeats], beam=2, max_len_b=20, no_repeat_ngram_size=5)  # no 5-gram repeats: it runs
    assert hyps[0] and all(h["tokens"][: len(repeats) - 1].tolist() == repeats[:-1].tolist() for h in hyps[0])
    # a </s> inside the ids ends every hypothesis there (fairseq finalizes the forced </s>): what follows it is never
    # generated, so its repeats are no reason to refuse (they had been refused; fairseq returns [the, city, </s>])
    the, city = lm.encode("the city")[:2].tolist()
    hyps = lm.generate([torch.tensor([the, city, 2, the, city, the])], beam=3, max_len_b=6, no_repeat_ngram_size=3)
    assert [h["tokens"].tolist() for h in hyps[0]] == [[the, city, 2]] * 3


def test_from_pretrained_arguments():
    assert next(load("wiki_tied", dtype="float16").model.parameters()).dtype == torch.float16
    assert next(load("wiki_tied", dtype="torch.bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="dtype torch.int64: give a floating torch dtype"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", dtype=torch.int64)
    with pytest.raises(UserError, match="dtype 'half-ish'"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", dtype="half-ish")
    with pytest.raises(UserError, match="data_name_or_path 'no/such/data-bin': no dict.txt there"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", "no/such/data-bin")
    with pytest.raises(UserError, match="unknown override.s. decoder_layers_to_kep"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", overrides={"decoder_layers_to_kep": "0"})
    stored = adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", overrides={"data": "."})  # a fairseq one
    assert stored.score("the first")["tokens"].tolist() == load().score("the first")["tokens"].tolist()


def test_score_arguments():
    lm = load()
    with pytest.raises(UserError, match="score takes text"):
        lm.score(lm.encode("the first"))
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        lm.score(["the first"], batch_size=1.5)
    with pytest.raises(UserError, match="autocast_dtype 'fp32': use 'bf16' or 'fp16'"):
        lm.score("the first", autocast_dtype="fp32")
    by_name = lm.score("the first", autocast_dtype="bfloat16")["positional_scores"]
    assert torch.equal(lm.score("the first", autocast_dtype=torch.bfloat16)["positional_scores"], by_name)
    assert torch.equal(lm.score("the first", autocast_dtype="bf16")["positional_scores"], by_name)
    with pytest.raises(UserError, match="needs an fp32 model; this one is torch.float64"):
        load("wiki_tied", dtype=torch.float64).score("the first", autocast_dtype="bf16")
    with pytest.raises(UserError, match="score_rows takes a list of lines"):
        list(lm.score_rows("the first"))


def test_features_and_the_model_refuse_what_the_positions_cannot_hold():
    learned = load("spm")
    limit = learned.cfg.max_target_positions
    text = " ".join(["the"] * (2 * limit))
    with pytest.raises(UserError, match=f"more than the model's {limit} positions"):
        learned.features(text)
    with pytest.raises(UserError, match=r"shorter pieces, or for a document's perplexity .* --dataset-impl raw"):
        learned.score(text)  # the way to a long text's perplexity: eval reads raw text in sliding windows
    src = torch.full((1, limit + 1), 5)
    with pytest.raises(ValueError, match=f"{limit + 1} positions: more than the {limit} of the learned table"):
        learned.model(src)
    assert learned.model(src[:, :limit]).shape[1] == limit


def test_targets_must_match_the_features():
    """One target per row: ``gather`` took a shorter target list without a word; an id past the vocabulary got a
    log-prob from the last cluster."""
    lm = load()
    src = torch.tensor([[2, 4, 42, 7]])
    with pytest.raises(ValueError, match=r"\(1, 3\) targets for features of shape \(1, 4, 48\)"):
        lm.model.loss(src, src[:, 1:])
    sm = AdaptiveSoftmax(100, 16, [20, 50])
    h = torch.randn(3, 16)
    with pytest.raises(ValueError, match="2 targets for 3 rows of features"):
        sm.loss(h, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"target ids from 2 to 100: outside the vocabulary \[0, 100\)"):
        sm.target_log_prob(h, torch.tensor([2, 5, 100]))
    assert sm.target_log_prob(h, torch.tensor([2, 5, 99])).shape == (3,)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: AdaptiveInput(100, 1, 16, 4.0, 16, [50, 20]), "strictly increasing positive integers"),
        (lambda: AdaptiveInput(100, 1, 16, 4.0, 16, []), "strictly increasing"),
        (lambda: AdaptiveInput(100, 1, 16, 0.0, 16, [20]), "factor 0.0 and dims 16, 16 must be positive"),
        (lambda: AdaptiveInput(100, 1, 16, 100.0, 16, [20, 50]), r"bands \[16, 0, 0\] wide"),
        (lambda: AdaptiveSoftmax(100, 16, [20, 20]), "strictly increasing"),
        (lambda: AdaptiveSoftmax(100, 16, [20, 50], factor=100.0), "tail 1 would be 0 wide"),
        (lambda: AdaptiveSoftmax(100, 16, [20, 50], adaptive_input=torch.nn.Embedding(100, 16)), "an AdaptiveInput"),
        (
            lambda: AdaptiveSoftmax(
                100, 32, [20, 50], adaptive_input=AdaptiveInput(100, 1, 16, 4.0, 16, [20, 50]), tie_proj=True
            ),
            "input_dim 32 differs from the adaptive input's output_dim 16",
        ),  # fmt: skip
    ],
)
def test_adaptive_modules_refuse_what_they_cannot_build(build, message):
    """Each failed later with a negative dimension, a division by zero, a shape error at the first forward, or was
    built with empty bands."""
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_data_name_or_path_is_read_as_fairseqs_hub_reads_it(tmp_path, monkeypatch):
    """fairseq's hub takes a ``data_name_or_path`` starting with "." relative to the model folder and any other
    relative to the working directory."""
    (tmp_path / "dbin").mkdir()
    (tmp_path / "dbin" / "dict.txt").write_bytes((MODELS / "wiki_tied" / "dict.txt").read_bytes())
    monkeypatch.chdir(tmp_path)
    lm = adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", "dbin")
    assert lm.score("the first")["tokens"].tolist() == load().score("the first")["tokens"].tolist()
    assert (
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", ".").dictionary.symbols == lm.dictionary.symbols
    )


def test_score_and_generate_take_iterables_and_numpy_numbers():
    """The input checks read a generator once and accept numpy numbers where Python ones are accepted."""
    import numpy as np

    lm = load()
    want = [r["tokens"].tolist() for r in lm.score(["the first", "in the city"])]
    assert [r["tokens"].tolist() for r in lm.score(s for s in ["the first", "in the city"])] == want
    assert [r["tokens"].tolist() for r in lm.score(["the first", "in the city"], batch_size=np.int64(1))] == want
    hyps = lm.generate([lm.encode("the first")], beam=np.int64(2), max_len_b=np.int64(5), lenpen=np.float32(1.0),
                       max_len_a=np.int64(0))  # fmt: skip
    assert len(hyps[0]) == 2


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda lm: lm.encode(None), "encode takes one str, not NoneType"),
        (lambda lm: lm.encode(["the"]), "encode takes one str, not list"),
        (lambda lm: lm.encode(b"the"), "encode takes one str, not bytes"),
        (lambda lm: lm.decode("the"), "decode takes a 1-D tensor or list of int ids .one sentence., not str"),
        (lambda lm: lm.decode(None), "decode takes a 1-D tensor or list of int ids"),
        (lambda lm: lm.decode([[4, 5]]), "decode takes a 1-D tensor or list of int ids .one sentence., not list"),
        (lambda lm: lm.decode(torch.tensor([[4, 5]])), "not a 2-D torch.int64 tensor"),
        (lambda lm: lm.decode(torch.tensor(4)), "not a 0-D torch.int64 tensor"),
        (lambda lm: lm.decode(torch.tensor([4.0])), "not a 1-D torch.float32 tensor"),
        (lambda lm: lm.score(None), "score takes a list .or any iterable. of inputs, not NoneType"),
        (lambda lm: lm.score(5), "score takes a list .or any iterable. of inputs, not int"),
        (lambda lm: lm.sample(None), "sample takes a list .or any iterable. of inputs, not NoneType"),
        (lambda lm: lm.sample([5]), "sample takes text: a str or a list of str"),
        (lambda lm: lm.generate(None), "generate takes a list .or any iterable. of inputs, not NoneType"),
        (lambda lm: lm.generate(7), "generate takes a list .or any iterable. of inputs, not int"),
    ],
)
def test_text_and_id_inputs_are_checked(call, message):
    """Found by the hub audit: each of these had ended in an AttributeError/TypeError traceback from inside."""
    with pytest.raises(UserError, match=message):
        call(load())


def test_decode_takes_ids_as_lists_arrays_and_tensors():
    import numpy as np

    lm = load()
    ids = lm.encode("the first of the").tolist()
    want = "the first of the"
    assert lm.decode(ids) == lm.decode(tuple(ids)) == lm.decode(np.array(ids)) == lm.decode(torch.tensor(ids)) == want
    assert lm.decode([np.int64(i) for i in ids]) == want


def test_from_pretrained_batching_and_overrides_are_checked():
    """fairseq's batch_by_size reads 0 or less as no limit; a str had failed in the batcher's comparison and a
    non-dict ``overrides`` with 'not a mapping' (found by the hub audit)."""
    with pytest.raises(UserError, match="batch_size must be an integer .None, 0 or less: no limit., not '2'"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", batch_size="2")
    with pytest.raises(UserError, match="max_tokens must be an integer"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", max_tokens=2.5)
    with pytest.raises(UserError, match="overrides must be a dict of settings, not int"):
        adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", overrides=5)
    unlimited = adaptive_lm.from_pretrained(MODELS / "wiki_tied", "model.pt", max_tokens=-1, batch_size=0)
    assert unlimited.batching == (None, None)
    assert unlimited.sample(["the first of the", "in"], beam=2, max_len_b=6) == load().sample(
        ["the first of the", "in"], beam=2, max_len_b=6
    )


def test_from_pretrained_takes_tokens_per_sample_as_evaluations_default_block(fixture_dir):
    """fairseq's hub accepts task settings such as ``tokens_per_sample`` as keywords (its arg_overrides); ours had
    refused it as an unknown keyword. It now sets the block size ``evaluate`` defaults to, checked by evaluating
    with it and with the same value given to ``evaluate``; a non-positive or non-integer value is one line."""
    from adaptive_lm.inference.evaluate import EvalConfig, evaluate

    model = fixture_dir / "model" / "checkpoint_last.pt"
    stored = adaptive_lm.from_pretrained(model)
    lm = adaptive_lm.from_pretrained(model, tokens_per_sample=12)
    assert lm.tokens_per_sample == 12 != stored.tokens_per_sample
    cfg = dict(data=str(fixture_dir / "data-bin"), gen_subset="valid", progress=False)
    got = evaluate(lm, EvalConfig(**cfg), keep_scores=True)
    want = evaluate(stored, EvalConfig(**cfg, tokens_per_sample=12), keep_scores=True)
    default = evaluate(stored, EvalConfig(**cfg), keep_scores=True)  # the stored block size: other contexts
    assert got.block_size == want.block_size == 12 != default.block_size
    assert got.n_tokens == want.n_tokens == default.n_tokens > 0
    assert torch.equal(torch.as_tensor(got.scores), torch.as_tensor(want.scores))
    assert not torch.equal(torch.as_tensor(got.scores), torch.as_tensor(default.scores))
    for bad in (0, -3, 2.5, "12", True):
        with pytest.raises(UserError, match="tokens_per_sample must be a positive integer"):
            adaptive_lm.from_pretrained(model, tokens_per_sample=bad)
