"""Training against fairseq's recorded continuation, exact resume, checkpoints, and 2-process training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptive_lm
from adaptive_lm.cli import build_parser, main
from adaptive_lm.fairseq_io import safe_load, state_dict_from_fairseq
from adaptive_lm.preprocess import PreprocessConfig, preprocess
from adaptive_lm.quickstart import Corpus
from adaptive_lm.train import train
from adaptive_lm.train_config import TrainConfig

FAIRSEQ_CONTINUE = """--cpu --num-workers 0 --arch transformer_lm_wiki103
  --decoder-layers 2 --decoder-embed-dim 128 --decoder-ffn-embed-dim 512 --decoder-attention-heads 4
  --decoder-input-dim 128 --decoder-output-dim 128
  --adaptive-input-cutoff 2000,8000 --adaptive-softmax-cutoff 2000,8000
  --dropout 0 --attention-dropout 0 --activation-dropout 0 --adaptive-softmax-dropout 0
  --t-mult 2 --lr-scheduler cosine --lr-shrink 0.75 --warmup-init-lr 1e-07 --stop-min-lr 1e-09
  --optimizer nag --min-lr 0.0001 --clip-norm 0.1 --criterion adaptive_loss --max-tokens 2048
  --update-freq 1 --tokens-per-sample 256 --seed 1 --sample-break-mode none
  --skip-invalid-size-inputs-valid-test --ddp-backend=legacy_ddp --log-format simple --log-interval 1
  --no-epoch-checkpoints --disable-validation --reset-dataloader --reset-meters"""
MODES = {
    "reset": "--reset-optimizer --reset-lr-scheduler --lr 0.5 --warmup-updates 2 --lr-period-updates 4 --max-update 6",
    "resume": "--lr 1.0 --warmup-updates 30 --lr-period-updates 270 --max-update 306",
}


def fairseq_log(path):
    rows = []
    for line in open(path):
        if "| train_inner |" in line:
            vals = dict(re.findall(r"(\w+)=([-\d.e]+)", line))
            rows.append({k: float(vals[k]) for k in ("loss", "gnorm", "lr", "num_updates")})
    return rows


@pytest.mark.parametrize("mode", ["reset", "resume"])
def test_continuing_fairseq_checkpoint_matches_fairseq(tmp_path, fixture_dir, mode):
    args = [
        "train",
        str(fixture_dir / "continue" / "data-bin"),
        *FAIRSEQ_CONTINUE.split(),
        *MODES[mode].split(),
        "--restore-file",
        str(fixture_dir / "model" / "checkpoint_best.pt"),
        "--save-dir",
        str(tmp_path),
    ]
    result = train(TrainConfig.from_args(build_parser().parse_args(args)))
    ref = fairseq_log(fixture_dir / "continue" / mode / "train.log")
    assert len(result["history"]) == len(ref) == 6
    for ours, theirs in zip(result["history"], ref):
        assert ours["update"] == theirs["num_updates"]
        assert abs(ours["loss"] - theirs["loss"]) < 6e-4  # fairseq logs 3 decimals
        assert abs(ours["gnorm"] - theirs["gnorm"]) < 6e-4
        assert abs(ours["lr"] - theirs["lr"]) < 1e-6 * max(1.0, theirs["lr"])
    ref_w = safe_load(fixture_dir / "continue" / mode / "checkpoint_last.pt")
    ours = adaptive_lm.from_pretrained(tmp_path / "checkpoint_last.pt")
    expected = state_dict_from_fairseq(ref_w["model"], ours.cfg)
    own = ours.model.state_dict()
    worst = max((own[k] - v).abs().max().item() for k, v in expected.items())
    assert worst < 1e-5, worst


def test_multibatch_continuation_and_validation_match_fairseq(tmp_path, fixture_dir):
    """120 shuffled batches (fairseq's order) and validation with fairseq's dropped last batch: every logged
    number equal to fairseq's printed one."""
    flags = " ".join(FAIRSEQ_CONTINUE.split()).replace("--disable-validation", "").split()
    extra = "--reset-optimizer --reset-lr-scheduler --lr 0.5 --warmup-updates 2 --lr-period-updates 20 --max-update 12"
    args = ["train", str(fixture_dir / "data-bin"), *flags, *extra.split(), "--validate-interval-updates", "6"]
    args += ["--seed", "2", "--restore-file", str(fixture_dir / "model" / "checkpoint_best.pt")]
    args += ["--save-dir", str(tmp_path), "--no-save"]
    result = train(TrainConfig.from_args(build_parser().parse_args(args)))
    lines = (Path(__file__).parent / "fixtures" / "fairseq_multibatch.log").read_text().splitlines()
    ref = [dict(re.findall(r"(\w+)=([-\d.e]+)", x)) for x in lines if x.startswith("train_inner")]
    ref_valid = [float(re.search(r"\| loss ([\d.]+)", x).group(1)) for x in lines if x.startswith("valid")]
    assert len(result["history"]) == len(ref) == 12 and len(ref_valid) == 2
    for ours, theirs in zip(result["history"], ref):
        assert abs(ours["loss"] - float(theirs["loss"])) < 6e-4
        assert abs(ours["gnorm"] - float(theirs["gnorm"])) < 6e-4
        assert abs(ours["lr"] - float(theirs["lr"])) < 1e-6
    assert [round(v, 3) for v in result["valid_losses"]] == ref_valid


# ---- a small generated corpus ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    c = Corpus(vocab=300, states=6, seed=1)
    c.write(d / "train.txt", 1300)
    c.write(d / "valid.txt", 400)
    preprocess(
        PreprocessConfig(
            trainpref=str(d / "train.txt"), validpref=str(d / "valid.txt"), destdir=str(d / "bin"), progress=False
        )
    )
    return d / "bin"


def tiny_args(data, save_dir, *extra):
    return [
        "train",
        str(data),
        "--arch",
        "tiny",
        "--save-dir",
        str(save_dir),
        "--max-tokens",
        "128",
        "--tokens-per-sample",
        "32",
        "--update-freq",
        "2",
        "--lr",
        "0.5",
        "--warmup-updates",
        "3",
        "--warmup-init-lr",
        "1e-7",
        "--min-lr",
        "1e-4",
        "--clip-norm",
        "0.1",
        "--log-interval",
        "1",
        "--no-progress-bar",
        "--seed",
        "3",
        *extra,
    ]


def weights(path):
    return adaptive_lm.from_pretrained(path).model.state_dict()


def test_resume_is_bit_identical_across_an_epoch_boundary(tmp_path, small_data, capsys):
    n = 8
    straight = tmp_path / "straight"
    assert main(tiny_args(small_data, straight, "--max-update", str(n))) == 0
    log = capsys.readouterr().out
    assert "batches/epoch/rank" in log
    per_epoch = int(re.search(r"\| (\d+) batches/epoch/rank", log).group(1))
    assert per_epoch // 2 < n // 2 + n // 2 and per_epoch // 2 < n  # the run crosses an epoch boundary
    split = tmp_path / "split"
    # first half, stopped as an interrupted run would be; then the *same command* resumes from checkpoint_last
    assert main(tiny_args(small_data, split, "--max-update", str(n), "--stop-after-updates", str(n // 2))) == 0
    assert main(tiny_args(small_data, split, "--max-update", str(n))) == 0
    a, b = weights(straight / "checkpoint_last.pt"), weights(split / "checkpoint_last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(straight / "checkpoint_last.pt", weights_only=True)
    cb = torch.load(split / "checkpoint_last.pt", weights_only=True)
    assert ca["train_state"]["num_updates"] == cb["train_state"]["num_updates"] == n
    for name, s in ca["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], cb["optimizer"]["state"][name]["momentum_buffer"])
    lines = [json.loads(x) for x in open(straight / "metrics.jsonl")]
    assert any(x["split"] == "valid" for x in lines)


def test_checkpoint_write_is_atomic(tmp_path, small_data, monkeypatch):
    run = tmp_path / "run"
    assert main(tiny_args(small_data, run, "--max-update", "2")) == 0
    good = (run / "checkpoint_last.pt").read_bytes()

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        main(tiny_args(small_data, run, "--max-update", "4"))
    assert (run / "checkpoint_last.pt").read_bytes() == good
    ck = torch.load(run / "checkpoint_last.pt", weights_only=True)  # plain data only
    assert ck["train_state"]["num_updates"] == 2


def test_unknown_flag_and_bad_data_are_one_line_errors(tmp_path, small_data, capsys):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(small_data, tmp_path, "--max-update", "1", "--no-such-flag"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--no-such-flag" in err and len(err.strip().splitlines()) == 1
    assert main(tiny_args(tmp_path / "nowhere", tmp_path, "--max-update", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "preprocess" in err and len(err.splitlines()) == 1
    big = tiny_args(
        small_data,
        tmp_path,
        "--max-update",
        "1",
        "--adaptive-input-cutoff",
        "20,4000",
        "--adaptive-softmax-cutoff",
        "20,4000",
    )
    assert main(big) == 2
    assert "vocabulary size" in capsys.readouterr().err


def test_seed_recipe_flags_parse_unchanged():
    recipe = """train data-bin/wikitext-103 --task language_modeling --save-dir checkpoints/transformer_wikitext-103
      --arch transformer_lm_wiki103 --max-update 286000 --lr 1.0 --t-mult 2 --lr-period-updates 270000
      --lr-scheduler cosine --lr-shrink 0.75 --warmup-updates 16000 --warmup-init-lr 1e-07 --stop-min-lr 1e-09
      --optimizer nag --min-lr 0.0001 --clip-norm 0.1 --criterion adaptive_loss --max-tokens 3072
      --update-freq 3 --tokens-per-sample 3072 --seed 1 --sample-break-mode none
      --skip-invalid-size-inputs-valid-test --ddp-backend=legacy_ddp"""
    cfg = TrainConfig.from_args(build_parser().parse_args(recipe.split()))
    assert (cfg.lr, cfg.min_lr, cfg.stop_min_lr, cfg.update_freq, cfg.max_tokens) == (1.0, 1e-4, 1e-9, 3, 3072)
    old = TrainConfig.from_args(
        build_parser().parse_args(
            ["train", "d", "--max-lr", "1.0", "--lr", "0.0001", "--min-lr", "1e-09", "--max-tokens", "10"]
        )
    )
    assert (old.lr, old.min_lr, old.stop_min_lr) == (1.0, 1e-4, 1e-9)


NO_DROPOUT = [
    "--dropout",
    "0",
    "--attention-dropout",
    "0",
    "--activation-dropout",
    "0",
    "--adaptive-softmax-dropout",
    "0",
]


@pytest.mark.slow
def test_two_processes_follow_one_process_with_update_freq_2(tmp_path, small_data):
    one = tmp_path / "one"
    assert main(tiny_args(small_data, one, "--max-update", "6", "--update-freq", "2", *NO_DROPOUT)) == 0
    two = tmp_path / "two"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "adaptive_lm",
    ]
    cmd = torchrun + tiny_args(small_data, two, "--max-update", "6", "--update-freq", "1", *NO_DROPOUT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "world 2" in proc.stdout

    def losses(run):
        return [x["loss"] for x in map(json.loads, open(run / "metrics.jsonl")) if x["split"] == "train_inner"]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 6
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 2e-3  # logged rounded to 3 decimals
    w1, w2 = weights(one / "checkpoint_last.pt"), weights(two / "checkpoint_last.pt")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_compile_gives_the_eager_losses_or_falls_back_with_a_warning(tmp_path, small_data, capsys):
    """``--compile`` must never change the numbers (the dropout masks come from the same seeds) nor crash: where
    no C++ compiler exists the trainer says so and continues eagerly."""
    eager = train(
        TrainConfig.from_args(build_parser().parse_args(tiny_args(small_data, tmp_path / "e", "--max-update", "4")))
    )
    capsys.readouterr()
    args = tiny_args(small_data, tmp_path / "c", "--max-update", "4", "--compile")
    compiled = train(TrainConfig.from_args(build_parser().parse_args(args)))
    out = capsys.readouterr()
    fell_back = "--compile failed" in out.out + out.err or "--compile unavailable" in out.out + out.err
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b, fell_back)


def test_cosine_schedule_ending_within_the_warmup_keeps_the_peak_lr():
    """--max-update equal to --warmup-updates (no --lr-period-updates) leaves no cosine period: fairseq divides
    0 by 0 after the last update; here the lr after it is the warmup's peak."""
    from adaptive_lm.optim import CosineSchedule

    s = CosineSchedule(max_lr=0.5, min_lr=1e-4, warmup_updates=3, warmup_init_lr=1e-7, t_mult=2, max_update=3)
    assert [round(s.lr_at(i), 6) for i in range(4)] == [0.0, 0.166667, 0.333333, 0.5]
