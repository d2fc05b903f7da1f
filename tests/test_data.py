"""Preprocessing and batching against fairseq's own output and rules."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from adaptive_lm.core.data import (
    BREAK_MODES,
    EpochBatches,
    IndexedDataset,
    LMDataset,
    batch_by_size,
    block_spans,
    load_split,
    ordered_indices,
)
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.preprocess import PreprocessConfig, preprocess


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_is_byte_identical_to_fairseq(tmp_path, wikitext2, fixture_dir, workers, monkeypatch):
    """WikiText-format text (made back from the fixture's data-bin: <unk>s and the words of 500 real lines) against
    what fairseq-preprocess wrote for the same text (fixtures/fairseq_tiny/preprocess, full vocabulary)."""
    import adaptive_lm.core.preprocess as pp

    monkeypatch.setattr(pp, "CHUNK_BYTES", 5_000)  # several ranges per file, so worker order matters
    assert len(pp.line_ranges(str(wikitext2 / "train.txt"))) > 10  # (the default had been bound at definition)
    cfg = PreprocessConfig(
        trainpref=str(wikitext2 / "train.txt"),
        validpref=str(wikitext2 / "valid.txt"),
        destdir=str(tmp_path),
        workers=workers,
        progress=False,
    )
    log = preprocess(cfg)
    expected = fixture_dir / "preprocess"
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert filecmp.cmp(tmp_path / name, expected / name, shallow=False), name
    fairseq_log = (expected / "preprocess.log").read_text().splitlines()  # "valid.txt: 200 sents, ... replaced ..."
    theirs = float(re.search(r"([\d.]+)% replaced", fairseq_log[1]).group(1))  # 3 significant digits: 10.2
    ours = float(re.search(r"([\d.]+)% replaced", log[2]).group(1))  # 2 decimals
    assert "valid" in log[2] and theirs > 0 and abs(ours - theirs) <= 0.05 + 0.005
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_interrupted_preprocessing_resumes_after_its_finished_parts(tmp_path, wikitext2, monkeypatch):
    """Ctrl-C (or SIGTERM, through the command) during the valid split: the dictionary and the train split stay in
    DESTDIR's .partial folder, and the same command binarises only the valid split, giving the bytes of an
    uninterrupted run; a changed setting starts afresh."""
    import adaptive_lm.core.preprocess as pp

    def cfg(dest: str, **kw) -> PreprocessConfig:
        return PreprocessConfig(trainpref=str(wikitext2 / "train.txt"), validpref=str(wikitext2 / "valid.txt"),
                                destdir=str(tmp_path / dest), progress=False, **kw)  # fmt: skip

    real, calls = pp.binarize, []

    def stop_at_valid(path, prefix, *a, **k):
        if Path(prefix).name == "valid":
            raise KeyboardInterrupt
        return real(path, prefix, *a, **k)

    monkeypatch.setattr(pp, "binarize", stop_at_valid)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg("b"))
    assert (tmp_path / ".b.partial" / "train.bin").is_file() and not (tmp_path / "b").exists()

    def counted(path, prefix, *a, **k):
        calls.append(Path(prefix).name)
        return real(path, prefix, *a, **k)

    monkeypatch.setattr(pp, "binarize", counted)
    monkeypatch.setattr(pp, "build_dictionary", lambda *a: pytest.fail("the dictionary was built again"))
    log = preprocess(cfg("b", workers=2))  # the workers change no byte: still the same run
    assert calls == ["valid"] and log[0].startswith("resuming after: dictionary, train")
    assert not (tmp_path / ".b.partial").exists()
    monkeypatch.undo()
    preprocess(cfg("c"))
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert filecmp.cmp(tmp_path / "b" / name, tmp_path / "c" / name, shallow=False), name
    monkeypatch.setattr(pp, "binarize", stop_at_valid)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg("d"))
    monkeypatch.setattr(pp, "binarize", counted)
    calls.clear()
    preprocess(cfg("d", thresholdsrc=2))  # another setting: afresh
    assert calls == ["train", "valid"]


def test_a_second_preprocess_on_the_same_destdir_is_refused_while_the_first_runs(tmp_path, wikitext2):
    """.DESTDIR.partial is shared by design (a rerun resumes there): a second run on the same --destdir while the
    first was writing had removed the first one's folder (it failed with '.partial/train.idx.tmp: No such file') or
    written into it. Now it is refused in one line naming the holder, the holder's files untouched; a holder that
    was killed leaves no lock behind."""
    import signal
    import subprocess
    import sys

    dest, work = tmp_path / "out", tmp_path / ".out.partial"
    work.mkdir()
    (work / "train.bin").write_bytes(b"the first run's")
    hold = (f"from pathlib import Path\nfrom adaptive_lm.core.preprocess import _only_writer\n"
            f"with _only_writer(Path({str(work)!r}), Path({str(dest)!r})):\n    print('held', flush=True)\n"
            f"    input()\n")  # fmt: skip
    cfg = PreprocessConfig(trainpref=str(wikitext2 / "train.txt"), destdir=str(dest), progress=False)
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = re.escape(f"--destdir {dest}: another preprocess is writing it (pid {holder.pid})")
        with pytest.raises(UserError, match=refused):
            preprocess(cfg)
        assert (work / "train.bin").read_bytes() == b"the first run's" and not dest.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    preprocess(cfg)  # the killed holder's lock went with it
    assert (dest / "train.bin").is_file() and not work.exists()
    assert not (tmp_path / ".out.partial.lock").exists()


def test_fairseq_files_read_back(fixture_dir):
    """fairseq's own binarised files read back as fairseq reads them (its data_utils: the first 2,048 tokens of the
    valid stream are stored in the reference), with fairseq-preprocess's counts."""
    ds = IndexedDataset(fixture_dir / "data-bin" / "valid")
    assert len(ds) == 400 and int(ds.sizes.sum()) == 20_897 and ds.dtype == np.uint16
    fairseq_read = np.load(fixture_dir / "reference" / "valid_logprobs.npz")["target_ids"]
    stream = np.concatenate([ds[i] for i in range(len(ds))])
    assert stream[: len(fairseq_read)].tolist() == fairseq_read.tolist()
    d = Dictionary.load(fixture_dir / "data-bin" / "dict.txt")
    assert len(d) == 6000 and d.symbols[-1] == "madeupword0003"  # 5,992 words + 4 specials, padded to 8


def test_dictionary_round_trip_and_ordering(tmp_path):
    from collections import Counter

    d = Dictionary.from_counts(Counter({"b": 3, "a": 3, "c": 5, "<unk>": 2}))
    assert d.symbols[4:7] == ["c", "a", "b"] and len(d) % 8 == 0 and d.symbols[-1].startswith("madeupword")
    assert d.index("<unk>") == 3 and "<unk>" not in d.symbols[4:]
    d.save(tmp_path / "dict.txt")
    assert Dictionary.load(tmp_path / "dict.txt") == d


@pytest.mark.parametrize(
    "content,message",
    [("a 1\na 2\n", "duplicate word 'a'"), ("a 1\nnocount\n", "malformed"), ("a x\n", "malformed")],
)
def test_bad_dictionary_lines_name_the_line(tmp_path, content, message):
    (tmp_path / "dict.txt").write_text(content)
    with pytest.raises(UserError, match=message) as e:
        Dictionary.load(tmp_path / "dict.txt")
    assert "dict.txt:2" in str(e.value) or "dict.txt:1" in str(e.value)


def test_bad_text_and_truncated_binaries(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"bad.txt:2: not valid UTF-8"):
        preprocess(PreprocessConfig(trainpref=str(tmp_path / "bad.txt"), destdir=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out" / "train.bin").exists()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        preprocess(
            PreprocessConfig(trainpref=str(tmp_path / "empty.txt"), destdir=str(tmp_path / "o2"), progress=False)
        )
    (tmp_path / "ok.txt").write_text("a b c\n\nd e\n")
    preprocess(PreprocessConfig(trainpref=str(tmp_path / "ok.txt"), destdir=str(tmp_path / "o3"), progress=False))
    ds = IndexedDataset(tmp_path / "o3" / "train")
    assert list(ds.sizes) == [4, 1, 3]  # one </s> per line, the blank line included
    with open(tmp_path / "o3" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="truncated or mismatched"):
        IndexedDataset(tmp_path / "o3" / "train")
    with open(tmp_path / "o3" / "train.idx", "r+b") as f:
        f.truncate(30)
    with pytest.raises(UserError, match="truncated or corrupt"):
        IndexedDataset(tmp_path / "o3" / "train")


def test_block_spans_follow_fairseq_break_modes():
    sizes = np.array([3, 1, 4, 2, 1, 6])  # lines with their </s>; the 1s are blank lines
    assert block_spans(sizes, 5, "none").tolist() == [[0, 5], [5, 10], [10, 15], [15, 17]]
    assert block_spans(sizes, 5, "eos").tolist() == [[0, 3], [3, 4], [4, 8], [8, 10], [10, 11], [11, 17]]
    assert block_spans(sizes, 5, "complete").tolist() == [[0, 4], [4, 8], [8, 11], [11, 17]]
    assert block_spans(sizes, 5, "complete_doc").tolist() == [[0, 3], [4, 8], [8, 10], [11, 17]]


def test_blocks_sources_and_targets_equal_fairseqs_for_every_break_mode():
    """fairseq's TokenBlockDataset + MonolingualDataset (tests/fixtures/make_fairseq_blocks.py): 80 random streams,
    block sizes 1-64, every --sample-break-mode, with and without --add-bos-token: the same blocks, each sample's
    source and target, sizes and size-sorted order. Where fairseq fails to build (complete_doc over empty lines
    only), ours has no block."""
    ref = json.loads((Path(__file__).parent / "fixtures" / "fairseq_blocks.json").read_text())["cases"]
    assert {(c["mode"], c["add_bos"]) for c in ref} == {(m, b) for m in BREAK_MODES for b in (False, True)}
    for c in ref:
        ds = LMDataset(np.array(c["tokens"]), block_spans(np.array(c["sizes"]), c["block"], c["mode"]), eos=2, pad=1,
                       add_bos=c["add_bos"])  # fmt: skip
        if "fairseq_error" in c:
            assert len(ds) == 0, c
            continue
        items = [ds.item(i) for i in range(len(ds))]
        assert [s.tolist() for s, _ in items] == c["source"], c
        assert [t.tolist() for _, t in items] == c["target"], c
        assert ds.sizes.tolist() == c["block_sizes"] and ordered_indices(ds.sizes, True, 7).tolist() == c["order_seed7"]


def test_source_is_target_shifted_and_every_token_is_a_target_once():
    tokens = np.arange(10, 33, dtype=np.int64)
    ds = LMDataset(tokens, block_spans(np.array([23]), 8, "none"), eos=2, pad=1)
    seen = []
    for i in range(len(ds)):
        src, tgt = ds.item(i)
        seen.extend(tgt.tolist())
        assert src[1:].tolist() == tgt[:-1].tolist()
        assert src[0] == (2 if i == 0 else tokens[ds.spans[i, 0] - 1])
    assert seen == tokens.tolist()


def test_batches_respect_max_tokens_and_depend_only_on_seed_and_epoch():
    sizes = np.array([256] * 37 + [100])
    batches = batch_by_size(np.argsort(sizes, kind="stable"), sizes, 2048, None, bsz_mult=1)
    assert all(len(b) * sizes[b].max() <= 2048 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(38))  # multiple 1: every sample
    ds = LMDataset(np.arange(38 * 256), block_spans(np.array([38 * 256]), 256), 2, 1)
    a = EpochBatches(ds, 512, None, seed=3)
    b = EpochBatches(ds, 512, None, seed=3)
    assert [x.tolist() for x in a.epoch_batches(2)] == [x.tolist() for x in b.epoch_batches(2)]
    assert [x.tolist() for x in a.epoch_batches(1)] != [x.tolist() for x in a.epoch_batches(2)]
    shards = [EpochBatches(ds, 512, None, seed=3, num_shards=2, shard_id=r).epoch_batches(1) for r in range(2)]
    flat = [i for s in shards for b in s for i in b.tolist()]
    assert sorted(flat) == sorted(np.concatenate(a.batches).tolist())  # disjoint and complete


def test_batch_by_size_equals_fairseq_including_the_dropped_last_batch():
    ref = json.loads((Path(__file__).parent / "fixtures" / "fairseq_batches.json").read_text())
    dropped = 0
    for c in ref["batch_by_size"]:
        ms = None if c["max_sentences"] < 0 else c["max_sentences"]
        ours = batch_by_size(np.array(c["indices"]), np.array(c["sizes"]), c["max_tokens"], ms, c["mult"])
        assert [b.tolist() for b in ours] == c["batches"], c
        dropped += sum(map(len, c["batches"])) < len(c["sizes"])
    assert dropped > 10  # the fairseq rule (last batch not a multiple of 8 is dropped) is exercised


def test_epoch_order_equals_fairseq_train(fixture_dir):
    ref = json.loads((fixture_dir / "epoch_order.json").read_text())
    split = load_split(fixture_dir / "data-bin", "train")
    for key, epochs in ref.items():
        tps, seed = (int(x) for x in key.removeprefix("tps").split("_seed"))
        eb = EpochBatches(LMDataset.from_split(split, tps, "none"), 2048, None, seed=seed)
        for epoch, expected in enumerate(epochs, start=1):
            assert [b.tolist() for b in eb.epoch_batches(epoch)] == expected, (key, epoch)
    assert len(ref["tps256_seed3"][0]) == 56  # 455 blocks in batches of 8: fairseq drops the last 7


def test_index_dtype_follows_fairseq_by_vocabulary_size(tmp_path):
    from adaptive_lm.core.data import best_dtype

    assert best_dtype(14152) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.uint32 and best_dtype(267_744) == np.uint32  # fairseq writes dtype code 9
    words = " ".join(f"w{i}" for i in range(70_000))
    (tmp_path / "big.txt").write_text(words + "\n")
    preprocess(PreprocessConfig(trainpref=str(tmp_path / "big.txt"), destdir=str(tmp_path / "o"), progress=False))
    assert (tmp_path / "o" / "train.idx").read_bytes()[17] == 9
    ds = IndexedDataset(tmp_path / "o" / "train")
    assert ds.dtype == np.uint32 and int(ds[0][-1]) == 2 and len(ds[0]) == 70_001


# ---- edge cases against fairseq-preprocess (tests/fixtures/make_fairseq_preprocess_edge.sh) -------------------------
EDGE = Path(__file__).parent / "fixtures" / "preprocess_edge"
EDGE_RUNS = {  # the flags each run of make_fairseq_preprocess_edge.sh gave fairseq-preprocess (text paths in text/)
    "lf_w1": dict(trainpref="lf/train.txt", validpref="lf/valid.txt", testpref="lf/test.txt,lf/test2.txt"),
    "lf_w3": dict(
        trainpref="lf/train.txt", validpref="lf/valid.txt", nwordssrc=40, thresholdsrc=2, padding_factor=3, workers=3
    ),  # fmt: skip
    "lf_lazy": dict(
        srcdict="lf_w1", validpref="lf/valid.txt", testpref="lf/test.txt,lf/test2.txt", dataset_impl="lazy", workers=2
    ),  # fmt: skip
    "lf_cached": dict(srcdict="lf_w3", validpref="lf/valid.txt", dataset_impl="cached"),
    "cr_w1": dict(trainpref="cr/train.txt", validpref="cr/valid.txt"),
}


def edge_config(run: str, dest: Path, **changes) -> PreprocessConfig:
    kw = {**EDGE_RUNS[run], **changes}
    for k in ("trainpref", "validpref", "testpref"):
        if kw.get(k):
            kw[k] = ",".join(str(EDGE / "text" / p) for p in kw[k].split(","))
    if "srcdict" in kw:
        kw["srcdict"] = str(EDGE / kw["srcdict"] / "dict.txt")
    return PreprocessConfig(destdir=str(dest), progress=False, **kw)


def test_padding_factor_and_threshold_below_one_are_fairseqs_no_op(tmp_path):
    """--padding-factor 0 (no madeupword padding) and a negative --thresholdsrc (keep every word), which
    fairseq-preprocess accepts (lf_p0: 95 symbols, no padding): the command line had refused both."""
    from adaptive_lm.cli import main

    text = EDGE / "text" / "lf"
    args = ["preprocess", "--only-source", "--trainpref", str(text / "test.txt"), "--validpref",
            str(text / "test2.txt"), "--padding-factor", "0", "--thresholdsrc", "-3", "--destdir",
            str(tmp_path / "out"), "--no-progress-bar"]  # fmt: skip
    assert main(args) == 0
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert filecmp.cmp(tmp_path / "out" / name, EDGE / "lf_p0" / name, shallow=False), name
    assert len(Dictionary.load(tmp_path / "out" / "dict.txt")) == 95


@pytest.mark.parametrize("run", sorted(EDGE_RUNS))
def test_preprocess_edge_cases_are_byte_identical_to_fairseq(tmp_path, run):
    """Unicode whitespace of every kind (no-break and ideographic spaces, \\x0b, \\x1c-\\x1f, \\x85, \\u2028/9; and
    \\u200b, \\ufeff, which are not whitespace), empty, blank and 3,000-word lines, \\r\\n and lone \\r line ends (one
    worker), special symbols as words, --nwordssrc/--thresholdsrc/--padding-factor 3, --srcdict, and fairseq's older
    index format (--dataset-impl lazy / cached, which ours had refused): dict.txt, every .bin and .idx as fairseq's,
    and its sentence and token counts."""
    log = preprocess(edge_config(run, tmp_path / "out"))
    theirs = sorted(p.name for p in (EDGE / run).iterdir() if p.suffix in (".txt", ".bin", ".idx"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != "preprocess.log") == theirs
    for name in theirs:
        assert filecmp.cmp(tmp_path / "out" / name, EDGE / run / name, shallow=False), name
    summary = (EDGE / run / "summary.log").read_text().splitlines()  # "[None] lf/valid.txt: 60 sents, 386 tokens, ..."
    counts = [tuple(map(int, re.search(r": (\d+) sents, (\d+) tokens", line).groups())) for line in summary]
    ours = [
        tuple(map(int, re.search(r": (\d+) lines, (\d+) tokens", line).groups())) for line in log if " lines, " in line
    ]
    assert ours == counts


def test_cr_line_ends_with_several_workers_are_refused(tmp_path):
    """fairseq-preprocess --workers 3 on text with \\r line ends (cr/valid.txt opens with a \\r\\n blank line) cuts it
    at text-mode tell() offsets that are opaque numbers past the file, and lines repeat: its output differs from its
    --workers 1 output (the committed cr_w3 against cr_w1). Ours wrote --workers 1's bytes whatever --workers said; now
    refused by name, before anything is written."""
    assert not filecmp.cmp(EDGE / "cr_w3" / "valid.bin", EDGE / "cr_w1" / "valid.bin", shallow=False)
    counts = [(EDGE / r / "summary.log").read_text().splitlines()[1] for r in ("cr_w1", "cr_w3")]
    assert "33 sents" in counts[0] and "34 sents" in counts[1]  # one line more with 3 workers
    for changes in (dict(workers=3), dict(workers=2, trainpref=None, srcdict="cr_w1")):
        with pytest.raises(UserError, match=r"cr/(train|valid)\.txt: has \\r \(CR or CRLF\) line ends, .* --workers 1"):
            preprocess(edge_config("cr_w1", tmp_path / "out", **changes))
        assert not (tmp_path / "out").exists()


def test_cr_line_ends_in_a_later_split_are_refused_before_the_train_split_runs(tmp_path):
    """A \\r in the valid file was refused only when its turn came, after the dictionary and the train split had
    run (hours on WikiText-103). Every file is now checked first: here the train file also holds invalid UTF-8 in
    its last line, refused by the first pass over it; the \\r of the valid file is named instead."""
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_bytes(b"a clean line\n" * 50 + b"bad \xff byte\n")
    valid.write_bytes(b"a line\r\nanother line\r\n")
    cfg = PreprocessConfig(destdir=str(tmp_path / "out"), trainpref=str(train), validpref=str(valid), progress=False)
    with pytest.raises(UserError, match=r"train\.txt:51: not valid UTF-8"):
        preprocess(cfg)  # one worker: \r is fine, and the train file fails on its own
    with pytest.raises(UserError, match=r"valid\.txt: has \\r \(CR or CRLF\) line ends, .* --workers 2"):
        preprocess(dataclasses.replace(cfg, workers=2))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("impl,why", [("raw", "only copies the text"), ("huffman", "fails with it too"),
                                      ("fasta", "fails with it too")])  # fmt: skip
def test_dataset_impls_fairseq_does_not_binarise_with_are_refused_with_the_reason(tmp_path, impl, why):
    with pytest.raises(UserError, match=f"--dataset-impl {impl} is not supported \\(fairseq-preprocess {why}"):
        preprocess(edge_config("lf_w1", tmp_path / "out", dataset_impl=impl))


def test_lazy_and_cached_data_bins_read_as_fairseq_reads_them(tmp_path):
    """fairseq-train and eval-lm read --dataset-impl lazy/cached data-bins (the TNTIDX format: ids + 1 as int32) as
    well as mmap ones; ours had refused them as 'not a fairseq mmap index ... run preprocess again'. The same text
    binarised both ways by fairseq gives the same lines and blocks; damaged copies are one line each."""
    for legacy, mmap, splits in (("lf_lazy", "lf_w1", ("valid", "test", "test1")), ("lf_cached", "lf_w3", ("valid",))):
        for split in splits:
            a, b = load_split(EDGE / legacy, split, vocab_size=6000), load_split(EDGE / mmap, split)
            assert a.dtype == np.int32 and b.dtype == np.uint16
            assert a.sizes.tolist() == b.sizes.tolist() and len(a) == len(b) > 0
            assert [a[i].tolist() for i in range(len(a))] == [b[i].tolist() for i in range(len(b))]
            for mode in ("none", "complete_doc"):
                la, lb = LMDataset.from_split(a, 7, mode, add_bos=True), LMDataset.from_split(b, 7, mode, add_bos=True)
                assert la.spans.tolist() == lb.spans.tolist()
                assert all(np.array_equal(la.item(i)[0], lb.item(i)[0]) for i in range(len(la)))
    for name in ("valid.bin", "valid.idx", "dict.txt"):
        (tmp_path / name).write_bytes((EDGE / "lf_lazy" / name).read_bytes())
    with open(tmp_path / "valid.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"valid.bin: size 100 bytes does not match its index \(467 tokens of 4 bytes"):
        IndexedDataset(tmp_path / "valid")
    with open(tmp_path / "valid.idx", "r+b") as f:
        f.truncate(200)
    with pytest.raises(UserError, match=r"valid.idx: truncated or corrupt \(200 bytes, expected 1504\)"):
        IndexedDataset(tmp_path / "valid")


def test_split_formats_fairseq_reads_and_ours_does_not_are_named(tmp_path):
    """A text file where the split's .idx should be (fairseq reads it as --dataset-impl raw) and a Huffman-coded
    index are refused for what they are, a folder in place of a file as a folder (it had been 'not found')."""
    (tmp_path / "valid").write_text("some text\n")
    with pytest.raises(UserError, match=r"valid: a text file with no valid.idx beside it, .* --dataset-impl raw"):
        IndexedDataset(tmp_path / "valid")
    (tmp_path / "valid.idx").write_bytes(b"HUFFIDX\x00\x00" + bytes(40))
    (tmp_path / "valid.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"valid.idx: a Huffman-coded fairseq index \(--dataset-impl huffman\)"):
        IndexedDataset(tmp_path / "valid")
    (tmp_path / "valid.bin").unlink()
    (tmp_path / "valid.bin").mkdir()
    with pytest.raises(UserError, match=r"valid.bin: a folder, not a file"):
        IndexedDataset(tmp_path / "valid")


def train_args(data: Path) -> list[str]:
    """A one-update run of a width-8 model on ``data``: enough to reach the data checks."""
    return ["train", str(data), "--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "8",
            "--decoder-ffn-embed-dim", "8", "--decoder-attention-heads", "1", "--tokens-per-sample", "32",
            "--max-tokens", "256", "--max-update", "1", "--save-dir", str(data / "ck"), "--no-progress-bar",
            "--cpu", "--disable-validation"]  # fmt: skip


def test_numbered_training_parts_fairseq_would_concatenate_are_refused(tmp_path, fixture_dir, capsys):
    """fairseq-train loads the training split with combine=True: train, train1, train2, ... concatenated (checked
    with fairseq's load_indexed_dataset: 2,400 lines from train + train1 here). Ours had trained on train alone,
    silently; now one line naming train1.idx."""
    from adaptive_lm.cli import main

    for name in ("dict.txt", "train.bin", "train.idx"):
        (tmp_path / name).write_bytes((fixture_dir / "data-bin" / name).read_bytes())
    for ext in ("bin", "idx"):
        (tmp_path / f"train1.{ext}").write_bytes((fixture_dir / "data-bin" / f"valid.{ext}").read_bytes())
    assert main(train_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train1.idx: fairseq-train would train on train, train1, ... concatenated" in err[0], err
    assert not (tmp_path / "ck").exists()


def test_an_empty_training_split_is_named_as_empty(tmp_path, fixture_dir, capsys):
    """A training split of 0 lines (fairseq-preprocess writes one from an empty --trainpref file) had been refused as
    'no training batch (too little data for --max-tokens ...)'."""
    from adaptive_lm.cli import main
    from adaptive_lm.core.data import IndexedWriter

    (tmp_path / "dict.txt").write_bytes((fixture_dir / "data-bin" / "dict.txt").read_bytes())
    IndexedWriter(tmp_path / "train", np.dtype(np.uint16)).finalize()
    assert main(train_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("train.idx: an empty split (0 lines); binarise a non-empty text "
                                             "(preprocess --trainpref)"), err  # fmt: skip


def test_fairseqs_dataset_impl_flag_is_taken_and_checked_against_the_files(tmp_path, fixture_dir, capsys):
    """fairseq-train and fairseq-eval-lm take --dataset-impl (older scripts pass --dataset-impl mmap); ours had
    refused it as an unrecognized argument. The format is read from the files anyway: a flag that matches them
    runs, one that does not is one line (fairseq fails to read the files then), and the formats fairseq reads that
    are not reproduced (raw text, fasta, huffman) are refused by name."""
    from adaptive_lm.cli import main

    for impl in ("lazy", "cached"):
        assert len(load_split(EDGE / "lf_lazy", "valid", impl=impl)) == len(load_split(EDGE / "lf_w1", "valid"))
    assert len(load_split(EDGE / "lf_w1", "valid", impl="mmap")) > 0
    with pytest.raises(UserError, match=r"valid.idx: written with --dataset-impl mmap, but --dataset-impl lazy"):
        load_split(EDGE / "lf_w1", "valid", impl="lazy")
    with pytest.raises(UserError, match=r"valid.idx: written with --dataset-impl lazy or cached, but .* mmap"):
        load_split(EDGE / "lf_lazy", "valid", impl="mmap")
    for impl in ("raw", "fasta", "huffman"):
        with pytest.raises(UserError, match=f"--dataset-impl {impl}: not supported"):
            load_split(EDGE / "lf_w1", "valid", impl=impl)
    for name in ("dict.txt", "train.bin", "train.idx"):
        (tmp_path / name).write_bytes((fixture_dir / "data-bin" / name).read_bytes())
    assert main([*train_args(tmp_path), "--dataset-impl", "mmap"]) == 0
    capsys.readouterr()
    assert main([*train_args(tmp_path), "--dataset-impl", "lazy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.idx: written with --dataset-impl mmap, but --dataset-impl lazy" in err[0], err


def test_a_raw_text_file_beside_a_binarised_split_and_a_half_numbered_part(tmp_path, fixture_dir, capsys):
    """fairseq's infer_dataset_impl tries raw text first: a file (or folder) named like the split beside its
    .idx/.bin is what fairseq would read, where ours read the .bin silently; it is now one line. A train1 with only
    its .idx is not read by fairseq (its combine loop stops at the first part whose files are missing), so it no
    longer counts as a part fairseq would concatenate."""
    from adaptive_lm.cli import main

    for name in ("dict.txt", "train.bin", "train.idx"):
        (tmp_path / name).write_bytes((fixture_dir / "data-bin" / name).read_bytes())
    (tmp_path / "train1.idx").write_bytes((fixture_dir / "data-bin" / "valid.idx").read_bytes())
    assert main(train_args(tmp_path)) == 0
    capsys.readouterr()
    (tmp_path / "train").write_text("raw text\n")
    with pytest.raises(UserError, match=r"train: exists beside train.idx/.bin, and fairseq reads it as"):
        load_split(tmp_path, "train")
    assert main(train_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fairseq reads it as the split's raw text" in err[0], err
