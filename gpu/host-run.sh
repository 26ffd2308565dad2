#!/usr/bin/env bash
# Runs on the GPU host from the packed .gpu/ folder (see gpu/pack.sh): finds the CUDA libraries,
# records the device, runs the self-check (kernels and engine against the CPU) and only if it
# passes the timed runs (chat and ShareGPT workloads, then a shapes sweep), writing logs and
# JSON under $OUT (default ./gpu-results), and ends with a table. Never changes the GPU's clocks
# or settings.
#
#   bash .gpu/run.sh                      # everything: self-check chat sharegpt shapes
#   bash .gpu/run.sh self-check chat      # some steps (one device call is at most 10 minutes:
#   bash .gpu/run.sh shapes               #  split the steps over two calls if need be)
#   SKIP_CHECK=1 bash .gpu/run.sh chat-fp8  # the chat workload over an fp8 KV cache (not in
#                                         #  the default steps)
#   SHAPES_ARGS="--batch-sizes 1,8 --iters 1" bash .gpu/run.sh self-check shapes  # a smaller sweep
#   STEP_TIMEOUT=200 bash .gpu/run.sh     # stop any one step after 200 s and go on to the next
# The timed steps run only after a passing self-check in the same call, unless SKIP_CHECK=1
# (for a later call after one that passed).
set -uo pipefail
steps=${*:-self-check chat sharegpt shapes}
want() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/timeline.txt"; }
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/gpu-results}
mkdir -p "$out"
for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13; do
  f=$(find / -name "$l" -not -path '/proc/*' 2>/dev/null | head -n 1)
  [ -n "$f" ] && LD_LIBRARY_PATH=$(dirname "$f"):${LD_LIBRARY_PATH:-}
done
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$out/environment.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.csv"
# Unpacked outside the carried folder, which may be read-only.
work=${TMPDIR:-/tmp}/offline-bench-gpu
mkdir -p "$work"
bin=$work/offline-bench
gunzip -c "$here/offline-bench.gz" > "$bin" && chmod +x "$bin"
gunzip -c "$here/llama3-tokenizer.json.gz" > "$work/tokenizer.json"
echo "commit $(cat "$here/commit.txt"), date $(date -u +%Y-%m-%d)" | tee "$out/run.txt"

stamp "steps: $steps"
# `timeout 0` never stops the step.
limit=${STEP_TIMEOUT:-0}
if want self-check; then
  stamp self-check
  if ! timeout "$limit" "$bin" self-check --device cuda 2>&1 | tee "$out/self-check.txt"; then
    stamp "self-check failed: no timing (see $out/self-check.txt)"
    exit 1
  fi
  timeout "$limit" "$bin" generate --quiet --device cuda --model llama-3-8b --load-format dummy \
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
  timeout "$limit" "$bin" throughput --device cuda --model llama-3-8b --load-format dummy \
    --temperature 1 --top-p 1 --kv-cache-dtype "$kv" \
    --workload "$here/$ds-llama3-1000.json" --output-json "$out/$run.json" \
    2>&1 | tee "$out/$run.txt" || status=1
done

# The shapes sweep of llama-3-8b (issue 4's GPU figure): prefill and decode per shape, each
# kernel timed with CUDA events, against the device's measured GEMM and copy peaks.
if want shapes; then
  stamp shapes
  # shellcheck disable=SC2086 # SHAPES_ARGS is a list of flags
  timeout "$limit" "$bin" shapes --device cuda --model llama-3-8b --load-format dummy \
    ${SHAPES_ARGS:---batch-sizes 1,8,32,128 --input-lens 128,512,2048 --output-lens 128} \
    --output-dir "$out/shapes" 2>&1 | tee "$out/shapes.txt" || status=1
fi
stamp done

printf '\n%-10s %12s %16s %16s %10s\n' workload "gens/s" "gen tok/s" "prompt tok/s" "time s"
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
exit $status
