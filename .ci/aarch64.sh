#!/usr/bin/env bash
# The CPU code as an aarch64 host (Grace, Graviton) builds it: the x86-64 kernels compiled out,
# the portable loops in their place. Lints the crate for that target, then runs the library's
# unit tests (kernels against their references, the CUDA kernels on the emulator against them,
# the engine's bookkeeping) under qemu-user, all but the self-check's run of the real model (tens
# of minutes emulated; `./test.sh` runs it on x86-64). Needs rustup's aarch64 target, Debian's cross gcc/g++ (ring and the emulated
# kernels build C/C++ for the target) and qemu-user: installed here when missing, with a warning
# and nothing checked where they cannot be (no root, no apt, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
skip() {
  echo "warning: $1; the aarch64 build is not checked" >&2
  exit 0
}
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; } || skip "cannot install ${missing[*]}"
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
  apt_install || { apt-get update -q >/dev/null && apt_install; } || skip "apt-get could not install ${missing[*]}"
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  rustup target add "$target" >/dev/null 2>&1 || skip "rustup could not add $target"
fi
export CARGO_TARGET_DIR=target/aarch64
# The repository's `target-cpu=native` names this x86 CPU; the target's own flags replace it.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-cpu=generic"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --release --target "$target" --features simt --all-targets --quiet -- -D warnings
fi
cargo test --release --target "$target" --features simt --lib --quiet -- --skip engine_check_passes_cpu_against_cpu
