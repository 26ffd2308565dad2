#!/usr/bin/env bash
# offline-bench against llama.cpp on this machine, the llama-batched-bench shape (PP 128, TG 128,
# B 32: 32 sequences of 128 prompt + 128 generated tokens, SmolLM2-135M, all threads), in
# alternating rounds (this kind of machine drifts too much for figures taken minutes apart):
# llama.cpp with the Q4_1 GGUF and with it converted to Q8_0, BF16 and F32 (llama-quantize
# --allow-requantize), then offline-bench (benches/llama_batched_shape.sh) with --dtype f32, bf16,
# --quantization int8 (Q8_0's scheme with f32 scales) with --dtype f32 and bf16 (bf16 products:
# on AMX from 13 rows), and --quantization int4 (Q4_1's scheme with f32 scales and minimums, the
# LM head int8), also with both dtypes; the quantized runs need AVX-512 or AVX2 and FMA (skipped
# elsewhere, where they are refused). Prints each run's total tokens/s and the medians. A
# benchmark, not a test.
#
# llama.cpp is the copy vendored in the llama-cpp-python 0.3.36 source package on PyPI (llama.cpp
# commit 0c1e570), built here with cmake into assets/llama.cpp (about 10 minutes on 2 cores,
# once); cmake comes from PyPI when missing. ROUNDS sets the rounds (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-3}"
datasets/fetch.sh
model=assets/SmolLM2-135M-Instruct.Q4_1.gguf
dir=assets/llama.cpp
src="$dir/llama_cpp_python-0.3.36/vendor/llama.cpp"
bin="$src/build/bin"
sdist_url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz"
sdist_sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

if [ ! -x "$bin/llama-batched-bench" ] || [ ! -x "$bin/llama-quantize" ]; then
  mkdir -p "$dir"
  if [ ! -d "$src" ]; then
    echo "fetching llama-cpp-python 0.3.36 (source package)" >&2
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "$sdist_url" "$dir/sdist.tar.gz"
    echo "$sdist_sha  $dir/sdist.tar.gz" | sha256sum --check --status ||
      { echo "error: $dir/sdist.tar.gz does not have the expected sha256" >&2; exit 1; }
    tar -xzf "$dir/sdist.tar.gz" -C "$dir"
    rm "$dir/sdist.tar.gz"
  fi
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake
  echo "building llama.cpp (llama-batched-bench, llama-quantize)" >&2
  # Its compiler warnings go to the log; a failure shows the log's end. AMX is left out: the
  # native build's AMX matmul crashed on an Intel Xeon build machine with it (2026-11).
  log="$dir/build.log"
  flags=""
  if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  fi
  { cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" &&
    cmake --build "$src/build" -j "$(nproc)" --target llama-batched-bench llama-quantize; } \
    >"$log" 2>&1 || { tail -n 20 "$log" >&2; echo "error: building llama.cpp failed ($log)" >&2; exit 1; }
fi
runlog="$dir/last-run.log"
fail() { # what
  tail -n 20 "$runlog" >&2
  echo "error: $1 failed (its output: $runlog)" >&2
  exit 1
}
for t in Q8_0 BF16 F32; do
  out="$dir/SmolLM2-135M-Instruct.$t.gguf"
  [ -f "$out" ] && continue
  "$bin/llama-quantize" --allow-requantize "$model" "$out.part" "$t" >"$runlog" 2>&1 ||
    fail "llama-quantize to $t"
  mv "$out.part" "$out"
done

declare -A rates
record() { # name rate
  echo "round $i, $1: $2 total tokens/s" >&2
  rates[$1]="${rates[$1]:-} $2"
}
for i in $(seq "$rounds"); do
  for t in Q4_1 Q8_0 BF16 F32; do
    gguf="$dir/SmolLM2-135M-Instruct.$t.gguf"
    [ "$t" != Q4_1 ] || gguf="$model"
    # The table's last row; its last column is S, total tokens over total time.
    "$bin/llama-batched-bench" -m "$gguf" -c 8192 -npp 128 -ntg 128 -npl 32 -t "$(nproc)" \
      >"$runlog" 2>&1 || fail "llama-batched-bench on $gguf"
    row=$(grep '^|' "$runlog" | tail -n 1)
    record "llama.cpp $t" "$(echo "$row" | awk -F'|' '{gsub(/ /, "", $(NF-1)); print $(NF-1)}')"
  done
  for cfg in "f32" "bf16" "int8" "int8-bf16" "int4" "int4-bf16"; do
    flags=(--dtype "$cfg")
    case "$cfg" in
      int8 | int8-bf16 | int4 | int4-bf16)
        # As `gemm::panels_run_here`: AVX-512 BW, or AVX2 and FMA.
        grep -qw avx512bw /proc/cpuinfo 2>/dev/null ||
          { grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo; } || continue
        flags=(--dtype f32 --quantization "${cfg%-bf16}")
        [ "$cfg" = "${cfg%-bf16}" ] || flags=(--dtype bf16 --quantization "${cfg%-bf16}")
        ;;
    esac
    RUNS=1 benches/llama_batched_shape.sh "${flags[@]}" >"$runlog" 2>&1 ||
      fail "offline-bench ${flags[*]}"
    line=$(tail -n 1 "$runlog")
    record "offline-bench $cfg" "${line##* }"
  done
done
for name in "llama.cpp Q4_1" "llama.cpp Q8_0" "llama.cpp BF16" "llama.cpp F32" \
  "offline-bench f32" "offline-bench bf16" "offline-bench int8" "offline-bench int8-bf16" \
  "offline-bench int4" "offline-bench int4-bf16"; do
  [ -n "${rates[$name]:-}" ] || continue
  printf '%s\n' ${rates[$name]} | sort -n |
    awk -v n="$name" '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2;
      printf "%-20s median %7.1f total tokens/s over %d rounds\n", n, m, NR}'
done
