"""Preprocessing and batching against fairseq's own output and rules."""

from __future__ import annotations

import filecmp
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from adaptive_lm.core.data import EpochBatches, IndexedDataset, LMDataset, batch_by_size, block_spans, load_split
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
