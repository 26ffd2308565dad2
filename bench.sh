#!/usr/bin/env bash
# The default benchmark: fetches SmolLM2-135M and ShareGPT into ./assets if missing, builds, and
# runs `offline-bench throughput` on the CPU over ShareGPT prompts sampled by vLLM's rules.
# Extra arguments are passed to `offline-bench throughput` (e.g. --num-prompts 100, --output-json r.json).
set -euo pipefail
cd "$(dirname "$0")"
datasets/fetch.sh
cargo build --release --quiet
exec target/release/offline-bench throughput \
  --model assets/SmolLM2-135M-Instruct.Q4_1.gguf \
  --dataset-path assets/ShareGPT_V3_unfiltered_cleaned_split.json \
  "$@"
