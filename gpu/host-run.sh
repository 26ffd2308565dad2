#!/usr/bin/env bash
# Runs on the GPU host from the packed .gpu/ folder (see gpu/pack.sh): finds the CUDA libraries,
# records the device, runs the self-check (kernels and engine against the CPU) and only if it
# passes the timed runs (chat and ShareGPT workloads, a shapes sweep, the CUDA criterion bench),
# writing logs and JSON to ./gpu-results beside this script, and ends with a table. Never
# changes the GPU's clocks or settings.
#
#   bash .gpu/run.sh                      # self-check chat sharegpt shapes (bench and chat-fp8
#                                         #  only when named)
#   bash .gpu/run.sh self-check chat      # some steps
#   SKIP_CHECK=1 bash .gpu/run.sh chat-fp8  # the chat workload over an fp8 KV cache
#   SHAPES_ARGS="--batch-sizes 1,8 --iters 1" bash .gpu/run.sh self-check shapes  # a smaller sweep
#   STEP_TIMEOUT=200 bash .gpu/run.sh     # stop any one step after 200 s and go on to the next
#   BUDGET_S=420 bash .gpu/run.sh         # the whole script within 420 s (default: none)
# The timed steps run only after a passing self-check in the same call, unless SKIP_CHECK=1
# (for a later call after one that passed).
#
# On a lent machine whose $OUT comes back with a few files only (this workplace's device tool:
# at most 8), the results are written to a work folder and packed as $OUT/results.tgz, with the
# closing table in $OUT/summary.txt, whatever stops the script short of a kill.
set -uo pipefail
steps=${*:-self-check chat sharegpt shapes}
want() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/timeline.txt"; }
here=$(cd "$(dirname "$0")" && pwd)
# Unpacked outside the carried folder, which may be read-only.
work=${TMPDIR:-/tmp}/offline-bench-gpu
mkdir -p "$work"
if [ -n "${OUT:-}" ]; then
  out=$work/results
  rm -rf "$out"
  pack_results() {
    tar -czf "$OUT/results.tgz" -C "$out" . && cp "$out/summary.txt" "$OUT/" 2>/dev/null
  }
  trap pack_results EXIT
else
  out=$here/gpu-results
fi
mkdir -p "$out"
started=$(date +%s)
# Seconds a step may run: STEP_TIMEOUT, and no further than BUDGET_S from the start less 20 s
# for the closing table and the packing; 0 means unlimited to `timeout`.
limit() {
  local l=${STEP_TIMEOUT:-0}
  if [ -n "${BUDGET_S:-}" ]; then
    local left=$((BUDGET_S - 20 - $(date +%s) + started))
    [ "$left" -gt 1 ] || left=1
    if [ "$l" -eq 0 ] || [ "$left" -lt "$l" ]; then l=$left; fi
  fi
  echo "$l"
}
# One pass over where CUDA and Python's CUDA packages live, then the whole file system only for
# what is still missing (a cold pass over everything took 16 s on a build machine).
libs="libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13"
names=()
for l in $libs; do names+=(${names[0]+-o} -name "$l"); done
find_libs() {
  find "$@" \( -path /proc -o -path /sys -o -path /dev \) -prune -o -type f \
    \( "${names[@]}" \) -print 2>/dev/null
}
found=$(find_libs /usr /opt)
for l in $libs; do grep -q "/$l\$" <<<"$found" || { found=$(find_libs /); break; }; done
for l in $libs; do
  f=$(grep -m 1 "/$l\$" <<<"$found")
  [ -n "$f" ] && LD_LIBRARY_PATH=$(dirname "$f"):${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$out/environment.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.csv"
bin=$work/offline-bench
gunzip -c "$here/offline-bench.gz" > "$bin" && chmod +x "$bin"
gunzip -c "$here/llama3-tokenizer.json.gz" > "$work/tokenizer.json"
echo "commit $(cat "$here/commit.txt"), date $(date -u +%Y-%m-%d)" | tee "$out/run.txt"

stamp "steps: $steps"
if want self-check; then
  stamp self-check
  if ! timeout "$(limit)" "$bin" self-check --device cuda 2>&1 | tee "$out/self-check.txt"; then
    stamp "self-check failed: no timing (see $out/self-check.txt)"
    tail -n 40 "$out/self-check.txt" > "$out/summary.txt"
    exit 1
  fi
  timeout "$(limit)" "$bin" generate --quiet --device cuda --model llama-3-8b --load-format dummy \
    --tokenizer "$work/tokenizer.json" --prompt "The capital of France is" --max-tokens 8 \
    2>&1 | tee "$out/generate.txt"
elif [ "${SKIP_CHECK:-0}" != 1 ]; then
  echo "no self-check in this call: add the self-check step, or SKIP_CHECK=1 after one passed" >&2
  exit 1
fi

status=0
# Sampled as vLLM's `bench throughput` samples (temperature 1, top-p 1), on the device.
for run in chat sharegpt chat-fp8; do
  want "$run" || continue
  stamp "$run"
  ds=${run%-fp8}
  kv=auto
  [ "$run" = "$ds" ] || kv=fp8
  rm -f "$out/$run.json"
  timeout "$(limit)" "$bin" throughput --device cuda --model llama-3-8b --load-format dummy \
    --temperature 1 --top-p 1 --kv-cache-dtype "$kv" \
    --workload "$here/$ds-llama3-1000.json" --output-json "$out/$run.json" \
    2>&1 | tee "$out/$run.txt" || status=1
done

# The shapes sweep of llama-3-8b (issue 4's GPU figure): prefill and decode per shape, each
# kernel timed with CUDA events, against the device's measured GEMM and copy peaks.
if want shapes; then
  stamp shapes
  # shellcheck disable=SC2086 # SHAPES_ARGS is a list of flags
  timeout "$(limit)" "$bin" shapes --device cuda --model llama-3-8b --load-format dummy \
    ${SHAPES_ARGS:---batch-sizes 1,8,32,128 --input-lens 128,512,2048 --output-lens 128} \
    --output-dir "$out/shapes" 2>&1 | tee "$out/shapes.txt" || status=1
fi
# The CUDA criterion bench (issue 4): decode v1 against split-K v2, our prefill attention against
# matmul-softmax-matmul, on llama-3-8b's attention shapes; packed by gpu/pack.sh.
if want bench; then
  stamp bench
  if [ -f "$here/bench-attention.gz" ]; then
    gunzip -c "$here/bench-attention.gz" > "$work/bench-attention" && chmod +x "$work/bench-attention"
    CRITERION_HOME=$work/criterion timeout "$(limit)" "$work/bench-attention" --bench cuda_ \
      --warm-up-time 0.5 --measurement-time 2 2>&1 | tee "$out/bench.txt" || status=1
  else
    echo "bench: .gpu/bench-attention.gz was not packed" | tee "$out/bench.txt"
    status=1
  fi
fi
stamp done

{
  if want chat || want sharegpt || want chat-fp8; then
    printf '\n%-10s %12s %16s %16s %10s\n' workload "gens/s" "gen tok/s" "prompt tok/s" "time s"
  fi
  for run in chat sharegpt chat-fp8; do
    want "$run" || continue
    [ -f "$out/$run.json" ] || { printf '%-10s %12s\n' "$run" failed; continue; }
    python3 - "$out/$run.json" "$run" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("%-10s %12.2f %16.2f %16.2f %10.2f" % (sys.argv[2], r["requests_per_second"],
      r["output_tokens_per_second"], r["prompt_tokens_per_second"], r["elapsed_time"]))
PY
  done
  # Each measured shape's line (printed as it finished, so a cut sweep keeps them).
  if want shapes; then grep -E '^batch [0-9]+ x input' "$out/shapes.txt"; fi
  if want bench; then grep -E '^cuda_|time: ' "$out/bench.txt"; fi
} | tee "$out/summary.txt"
exit $status
