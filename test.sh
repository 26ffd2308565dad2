#!/usr/bin/env bash
# The test suite: fetches the real small model, ShareGPT and the Llama-3 tokenizer into ./assets
# if missing, then runs every test (release build: the tests run the real model), the CUDA
# kernels' among them on the CPU emulator (feature `simt`: kernels/simt, needs g++).
set -euo pipefail
cd "$(dirname "$0")"
datasets/fetch.sh
exec cargo test --release --features simt "$@"
