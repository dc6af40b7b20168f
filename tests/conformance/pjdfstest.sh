#!/usr/bin/env bash
# Run pjdfstest inside a union whose test directory has entries in two lower
# layers and in the upper, for each backend named on the command line:
#   layerfs (requests through /dev/fuse) | layerfs-uring (through io_uring
#   queues) | overlay (kernel overlayfs) | fuse-overlayfs | ext4 (plain directory)
# Usage: tests/conformance/pjdfstest.sh [BACKEND...]   (default: layerfs overlay)
# Needs: root, pjdfstest (cargo install pjdfstest), layerfs built (LAYERFS=path).
# Prints one "RESULT backend passed failed skipped total" line per backend and
# keeps the full logs in $OUT (default /tmp/lf-pjdfstest).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
LAYERFS=${LAYERFS:-$root/target/release/layerfs}
OUT=${OUT:-/tmp/lf-pjdfstest}
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(layerfs overlay)
# Short base path: pjdfstest binds Unix sockets below the test directory (108-byte limit).
B=/tmp/lfpj
mkdir -p "$OUT"

cleanup() {
  umount "$B/m" 2>/dev/null || umount -l "$B/m" 2>/dev/null || true
  # A FUSE daemon finishes after its unmount (it closes its journal on $B):
  # wait for the image to be free. A lazy unmount would leave the loop device
  # attached, and the next mount of the re-made image would reuse its stale state.
  local i
  for i in $(seq 100); do
    mountpoint -q "$B" || break
    umount "$B" 2>/dev/null && break
    sleep 0.1
  done
  mountpoint -q "$B" && umount -l "$B" 2>/dev/null || true
  local dev
  for dev in $(losetup -j "$OUT/scratch.img" -O NAME -n 2>/dev/null); do
    losetup -d "$dev" 2>/dev/null || true
  done
}
trap cleanup EXIT

layout() {
  # A scratch ext4 image: the host root has online discard (slow unlink/truncate).
  cleanup
  rm -rf "$B"; mkdir -p "$B"
  truncate -s 1G "$OUT/scratch.img"
  mkfs.ext4 -q -F "$OUT/scratch.img"
  mount -o loop "$OUT/scratch.img" "$B"
  mkdir -p "$B"/{l1,l2,u,w,m}
  mkdir -p "$B/l2/t/d2" "$B/l1/t/d1" "$B/u/t"
  echo lower2 > "$B/l2/t/f2"; echo lower1 > "$B/l1/t/f1"; echo upper > "$B/u/t/fu"
  chmod 0777 "$B/l1/t" "$B/l2/t" "$B/u/t"
}

run_one() {
  local be=$1 dir
  layout
  case $be in
    ext4) dir="$B/l1/t" ;;
    overlay)
      mount -t overlay overlay -o "lowerdir=$B/l1:$B/l2,upperdir=$B/u,workdir=$B/w" "$B/m"
      dir="$B/m/t" ;;
    fuse-overlayfs)
      fuse-overlayfs -o "lowerdir=$B/l1:$B/l2,upperdir=$B/u,workdir=$B/w,allow_other" "$B/m"
      dir="$B/m/t" ;;
    layerfs|layerfs-uring)
      local uring=off; [ "$be" = layerfs-uring ] && uring=on
      "$LAYERFS" -o "lowerdir=$B/l1:$B/l2,upperdir=$B/u,workdir=$B/w,uring=$uring" "$B/m"
      dir="$B/m/t" ;;
    *) echo "unknown backend $be" >&2; return 2 ;;
  esac
  # A directory on another filesystem, for the cross-device (EXDEV) cases.
  local sec=/dev/shm/lfpj-sec
  rm -rf "$sec"; mkdir -p "$sec"; chmod 0777 "$sec"
  (cd "$dir" && timeout 1800 pjdfstest -c "$here/pjdfstest.toml" -p "$dir" -s "$sec") > "$OUT/$be.log" 2>&1 || true
  rm -rf "$sec"
  local s
  s=$(grep '^Summary:' "$OUT/$be.log" || echo "Summary: ? failed, ? skipped, ? passed")
  local failed skipped passed total
  failed=$(sed -E 's/.* ([0-9?]+) failed.*/\1/' <<<"$s")
  skipped=$(sed -E 's/.* ([0-9?]+) skipped.*/\1/' <<<"$s")
  passed=$(sed -E 's/.* ([0-9?]+) passed.*/\1/' <<<"$s")
  total=$(sed -E 's/.* ([0-9?]+) total.*/\1/' <<<"$s")
  grep -E 'FAILED|failed$' "$OUT/$be.log" | awk '{print $1}' | sort > "$OUT/$be.failed" || true
  echo "RESULT $be passed=$passed failed=$failed skipped=$skipped total=$total"
  cleanup
}

for be in "${backends[@]}"; do run_one "$be"; done
