"""The fairseq flags a fairseq user reaches for, with fairseq's meaning, and what the training log tells them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from adaptive_lm.cli import build_parser, main
from adaptive_lm.core.corpus import Corpus


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flags")
    c = Corpus(vocab=300, states=6, seed=2)
    c.write(d / "train.txt", 4000)
    c.write(d / "valid.txt", 1200)
    assert main(["preprocess", "--trainpref", str(d / "train.txt"), "--validpref", str(d / "valid.txt"),
                 "--destdir", str(d / "bin"), "--no-progress-bar"]) == 0  # fmt: skip
    return d


def args(data: Path, save: Path, *extra: str) -> list[str]:
    fixed = ["--max-tokens", "256", "--clip-norm", "0.5", "--tokens-per-sample", "32", "--lr", "0.2"]
    return ["train", str(data / "bin"), "--arch", "tiny", "--save-dir", str(save), *fixed, "--no-progress-bar",
            "--log-interval", "1", *extra]  # fmt: skip


def metrics(save: Path) -> list[dict]:
    return [json.loads(x) for x in open(save / "metrics.jsonl")]


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.help == "==SUPPRESS==" or a.dest in ("help",):
                continue
            assert a.help, f"{name} {a.option_strings or a.dest}"


def test_log_has_save_epoch_and_best_lines_and_progress_in_logs(data, tmp_path, capsys):
    save = tmp_path / "s"
    assert (
        main(args(data, save, "--max-epoch", "2", "--lr-period-updates", "50", "--log-file", str(tmp_path / "log.txt")))
        == 0
    )
    out = capsys.readouterr()
    assert re.search(r"saved checkpoint \S+checkpoint1\.pt \(epoch 1 @ \d+ updates, score [\d.]+\)", out.out)
    assert "end_of_epoch 1" in out.out and "best_loss" in out.out  # the epoch summary and the best so far
    logged = (tmp_path / "log.txt").read_text()
    assert "saved checkpoint" in logged and "train_inner" in logged  # --log-file keeps the same lines
    with_progress = [a for a in args(data, tmp_path / "p", "--max-update", "3") if a != "--no-progress-bar"]
    assert main(with_progress) == 0
    err = capsys.readouterr().err
    assert re.search(r"epoch 001: \d+0% \(\d+/\d+ batches", err)  # not a terminal: a line per 10%
    assert re.search(r"valid on 'valid': \d+0%", err) or "valid" in err


def test_keep_best_checkpoints_and_metric(data, tmp_path):
    save = tmp_path / "s"
    assert main(args(data, save, "--max-update", "12", "--validate-interval-updates", "2", "--save-interval-updates",
                     "2", "--keep-best-checkpoints", "2", "--best-checkpoint-metric", "ppl")) == 0  # fmt: skip
    best = sorted(p.name for p in save.glob("checkpoint.best_ppl_*.pt"))
    assert len(best) == 2, best
    assert (save / "checkpoint_best.pt").exists()


def test_no_last_checkpoints_and_no_epoch_checkpoints(data, tmp_path):
    save = tmp_path / "s"
    assert (
        main(
            args(
                data,
                save,
                "--max-epoch",
                "1",
                "--lr-period-updates",
                "50",
                "--no-last-checkpoints",
                "--no-epoch-checkpoints",
            )
        )
        == 0
    )
    assert not (save / "checkpoint_last.pt").exists() and not (save / "checkpoint1.pt").exists()
    assert (save / "checkpoint_best.pt").exists()


def test_validate_after_updates_and_max_valid_steps(data, tmp_path):
    save = tmp_path / "s"
    assert main(args(data, save, "--max-update", "6", "--validate-interval-updates", "1", "--validate-after-updates",
                     "4", "--max-valid-steps", "1", "--batch-size-valid", "2")) == 0  # fmt: skip
    valid = [m for m in metrics(save) if m["split"] == "valid"]
    assert [m["num_updates"] for m in valid] == [4, 5, 6]
    assert all(2 * 32 < m["tokens"] <= 2 * 2 * 32 for m in valid)  # N + 1 = 2 batches of two 32-token blocks, as
    # fairseq counts (it stops at batch i > --max-valid-steps)


def test_stop_time_hours(data, tmp_path):
    save = tmp_path / "s"
    assert main(args(data, save, "--max-update", "1000", "--stop-time-hours", "1e-9")) == 0
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert ck["train_state"]["num_updates"] == 1


def test_train_subset(data, tmp_path, capsys):
    assert main(args(data, tmp_path / "a", "--max-update", "1")) == 0
    a = int(re.search(r"(\d+) training blocks", capsys.readouterr().out).group(1))
    assert main(args(data, tmp_path / "b", "--max-update", "1", "--train-subset", "valid")) == 0
    b = int(re.search(r"(\d+) training blocks", capsys.readouterr().out).group(1))
    assert b < a  # the validation split is the smaller one


@pytest.mark.parametrize("flag", ["--fp16", "--amp"])
def test_fp16_init_scale_and_amp(data, tmp_path, flag):
    save = tmp_path / "s"
    assert main(args(data, save, "--max-update", "2", flag, "--fp16-init-scale", "4")) == 0
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert ck["train_state"]["loss_scale"] == 4.0


def test_finetune_from_model(data, tmp_path, capsys):
    assert main(args(data, tmp_path / "a", "--max-update", "3")) == 0
    base = tmp_path / "a" / "checkpoint_last.pt"
    save = tmp_path / "b"
    assert main(args(data, save, "--max-update", "2", "--finetune-from-model", str(base))) == 0
    assert "fine-tuning from" in capsys.readouterr().out
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    assert ck["train_state"]["num_updates"] == 2  # the update count (and optimizer) started again
    assert main(args(data, save, "--max-update", "3", "--finetune-from-model", str(base))) == 0
    assert "restored" in capsys.readouterr().out  # a save dir with checkpoint_last.pt continues it instead


def test_resuming_with_other_runtime_settings_continues_as_fairseq_train(data, tmp_path, capsys):
    """Settings that shape no weight (dropout, --checkpoint-activations, ...) may change on resume, as fairseq-train
    allows (it builds the model from its command line, then loads the weights); ours had refused them as "its model
    differs from the flags given". The change is noted; a weight's shape still has to match."""
    assert main(args(data, tmp_path / "a", "--max-update", "2")) == 0
    capsys.readouterr()
    assert main(args(data, tmp_path / "a", "--max-update", "3", "--checkpoint-activations", "--dropout", "0.2")) == 0
    out = capsys.readouterr().out
    assert "note: continuing with checkpoint_activations False -> True, dropout" in out
    line = in_process_error(capsys, args(data, tmp_path / "a", "--max-update", "4", "--decoder-ffn-embed-dim", "16"))
    assert "its model differs from the flags given (decoder_ffn_embed_dim" in line  # a weight's shape: refused


def in_process_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_eval_results_path_and_quiet(data, tmp_path, capsys):
    assert main(args(data, tmp_path / "a", "--max-update", "2")) == 0
    capsys.readouterr()
    model = str(tmp_path / "a" / "checkpoint_last.pt")
    assert main(["eval", str(data / "bin"), "--path", model, "--gen-subset", "valid", "--quiet",
                 "--results-path", str(tmp_path / "res"), "--no-progress-bar"]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[-1].startswith("Loss (base 2)")
    written = (tmp_path / "res" / "eval-valid.txt").read_text()
    assert "blocks of 32 new tokens" in written and out[-1] in written


def test_generate_batch_max_len_a_and_bf16(data, tmp_path, capsys):
    assert main(args(data, tmp_path / "a", "--max-update", "2")) == 0
    capsys.readouterr()
    model = str(tmp_path / "a" / "checkpoint_last.pt")
    words = [w.split()[0] for w in (data / "bin" / "dict.txt").read_text().splitlines()[:3]]
    base = ["generate", "--path", model, "--max-len-b", "1", "--max-len-a", "2"]
    # fairseq's limit is a * W + b tokens in all, W = the batch's longest prompt + 1: 2 * 3 + 1 = 7 for both prompts
    # of one call; --min-len at that limit makes every hypothesis reach it (fairseq refuses a larger one)
    assert main([*base, "--min-len", "7", "--prompt", words[0], "--prompt", " ".join(words[:2])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [len(x.split()) for x in lines] == [7, 7]
    assert main([*base, "--min-len", "5", "--prompt", words[0], "--bf16"]) == 0  # W = 2: 5 tokens
    assert len(capsys.readouterr().out.strip().split()) == 5
    assert main([*base, "--min-len", "6", "--prompt", words[0]]) == 2  # one error line, as fairseq's assert


@pytest.mark.parametrize("kernels", ["auto", "plain"])
def test_checkpoint_activations_change_no_number(data, tmp_path, kernels):
    """``--checkpoint-activations`` through the trainer, dropout on: the recomputation in backward draws the same
    dropout masks and runs the same linear kernels as the forward (oneDNN's on our CPU kernels), so every logged
    loss and gradient norm is bit for bit the run's without it."""
    runs = []
    for extra in ([], ["--checkpoint-activations"]):
        save = tmp_path / ("ckpt" if extra else "plain")
        assert main(args(data, save, "--max-update", "4", "--kernels", kernels, *extra)) == 0
        runs.append([(m["loss"], m["gnorm"]) for m in metrics(save) if m["split"] == "train_inner"])
    assert len(runs[0]) == 4 and runs[0] == runs[1]


# ---- fairseq-train's rules where an audit found ours different ---------------------------------------------------
def test_the_best_checkpoint_moves_only_when_a_checkpoint_is_saved(data, tmp_path):
    """fairseq's ``save_checkpoint.best`` changes only inside ``save_checkpoint``: with --save-interval 2 the first
    epoch's validation is not a candidate, so checkpoint_best.pt is the second epoch's (ours had kept epoch 1's
    value as the best and, never saving it, wrote no checkpoint_best.pt)."""
    save = tmp_path / "s"
    assert main(args(data, save, "--max-epoch", "3", "--save-interval", "2", "--lr-period-updates", "60")) == 0
    best = torch.load(save / "checkpoint_best.pt", weights_only=True)["train_state"]
    assert best["epoch"] == 2 and best["best_val"] == round(best["best_val"], 3)  # the logged (rounded) loss
    valid = [m for m in metrics(save) if m["split"] == "valid"]
    assert valid[2]["best_loss"] == min(valid[1]["loss"], valid[2]["loss"])  # epoch 1 was never a candidate


def test_reset_optimizer_forgets_the_best_as_fairseq(data, tmp_path):
    """fairseq restores ``save_checkpoint.best`` only without --reset-optimizer and --reset-meters (ours had kept it
    with --reset-optimizer); the training time is restored whatever is reset (fairseq's previous_training_time)."""
    from adaptive_lm.cli.train import train_config
    from adaptive_lm.training.loop import train

    save = tmp_path / "s"
    assert main(args(data, save, "--max-epoch", "1", "--lr-period-updates", "60")) == 0
    first = torch.load(save / "checkpoint_last.pt", weights_only=True)["train_state"]
    for flags, best in (((), first["best_val"]), (("--reset-optimizer",), None), (("--reset-meters",), None)):
        seen: list[tuple] = []
        record = seen.append
        cfg = train_config(build_parser().parse_args(args(data, save, "--max-epoch", "1", "--lr-period-updates", "60",
                                                          *flags)))  # fmt: skip
        train(cfg, on_start=lambda t, record=record: record((t.state.best_val, t.state.train_seconds)))
        assert seen == [(best, first["train_seconds"])], flags


def test_update_freq_lists_and_long_validation_samples(data, tmp_path, capsys):
    """fairseq's per-epoch --update-freq lists run (tests/test_train.py compares them with fairseq-train);
    validation samples longer than --tokens-per-sample stop fairseq unless skipped, and ours."""
    assert main(args(data, tmp_path / "a", "--max-update", "1", "--update-freq", "2,2")) == 0
    assert main(args(data, tmp_path / "b", "--max-update", "1", "--update-freq", "1,2")) == 0
    d = tmp_path / "long"
    (d / "txt").mkdir(parents=True)
    short = [x for x in (data / "train.txt").read_text().splitlines() if len(x.split()) < 30]
    (d / "txt" / "train.txt").write_text("\n".join(short) + "\n")
    (d / "txt" / "valid.txt").write_text("\n".join([short[0], " ".join(short[:8])]) + "\n")  # one line > 32 words
    txt = d / "txt"
    pre = ["preprocess", "--trainpref", str(txt / "train.txt"), "--validpref", str(txt / "valid.txt"), "--srcdict",
           str(data / "bin" / "dict.txt"), "--destdir", str(d / "bin"), "--no-progress-bar"]  # fmt: skip
    assert main(pre) == 0
    eos = ("--max-update", "1", "--sample-break-mode", "eos")
    assert main(args(d, tmp_path / "c", *eos)) == 2
    assert "1 samples longer than --tokens-per-sample 32" in capsys.readouterr().err
    assert main(args(d, tmp_path / "d", *eos, "--skip-invalid-size-inputs-valid-test")) == 0


def test_the_scheduler_fairseq_defaults_to_is_named(data, tmp_path, capsys):
    assert main(args(data, tmp_path / "a", "--max-update", "1")) == 0
    note = "no --lr-scheduler given: cosine (fairseq-train's default is fixed: --lr-scheduler fixed)"
    assert note in capsys.readouterr().out
    assert main(args(data, tmp_path / "b", "--max-update", "1", "--lr-scheduler", "cosine")) == 0
    assert "no --lr-scheduler given" not in capsys.readouterr().out


def test_a_checkpoint_of_the_previous_format_resumes_with_its_best_converted(data, tmp_path):
    """Before stop 36 the best was kept as the loss in bits whatever --best-checkpoint-metric said (and without a
    separate patience best); resumed with ppl it must become the rounded perplexity, not be compared raw."""
    from adaptive_lm.cli.train import train_config
    from adaptive_lm.core.metrics import perplexity
    from adaptive_lm.training.loop import train

    save = tmp_path / "s"
    flags = ("--lr-period-updates", "60", "--best-checkpoint-metric", "ppl")
    assert main(args(data, save, "--max-epoch", "1", *flags)) == 0
    ck = torch.load(save / "checkpoint_last.pt", weights_only=True)
    bits = [m for m in metrics(save) if m["split"] == "valid"][-1]["loss"]
    ck["train_state"]["best_val"] = bits  # the old format: bits, no patience_best
    del ck["train_state"]["patience_best"]
    torch.save(ck, save / "checkpoint_last.pt")
    seen: list[tuple] = []
    cfg = train_config(build_parser().parse_args(args(data, save, "--max-epoch", "1", *flags)))
    train(cfg, on_start=lambda t: seen.append((t.state.best_val, t.state.patience_best)))
    assert seen == [(round(perplexity(bits), 2), round(perplexity(bits), 2))]


def test_fairseq_launcher_flags_and_a_half_set_environment_point_to_torchrun(data, tmp_path, capsys, monkeypatch):
    """fairseq-train's own launcher flags had been 'unrecognized arguments', and WORLD_SIZE without torchrun's
    MASTER_ADDR/PORT a traceback inside init_process_group: one line each, naming torchrun."""
    for flag in (["--distributed-world-size", "2"], ["--distributed-no-spawn"], ["--device-id", "0"]):
        with pytest.raises(SystemExit) as e:
            main(args(data, tmp_path / "run", *flag))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and f"{flag[0]}: processes are started by torchrun here" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(args(data, tmp_path / "run", "--max-update", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "adaptive-lm train: error: WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT not set: start the "
        "processes with torchrun (torchrun --nproc_per_node N -m adaptive_lm train ...), which sets them"
    )
