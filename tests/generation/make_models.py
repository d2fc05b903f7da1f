"""Helpers for make_models.sh (run with the side venv's Python, which has fairseq, tokenizers and sentencepiece).

Subcommands (all paths explicit; nothing here is imported by the project):
  corpus SRC WORDS RAW    WikiText text -> one paragraph a line (see corpus())
  gpt2bpe TEXT DIR OUT    train a tiny byte-level BPE (HF tokenizers), write DIR/encoder.json + DIR/vocab.bpe in
                          fairseq's GPT-2 format, encode TEXT with fairseq's own gpt2_bpe_utils into OUT
  spm TEXT DIR OUT        train a tiny SentencePiece BPE model DIR/sentencepiece.bpe.model, encode TEXT into OUT
  strip CKPT OUT          copy a fairseq checkpoint without optimizer state and without machine paths
"""

import io
import json
import os
import sys
import tempfile
from collections import Counter


def corpus(src: str, out_words: str, out_raw: str) -> None:
    """Paragraph lines only (headings would teach the tiny models to emit '= =' runs), in two versions.

    out_words keeps only the 1,990 most frequent words (WikiText's '<unk>' and every rarer word deleted, not replaced):
    trained on text full of '<unk>', a 2,000-word model's beam search only emits '<unk> <unk> ...'. With 4 specials
    fairseq-preprocess --nwordssrc 2000 then keeps every word, padded to 2,000 symbols with madeupword0000..0005.
    out_raw only deletes the '<unk>' tokens (for the BPE models, which would otherwise spell '<unk>' out).
    """
    with open(src, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line and not line.startswith("=")]
    counts = Counter(w for line in lines for w in line.split() if w != "<unk>")
    keep = {w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:1990]}
    with open(out_words, "w", encoding="utf-8") as g, open(out_raw, "w", encoding="utf-8") as h:
        for line in lines:
            g.write(" ".join(w for w in line.split() if w in keep) + "\n")
            h.write(" ".join(w for w in line.split() if w != "<unk>") + "\n")
    print(f"corpus: {len(lines)} lines -> {out_words}, {out_raw}")


def gpt2bpe(text: str, out_dir: str, out: str) -> None:
    """Byte-level BPE with GPT-2's byte alphabet and pre-tokenizer (HF's ByteLevel), exported as fairseq expects."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train([text], vocab_size=1000, min_frequency=2, show_progress=False, special_tokens=[])
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = tok.save_model(tmp)
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = [m for m in f.read().split("\n") if m and not m.startswith("#version")]
    with open(os.path.join(out_dir, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    # fairseq's get_encoder reads bpe_data.split("\n")[1:-1]: a header line first and a final newline
    with open(os.path.join(out_dir, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))

    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    enc = get_encoder(os.path.join(out_dir, "encoder.json"), os.path.join(out_dir, "vocab.bpe"))
    n = 0
    # as fairseq's examples/roberta/multiprocessing_bpe_encoder.py: line.strip(), bpe.encode, ids joined by spaces
    with open(text, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            ids = enc.encode(line.strip())
            g.write(" ".join(map(str, ids)) + "\n")
            n += len(ids)
    print(f"gpt2bpe: {len(vocab)} tokens, {len(merges)} merges, {n} BPE tokens -> {out}")


def spm(text: str, out_dir: str, out: str) -> None:
    """SentencePiece BPE, saved under the file name fairseq's hub looks for (sentencepiece.bpe.model)."""
    import sentencepiece as sp

    path = os.path.join(out_dir, "sentencepiece.bpe.model")
    model = io.BytesIO()  # sentences and model through Python: the file records no machine path (input, prefix)
    with open(text, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    sp.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC table in the model file (250 kB -> 20 kB); the text is NFC
        seed_sentencepiece_size=100000,
        num_threads=1,
        minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())
    proc = sp.SentencePieceProcessor()
    proc.Load(path)
    n = 0
    # as fairseq's SentencepieceBPE.encode: pieces (out_type=str) joined by spaces
    with open(text, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            pieces = proc.Encode(line.strip(), out_type=str)
            g.write(" ".join(pieces) + "\n")
            n += len(pieces)
    print(f"spm: {proc.GetPieceSize()} pieces, {n} tokens -> {out}")


def strip(ckpt: str, out: str) -> None:
    """Weights and settings only: no optimizer state (halves the size) and no temporary directory names."""
    import torch

    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    ck["last_optimizer_state"] = None
    ck["extra_state"] = {"epoch": ck.get("extra_state", {}).get("epoch", 1)}
    cfg = ck["cfg"]
    cfg["task"]["data"] = "."
    cfg["checkpoint"]["save_dir"] = "checkpoints"
    torch.save(ck, out)
    print(f"strip: {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"corpus": corpus, "gpt2bpe": gpt2bpe, "spm": spm, "strip": strip}[cmd](*args)
