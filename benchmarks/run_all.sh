#!/usr/bin/env bash
# Every side-by-side workload on this machine, natively then under the AVX2 caps, one at a time (2 cores: a second
# job would share them); results/*_<name>[_avx2].json.
#   benchmarks/run_all.sh NAME [FAIRSEQ_BIN]     e.g. benchmarks/run_all.sh f ~/fairseq-venv/bin
# bench_rescore and bench_generate write fixed names (rescore[_avx2].json, generate[_avx2].json): their output is
# copied to the machine's names and the committed files are restored. --no-bf16: fp32 only (the targets' dtype).
set -euo pipefail
name=${1:?usage: benchmarks/run_all.sh NAME [FAIRSEQ_BIN]}
fb=${2:-$HOME/fairseq-venv/bin}
cd "$(dirname "$0")"
run() {  # $1: suffix of the capped files ("" natively); the rest: the environment
  local sfx=$1
  shift
  env "$@" python3 bench_train.py --fairseq-bin "$fb" --configs small,medium --repeats 2 --no-bf16 --out "train_$name"
  env "$@" python3 bench_eval.py --fairseq-bin "$fb" --models fixture --no-bf16 --repeats 3 --out "eval_fixture_$name"
  for bench in rescore generate; do
    extra=()
    [ "$bench" = generate ] && extra=(--repeats 3 --larger)
    env "$@" python3 "bench_$bench.py" --fairseq-python "$fb/python" "${extra[@]}"
    cp "results/$bench$sfx.json" "results/${bench}_$name$sfx.json"
    git checkout --quiet -- "results/$bench$sfx.json" 2>/dev/null || true
  done
}
run "" PATH="$PATH"
run _avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
