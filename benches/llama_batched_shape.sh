#!/usr/bin/env bash
# The shape llama.cpp's llama-batched-bench reports as PP 128, TG 128, B 32: 32 sequences of 128
# prompt + 128 generated tokens at once, on SmolLM2-135M; benches/vs_llama_cpp.sh runs llama.cpp's
# own tool beside it. Runs it RUNS times (default 5) and prints each run's total tokens/s and the
# median; extra arguments go to `offline-bench throughput` (e.g. --dtype bf16). A benchmark, not
# a test: nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${RUNS:-5}"
datasets/fetch.sh
cargo build --release --quiet
rates=()
for i in $(seq "$runs"); do
  line=$(target/release/offline-bench throughput --quiet \
    --model assets/SmolLM2-135M-Instruct.Q4_1.gguf \
    --dataset-name random --input-len 128 --output-len 128 \
    --num-prompts 32 --max-num-seqs 32 "$@" | grep '^Throughput:')
  rate=$(echo "$line" | sed -E 's/.* ([0-9.]+) total tokens\/s.*/\1/')
  echo "run $i: $line" >&2
  rates+=("$rate")
done
printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "median total tokens/s over %d runs: %.1f\n", NR, m}'
