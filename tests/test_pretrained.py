"""Every fairseq layout, safe loading, conversion both ways, archives and the resumable download."""

from __future__ import annotations

import argparse
import gzip
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import pytest
import torch

import adaptive_lm
from adaptive_lm import build_model
from adaptive_lm.cli import main
from adaptive_lm.core.dictionary import Dictionary
from adaptive_lm.core.errors import UserError
from adaptive_lm.core.fairseq_format import safe_load, stored_settings, to_fairseq_checkpoint
from adaptive_lm.inference.download import fetch, safe_extract
from adaptive_lm.inference.hub import LanguageModel


def outputs(lm, ids=(2, 5, 30, 4, 11, 3, 40, 9)):
    with torch.no_grad():
        return lm.model.log_probs(torch.tensor([list(ids)]))


def tiny_lm(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    d = Dictionary.from_counts({f"w{i}": 100 - i for i in range(60)})
    return LanguageModel(build_model("tiny", len(d), **overrides).eval(), d, "", 64)


def save_fairseq(tmp_path, ckpt, d):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, tmp_path / "model.pt")
    d.save(tmp_path / "dict.txt")
    return tmp_path / "model.pt"


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tied embeddings and projections (wiki103)
        {"tie_adaptive_proj": False},  # tied embeddings, own projections (the wav2letter LM's setting)
        {"tie_adaptive_weights": False, "tie_adaptive_proj": False},  # nothing tied
        {"no_decoder_final_norm": False, "decoder_learned_pos": True},
        {"adaptive_input": False, "tie_adaptive_weights": False, "tie_adaptive_proj": False},
    ],
)
def test_fairseq_layout_round_trip(tmp_path, overrides):
    lm = tiny_lm(**overrides)
    path = save_fairseq(tmp_path, to_fairseq_checkpoint(lm.model, lm.cfg, lm.tokens_per_sample), lm.dictionary)
    back = adaptive_lm.from_pretrained(path)
    torch.testing.assert_close(outputs(back), outputs(lm), atol=1e-5, rtol=0)  # transposes change matmul order
    if lm.cfg.tie_adaptive_weights:
        assert back.model.adaptive_softmax.word_weight is back.model.embed_tokens.embeddings[0].weight


def test_old_args_namespace_layout_with_pre2020_names(tmp_path, fixture_dir):
    ref = adaptive_lm.from_pretrained(fixture_dir / "model" / "checkpoint_last.pt")
    ck = safe_load(fixture_dir / "model" / "checkpoint_last.pt")
    s = stored_settings(ck)
    for k in ("tie_adaptive_proj", "no_decoder_final_norm"):
        s.pop(k)
    s.update(arch="transformer_lm_gbw", no_tie_adaptive_proj=False, max_lr=1.0, lr=[0.0001], min_lr=1e-9)
    sd = dict(ck["model"])
    sd.pop("decoder.adaptive_softmax.head._float_tensor")  # older files lack some buffers
    old = {"args": argparse.Namespace(**s), "model": sd, "optimizer_history": [{"num_updates": 5}]}
    path = save_fairseq(tmp_path, old, ref.dictionary)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain weights_only refuses the Namespace ...
    lm = adaptive_lm.from_pretrained(path)  # ... our allow-list takes it, and nothing else
    assert lm.cfg.tie_adaptive_proj and lm.cfg.no_decoder_final_norm and lm.cfg.decoder_layers == 2
    torch.testing.assert_close(outputs(lm), outputs(ref), atol=0, rtol=0)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/adaptive_lm_pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    marker = Path("/tmp/adaptive_lm_pwned")
    marker.unlink(missing_ok=True)
    path = save_fairseq(tmp_path, {"args": None, "cfg": {}, "model": {}, "extra": Exploit()}, Dictionary())
    with pytest.raises(UserError, match=r"refused to load: the file pickles .*system") as e:
        adaptive_lm.from_pretrained(path)
    print(e.value)
    assert not marker.exists()
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()


def test_tar_members_escaping_are_refused(tmp_path):
    archive = tmp_path / "evil.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        data = b"x"
        info = tarfile.TarInfo("../evil.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def make_archive(tmp_path, fixture_dir, dict_in_databin=True) -> Path:
    src = tmp_path / "src" / "adaptive_lm_tiny"
    (src / "data-bin").mkdir(parents=True)
    (src / "model.pt").write_bytes((fixture_dir / "model" / "checkpoint_last.pt").read_bytes())
    where = src / "data-bin" / "dict.txt" if dict_in_databin else src / "dict.txt"
    where.write_bytes((fixture_dir / "model" / "dict.txt").read_bytes())
    archive = tmp_path / "adaptive_lm_tiny.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(src, arcname="adaptive_lm_tiny")
    return archive


def test_archive_with_dict_under_data_bin_loads(tmp_path, fixture_dir, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LM_CACHE", str(tmp_path / "cache"))
    lm = adaptive_lm.from_pretrained(make_archive(tmp_path, fixture_dir))
    ref = adaptive_lm.from_pretrained(fixture_dir / "model" / "checkpoint_last.pt")
    torch.testing.assert_close(outputs(lm), outputs(ref), atol=0, rtol=0)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pt").write_bytes((fixture_dir / "model" / "checkpoint_last.pt").read_bytes())
    with pytest.raises(UserError, match=r"no dict.txt found \(tried .*alone/dict.txt, .*data-bin/dict.txt"):
        adaptive_lm.from_pretrained(alone / "model.pt")


def test_an_archive_renamed_without_its_extension_loads(tmp_path, fixture_dir, monkeypatch):
    """User need 4: a released archive saved without its extension is recognised by its bytes (bzip2, gzip or a
    plain tar) and extracted, not refused as "an archive, not a checkpoint"."""
    monkeypatch.setenv("ADAPTIVE_LM_CACHE", str(tmp_path / "cache"))
    ref = outputs(adaptive_lm.from_pretrained(fixture_dir / "model" / "checkpoint_last.pt"))
    bz2 = make_archive(tmp_path, fixture_dir)
    for mode in ("w:bz2", "w:gz", "w:"):
        bare = tmp_path / f"adaptive_lm_tiny_{mode[2:] or 'tar'}"
        with tarfile.open(bz2) as src, tarfile.open(bare, mode) as dst:
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        torch.testing.assert_close(outputs(adaptive_lm.from_pretrained(bare)), ref, atol=0, rtol=0)
    gz = tmp_path / "checkpoint_last.pt.gz"  # a compressed checkpoint is no archive: said as what it is
    gz.write_bytes(gzip.compress((fixture_dir / "model" / "checkpoint_last.pt").read_bytes()))
    with pytest.raises(UserError, match="a bzip2/gzip-compressed file, not a checkpoint; .* needs bunzip2/gunzip"):
        adaptive_lm.from_pretrained(gz)


def test_convert_to_folder_and_back_to_fairseq(tmp_path, fixture_dir):
    src = fixture_dir / "model" / "checkpoint_last.pt"
    ref = adaptive_lm.from_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "folder")]) == 0
    from safetensors.torch import load_file

    st = load_file(str(tmp_path / "folder" / "model.safetensors"))
    assert "adaptive_softmax.word_weight" not in st and "adaptive_softmax.tail_out.0" not in st  # tied: once
    assert sum(v.numel() for v in st.values()) == ref.model.num_parameters()
    folder = adaptive_lm.from_pretrained(tmp_path / "folder")
    torch.testing.assert_close(outputs(folder), outputs(ref), atol=0, rtol=0)
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "fs"), "--to", "fairseq"]) == 0
    ours = torch.load(tmp_path / "fs" / "model.pt", weights_only=True)["model"]
    real = safe_load(src)["model"]
    assert ours.keys() == real.keys()  # the same keys, shapes and dtypes as a real fairseq checkpoint
    for k in real:
        assert ours[k].shape == real[k].shape and ours[k].dtype == real[k].dtype, k
    again = adaptive_lm.from_pretrained(tmp_path / "fs" / "model.pt")
    torch.testing.assert_close(outputs(again), outputs(ref), atol=0, rtol=0)


def test_load_into_target_dtype(fixture_dir):
    lm = adaptive_lm.from_pretrained(fixture_dir / "model" / "checkpoint_last.pt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.model.adaptive_softmax.tail_out[1] is lm.model.embed_tokens.embeddings[2].weight
    with torch.no_grad():
        out = lm.model.log_probs(torch.tensor([[2, 5, 9]]))
    assert torch.isfinite(out).all()


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours ``Range: bytes=N-`` (as the real CDN does)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


def test_download_resumes_verifies_and_caches(tmp_path, fixture_dir, monkeypatch):
    monkeypatch.setenv("ADAPTIVE_LM_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    archive = make_archive(tmp_path, fixture_dir)
    archive.rename(served / "adaptive_lm_wiki103.v2.tar.bz2")
    data = (served / "adaptive_lm_wiki103.v2.tar.bz2").read_bytes()
    handler = lambda *a, **k: RangeHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        dest = tmp_path / "dl"
        dest.mkdir()
        (dest / "adaptive_lm_wiki103.v2.tar.bz2.part").write_bytes(data[: len(data) // 2])  # an interrupted run
        folder = fetch("wiki103", dest, url, progress=False)
        assert (dest / "adaptive_lm_wiki103.v2.tar.bz2").read_bytes() == data
        assert (folder / "model.pt").is_file()
        lm = adaptive_lm.from_pretrained(folder)
        assert len(lm.dictionary) == 6000
        (served / "adaptive_lm_wiki103.v2.tar.bz2").unlink()  # cached: no second download
        assert fetch("wiki103", dest, url, progress=False) == folder
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="cannot reach .* no network"):
        fetch("gbw", tmp_path / "nonet", url, progress=False)


def test_raw_text_through_the_moses_tokenizer(fixture_dir):
    pytest.importorskip("sacremoses", reason="the [tokenize] extra (sacremoses) is part of the dev install")
    path = fixture_dir / "model" / "checkpoint_last.pt"
    raw = adaptive_lm.from_pretrained(path, tokenizer="moses")
    plain = adaptive_lm.from_pretrained(path)
    assert raw.tokenize("It cost 1,000.5 dollars for a state-of-the-art car.") == (
        "It cost 1 @,@ 000 @.@ 5 dollars for a state @-@ of @-@ the @-@ art car ."
    )
    a = raw.score("Barack Obama was born in Hawaii.")
    b = plain.score("Barack Obama was born in Hawaii .")
    assert torch.equal(a["tokens"], b["tokens"])
    torch.testing.assert_close(a["positional_scores"], b["positional_scores"], atol=0, rtol=0)
    assert raw.decode(raw.encode("a state-of-the-art song.")) == "a state-of-the-art song."  # every word known


def test_loading_a_model_imports_neither_torchdynamo_nor_symbolic_shapes(tmp_path):
    """Building a model to load into happens on the meta device, where a ``normal_`` draw, an ``arange``, a
    ``tensor`` or ``skip_init``'s ``to_empty`` runs through a Python reference that imports TorchDynamo or torch.fx's
    symbolic shapes (0.7 + 0.2 s of every command that loads a model, a third of the fixture's evaluation end to
    end). fairseq checkpoints with adaptive input and sinusoidal positions, post-LN, and a char-CNN input (its byte
    table made after loading: the same outputs as the model saved), and a fresh model, in a fresh process."""
    import subprocess
    import sys

    from adaptive_lm.core.model.lm import TransformerLM, make_config

    torch.manual_seed(0)
    d = Dictionary.from_counts({f"w{i}": 100 - i for i in range(60)})
    off = dict(adaptive_input=False, tie_adaptive_weights=False, tie_adaptive_proj=False)
    cfg = make_config("tiny", len(d), character_embeddings=True, **off)
    chars = LanguageModel(TransformerLM(cfg, d.symbols).eval(), d, "", 64)
    char_path = save_fairseq(tmp_path, to_fairseq_checkpoint(chars.model, chars.cfg, 64), chars.dictionary)
    torch.testing.assert_close(outputs(adaptive_lm.from_pretrained(char_path)), outputs(chars), atol=1e-5, rtol=0)
    fixtures = Path(__file__).parent / "fixtures"
    code = """
import sys
import adaptive_lm
for path in sys.argv[1:]:
    lm = adaptive_lm.from_pretrained(path)
    assert lm.score("the")["positional_scores"].isfinite().all()
adaptive_lm.build_model("tiny", 64)  # a fresh model (training), on the CPU
print(sorted(m for m in ("torch._dynamo", "torch.fx.experimental.symbolic_shapes") if m in sys.modules))
"""
    paths = [fixtures / "fairseq_tiny" / "model" / "checkpoint_last.pt", fixtures / "fairseq_postln" / "checkpoint.pt"]
    paths.append(char_path)
    p = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_knnlms_keytype_override_names_the_datastore_option(fixture_dir):
    """User need 25: knnlm's scripts pass ``--model-overrides "{'knn_keytype': 'last_ffn_input'}"``; the refusal
    names what does that here, and any other unknown override is refused by name."""
    path = fixture_dir / "model" / "checkpoint_last.pt"
    for kw in ({"overrides": {"knn_keytype": "last_ffn_input"}}, {"knn_keytype": "last_ffn_input"}):
        with pytest.raises(UserError, match=r"knn_keytype is knnlm's .*knn-store --keytype last_ffn_input.*KeyCapture"):
            adaptive_lm.from_pretrained(path, **kw)
    with pytest.raises(UserError, match=r"unknown override\(s\) not_a_field \(ModelConfig fields or the stored"):
        adaptive_lm.from_pretrained(path, overrides={"not_a_field": 1})
