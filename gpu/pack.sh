#!/usr/bin/env bash
# Builds the CUDA binary on this machine (no GPU needed), packs what a GPU host needs into
# .gpu/ (under 64 MiB: the binary, the CUDA criterion bench and the Llama-3 tokenizer gzipped,
# sampled workloads, gpu/host-run.sh),
# and prints the command the GPU host runs. The host needs the NVIDIA driver and CUDA 13.0
# libraries, but neither Rust, the dataset, the tokenizer's source nor the model weights
# (llama-3-8b runs with --load-format dummy).
set -euo pipefail
cd "$(dirname "$0")/.."
datasets/fetch.sh
cargo fetch --quiet
# The workloads of the runs, sampled and tokenized here by the CPU build (the CUDA build needs the
# driver library to start, which this machine lacks; the dataset does not fit in a run anyway).
cargo build --release --quiet
mkdir -p .gpu
for ds in chat sharegpt; do
  target/release/offline-bench throughput --quiet --model llama-3-8b \
    --tokenizer assets/llama3-tokenizer/tokenizer.json \
    --dataset-name "$ds" --dataset-path assets/ShareGPT_V3_unfiltered_cleaned_split.json \
    --num-prompts 1000 --seed 0 --dry-run --save-workload ".gpu/$ds-llama3-1000.json"
done
# A portable CPU level for the host's CPU (not this machine's), set before the toolchain script
# appends its -L flags.
export RUSTFLAGS="-C target-cpu=x86-64-v3"
# shellcheck source=gpu/cuda-toolchain.sh
source gpu/cuda-toolchain.sh
export CARGO_TARGET_DIR=target/cuda
# The binary and the CUDA criterion bench in one build (the bench's dev-dependencies change the
# features of crates both use, so building them apart would compile candle twice).
artifacts=$(cargo build --release --features cuda --bin offline-bench --bench attention \
  --message-format=json-render-diagnostics)
bin=target/cuda/release/offline-bench
bench=$(python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "attention" \
            and m.get("executable"):
        print(m["executable"])' <<<"$artifacts")
[ -n "$bench" ] || { echo "error: cargo named no executable for the attention bench" >&2; exit 1; }

# Compressed: the binary's embedded PTX text shrinks 4x; run.sh unpacks on the host.
strip -o .gpu/offline-bench "$bin"
gzip -9 -f .gpu/offline-bench
strip -o .gpu/bench-attention "$bench"
gzip -9 -f .gpu/bench-attention
gzip -9 -c assets/llama3-tokenizer/tokenizer.json > .gpu/llama3-tokenizer.json.gz
cp gpu/host-run.sh .gpu/run.sh
git rev-parse HEAD > .gpu/commit.txt
size=$(du -sm .gpu | cut -f1)
echo "packed .gpu/ ($size MiB; the limit for one run is 64 MiB)"
[ "$size" -lt 64 ] || { echo "error: .gpu/ is over 64 MiB" >&2; exit 1; }
cat <<'MSG'
On a GPU host (results in .gpu/gpu-results, or packed into $OUT/results.tgz where OUT is set):
    bash .gpu/run.sh
With a lent machine of 15 minutes in all (docs/gpu.md): carry [".gpu"], timeout_s 580,
    BUDGET_S=560 STEP_TIMEOUT=240 bash .gpu/run.sh self-check chat shapes
then at once, while it is warm:
    SKIP_CHECK=1 BUDGET_S=<seconds left - 30> bash .gpu/run.sh bench sharegpt
MSG
