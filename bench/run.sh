#!/usr/bin/env bash
# Side-by-side benchmark of layerfs against a native directory, kernel overlayfs
# and fuse-overlayfs.  Not a test: it only measures and prints.  See bench/README.md.
#
#   bench/run.sh [--quick] [--runs N] [--out DIR] [--workdir DIR] [--keep]
#                [--backends native,overlay,fuse-overlayfs,layerfs[,layerfs-nojournal][,layerfs-devfuse][,layerfs-volatile]] [--only KEY,...]
#
# Env: LAYERFS=path to the layerfs binary (default target/release/layerfs, built
# with `cargo build --release` when missing).  Needs root, /dev/fuse, loop devices.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "bench/run.sh: run as root (it mounts filesystems and drops caches)" >&2
  exit 1
fi

# Tools: fio, fuse-overlayfs (brings fuse3), mkfs.ext4, losetup, a C compiler, python3.
need=()
command -v fio >/dev/null || need+=(fio)
command -v fuse-overlayfs >/dev/null || need+=(fuse-overlayfs)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v cc >/dev/null || need+=(gcc)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
modprobe loop 2>/dev/null || true

LAYERFS=${LAYERFS:-$root/target/release/layerfs}
if [ ! -x "$LAYERFS" ]; then
  echo "building layerfs (cargo build --release)"
  (cd "$root" && cargo build --release --bin layerfs)
fi

# Pass --out through, but learn it first: the helper and the binary copy go there.
out=$here/out
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --out) out=${args[i + 1]} ;;
    --out=*) out=${args[i]#--out=} ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Copy the binary so that a concurrent rebuild cannot change it mid-run.
cp -f "$LAYERFS" "$out/layerfs"
version="$(cd "$root" && git describe --always --dirty 2>/dev/null || echo unknown)"
version="$version ($(basename "$LAYERFS") sha256 $(sha256sum "$out/layerfs" | cut -c1-12), built $(date -u -r "$LAYERFS" '+%Y-%m-%d %H:%M UTC'))"

cc -O2 -Wall -o "$out/lfbench" "$here/lfbench.c"

exec python3 "$here/bench.py" --layerfs "$out/layerfs" --lfbench "$out/lfbench" \
  --layerfs-version "$version" --out "$out" "$@"
