#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain (nvcc, headers, cuBLAS/cuRAND/NVRTC link libraries) from the
# Python package index into a cache folder, and a link-time stub of the driver library (libcuda),
# so that `cargo build --features cuda` works on a machine with no GPU and no CUDA install.
# 13.0 matches the driver of our H100/H200 hosts (580): PTX from a newer nvcc is refused there.
#
#   source gpu/cuda-toolchain.sh                    # installs once, then exports PATH, CUDA_ROOT, ...
#   cargo build --release --features cuda
#
# Only `nvcc` is needed for `cargo check`; linking needs the libraries too (set CUDA_TOOLCHAIN_LINK=0 to skip them).

CUDA_HOME_DIR=${CUDA_HOME_DIR:-$HOME/.cache/cuda-13.0}
want_link=${CUDA_TOOLCHAIN_LINK:-1}
py=$(command -v python3 || command -v python)

_cuda_pip() { # $1 = target folder, rest = packages
  local dst=$1; shift
  [ -d "$dst/nvidia" ] && return 0
  "$py" -m pip install -q --disable-pip-version-check --no-deps --target "$dst.tmp" "$@" >&2 &&
    mv "$dst.tmp" "$dst" || { rm -rf "$dst.tmp"; echo "cuda-toolchain: pip install failed for $*" >&2; return 1; }
}

_cuda_pip "$CUDA_HOME_DIR/nvcc" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 || return 1 2>/dev/null || exit 1
CU=$CUDA_HOME_DIR/nvcc/nvidia/cu13
ln -sf libcudart.so.13 "$CU/lib/libcudart.so"

if [ "$want_link" = 1 ]; then
  _cuda_pip "$CUDA_HOME_DIR/libs" nvidia-cublas==13.0.2.14 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 || return 1 2>/dev/null || exit 1
  L=$CUDA_HOME_DIR/libs/nvidia/cu13/lib
  for l in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do ln -sf "lib$l" "$L/lib${l%%.so*}.so"; done
  # libcuda comes with the GPU driver, which is not on this machine: link against a stub that
  # defines every driver entry point by name; the real library is loaded at run time on the GPU host.
  # Run `cargo fetch` first: the stub also covers the entry points that the fetched cudarc binds.
  S=$CUDA_HOME_DIR/stub
  mkdir -p "$S"
  { grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CU/include/cuda.h"
    grep -ohE '^\s+fn cu[A-Za-z0-9_]+\(' "$HOME"/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null |
      sed -E 's/^\s+fn //; s/\(//'
  } | sort -u | awk '{print "int " $1 "(void){return 999;}"}' >"$S/cuda_stub.c"
  gcc -shared -fPIC -o "$S/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$S/cuda_stub.c" && ln -sf libcuda.so.1 "$S/libcuda.so"
  export RUSTFLAGS="${RUSTFLAGS:-} -L $S -L $L -L $CU/lib"
fi

export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "cuda-toolchain: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CU (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)" >&2
