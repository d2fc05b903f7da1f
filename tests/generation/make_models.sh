#!/usr/bin/env bash
# Makes the six small language models of tests/generation/models/ with real fairseq (fairseq-fixed 0.12.3.1 in its
# own venv, never a dependency of the project), trained on CPU on WikiText-2's test.txt (read from ../shared, never
# committed):
#   FAIRSEQ_BIN=~/fairseq-venv/bin bash tests/generation/make_models.sh
# The venv also needs `pip install tokenizers sentencepiece` (gpt2bpe and spm models). About 3 minutes on 1 thread.
# Each model folder gets model.pt (no optimizer state, no machine paths) and dict.txt (+ its BPE files), as a hub
# model directory: TransformerLanguageModel.from_pretrained(dir, "model.pt", ...) loads it.
. "$(dirname "$0")/../fixtures/fairseq_env.sh"  # set -euo pipefail, BIN, REPO, TMP (removed at exit)
OUT=$REPO/tests/generation/models
SRC=$REPO/../shared/data/wikitext-2/test.txt
HELP="$BIN/python $REPO/tests/generation/make_models.py"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore

$HELP corpus "$SRC" "$TMP/train.txt" "$TMP/raw.txt"

# training settings shared by all models: 500 Adam updates of 2048 tokens (about 4 passes over the 240k words)
COMMON="--task language_modeling --sample-break-mode none --max-tokens 2048 --optimizer adam --adam-betas (0.9,0.98)
  --lr 0.005 --lr-scheduler inverse_sqrt --warmup-updates 50 --warmup-init-lr 1e-7 --clip-norm 1.0 --weight-decay 0.01
  --max-update 500 --disable-validation --no-epoch-checkpoints --save-interval-updates 0
  --log-format simple --log-interval 100 --cpu --num-workers 0 --seed 1"
ADAPTIVE="--criterion adaptive_loss --ddp-backend legacy_ddp"

train() {  # train NAME DATA_BIN "model flags"
  local name=$1 data=$2 flags=$3
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086
  "$BIN/fairseq-train" "$data" $flags $COMMON --save-dir "$TMP/ckpt-$name" 2>&1 \
    | grep -E "\| (train|train_inner) \|" | sed -E 's/^[0-9-]+ [0-9:]+ \| INFO \| //' | tail -2
  $HELP strip "$TMP/ckpt-$name/checkpoint_last.pt" "$OUT/$name/model.pt"
  cp "$data/dict.txt" "$OUT/$name/dict.txt"
}

# word-level data: the 1,990 most frequent words only (rarer ones and <unk> deleted from the text), 2,000 symbols
"$BIN/fairseq-preprocess" --only-source --trainpref "$TMP/train.txt" --destdir "$TMP/bin-word" --nwordssrc 2000 \
  --workers 1 > /dev/null 2>&1

# wiki_tied: transformer_lm_wiki103 scaled down: pre-LN, adaptive input + adaptive softmax with tied weights and
# projections, no final layer norm (the arch's default), cutoffs 500,1500, factor 4
train wiki_tied "$TMP/bin-word" "--arch transformer_lm_wiki103 --decoder-layers 2 --decoder-embed-dim 48
  --decoder-input-dim 48 --decoder-output-dim 48 --decoder-ffn-embed-dim 96 --decoder-attention-heads 4
  --adaptive-input-cutoff 500,1500 --adaptive-softmax-cutoff 500,1500 --tokens-per-sample 128 $ADAPTIVE"

# Plain --arch transformer_lm takes fairseq 0.12's dataclass defaults (post-LN, decoder input/output dim 512, i.e.
# 512-wide embeddings with project_in/out_dim layers), so the dims are given explicitly.
# postln: plain transformer_lm (post-LN in fairseq 0.12), plain softmax sharing the input embedding, max positions 64
train postln "$TMP/bin-word" "--arch transformer_lm --decoder-layers 2 --decoder-embed-dim 32
  --decoder-input-dim 32 --decoder-output-dim 32 --decoder-ffn-embed-dim 128 --decoder-attention-heads 4
  --share-decoder-input-output-embed --tokens-per-sample 64
  --criterion cross_entropy"

# untied: pre-LN, ordinary embedding input, adaptive softmax without any tying (own head and tail weights), factor 2
train untied "$TMP/bin-word" "--arch transformer_lm --decoder-normalize-before --decoder-layers 2
  --decoder-embed-dim 40 --decoder-input-dim 40 --decoder-output-dim 40 --decoder-ffn-embed-dim 80
  --decoder-attention-heads 4 --adaptive-softmax-cutoff 500,1500
  --adaptive-softmax-factor 2 --tokens-per-sample 128 $ADAPTIVE"

# bos: trained with --add-bos-token (every block starts with <s>), pre-LN, gelu, plain softmax shared
train bos "$TMP/bin-word" "--arch transformer_lm --add-bos-token --decoder-normalize-before --activation-fn gelu
  --decoder-layers 2 --decoder-embed-dim 32 --decoder-input-dim 32 --decoder-output-dim 32 --decoder-ffn-embed-dim 96
  --decoder-attention-heads 2
  --share-decoder-input-output-embed --tokens-per-sample 64 --criterion cross_entropy"

# gpt2bpe: a 1,000-token byte-level BPE in fairseq's GPT-2 format (encoder.json + vocab.bpe), the text encoded with
# fairseq's own gpt2_bpe_utils; transformer_lm_gpt2_tiny (d 64, ffn 64, 2 layers, 1 head, gelu), shared embeddings
mkdir -p "$OUT/gpt2bpe"
$HELP gpt2bpe "$TMP/raw.txt" "$OUT/gpt2bpe" "$TMP/train.gpt2"
"$BIN/fairseq-preprocess" --only-source --trainpref "$TMP/train.gpt2" --destdir "$TMP/bin-gpt2" --workers 1 \
  > /dev/null 2>&1
train gpt2bpe "$TMP/bin-gpt2" "--arch transformer_lm_gpt2_tiny --share-decoder-input-output-embed
  --tokens-per-sample 128 --criterion cross_entropy"

# spm: a 1,000-piece SentencePiece BPE (sentencepiece.bpe.model, fairseq's --bpe sentencepiece), pre-LN, learned
# positions (max 64), gelu, plain softmax shared; input/output dim 64 around a 48-wide decoder (project_in_dim and
# project_out_dim layers)
mkdir -p "$OUT/spm"
$HELP spm "$TMP/raw.txt" "$OUT/spm" "$TMP/train.spm"
"$BIN/fairseq-preprocess" --only-source --trainpref "$TMP/train.spm" --destdir "$TMP/bin-spm" --workers 1 \
  > /dev/null 2>&1
train spm "$TMP/bin-spm" "--arch transformer_lm --decoder-normalize-before --decoder-learned-pos
  --activation-fn gelu --decoder-layers 2 --decoder-embed-dim 48 --decoder-input-dim 64 --decoder-output-dim 64
  --decoder-ffn-embed-dim 96
  --decoder-attention-heads 4 --share-decoder-input-output-embed --tokens-per-sample 64 --criterion cross_entropy"

du -b "$OUT"/*/* | sort -k2
