#!/usr/bin/env bash
# Run every test of layerfs. Needs root (FUSE mounts, kernel overlayfs,
# user switches) on Debian 12 or later; installs what it needs itself.
#
#   tests/run-all.sh            everything (what CI runs)
#   QUICK=1 tests/run-all.sh    skip pjdfstest, fsx and packaging
#
# One cargo profile (release) builds both the test binaries and the layerfs
# binary they mount, so every crate is compiled once per run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CARGO_TERM_COLOR=never
step_start=0
step() { step_start=$(date +%s); echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
done_step() { echo "--- done in $(( $(date +%s) - step_start ))s"; }
t0=$(date +%s)

if [ "$(id -u)" != 0 ]; then
  echo "tests/run-all.sh: run as root (FUSE mounts, kernel overlayfs, user switches)" >&2
  exit 2
fi

step "system packages"
need=(fuse3 fuse-overlayfs attr acl e2fsprogs util-linux procps psmisc kmod python3 gcc g++ libc6-dev pkg-config libclang-dev clang)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 2; }
done_step

step "format and lints"
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
done_step

step "build (release)"
cargo build --release --workspace --locked
done_step

step "unit and integration tests (real FUSE mounts, requests through /dev/fuse)"
LAYERFS_TEST_OPTS=uring=off cargo test --release --workspace --locked -- --test-threads=4
done_step

step "integration tests again, requests through per-CPU io_uring queues (uring=on)"
LAYERFS_TEST_OPTS=uring=on cargo test --release -p layerfs --locked --test '*' -- --test-threads=4
done_step

[ "${QUICK:-0}" = 1 ] && { echo "QUICK=1: stopping before pjdfstest, fsx, packaging"; exit 0; }

step "conformance tools (pjdfstest, fsx)"
export PATH="$HOME/.cargo/bin:$PATH"
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest
command -v fsx >/dev/null || cargo install --locked fsx
done_step

step "pjdfstest: layerfs (both transports) and kernel overlayfs over the same layout"
out=$(LAYERFS="$root/target/release/layerfs" tests/conformance/pjdfstest.sh layerfs layerfs-uring overlay)
echo "$out"
# The bar: every case that passes on kernel overlayfs passes on layerfs.
P=/tmp/lf-pjdfstest
grep -E ' ok$' "$P/overlay.log" | awk '{print $1}' | sort > "$P/overlay.ok"
for be in layerfs layerfs-uring; do
  grep -E ' ok$' "$P/$be.log" | awk '{print $1}' | sort > "$P/$be.ok"
  regress=$(comm -23 "$P/overlay.ok" "$P/$be.ok")
  if [ -n "$regress" ]; then
    echo "FAIL: cases passing on kernel overlayfs but not on $be:"; echo "$regress"
    grep -A6 -F "$(head -1 <<<"$regress")" "$P/$be.log" || true
    exit 1
  fi
  grep -q "RESULT $be .*failed=0 " <<<"$out" || { echo "FAIL: $be has pjdfstest failures"; cat "$P/$be.failed"; exit 1; }
done
done_step

for uring in off on; do
step "fsx: 100,000 operations on a file that starts in a lower layer (uring=$uring)"
F=/tmp/lf-fsx
umount -l "$F/m" 2>/dev/null || true; umount -l "$F" 2>/dev/null || true
mkdir -p "$F" && mount -t tmpfs -o size=2G tmpfs "$F"
mkdir -p "$F"/{l1,l2,u,w,m}
head -c 262144 /dev/urandom > "$F/l2/fsxfile"
"$root/target/release/layerfs" -o "lowerdir=$F/l1:$F/l2,upperdir=$F/u,workdir=$F/w,uring=$uring" "$F/m"
(cd "$F" && fsx -N 100000 -S 1 -P "$F" "$F/m/fsxfile") > /tmp/lf-fsx.log 2>&1 || { tail -40 /tmp/lf-fsx.log; umount -l "$F/m"; exit 1; }
tail -1 /tmp/lf-fsx.log
umount "$F/m"
# The daemon closes its journal on $F just after the unmount returns.
for _ in $(seq 100); do umount "$F" 2>/dev/null && break; sleep 0.1; done
mountpoint -q "$F" && umount -l "$F"
done_step
done

step "packages, systemd units, IBM Z big-endian tests"
bash packaging/ci-packages.sh
done_step

echo
echo "ALL TESTS PASSED in $(( $(date +%s) - t0 ))s"
