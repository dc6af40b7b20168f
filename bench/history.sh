#!/usr/bin/env bash
# Checkpoint / rollback / dedup / journal-overhead benchmark of layerfs, side by side with rsync
# --link-dest, cp -a and sync.  Not a test: it only measures and prints (exit 1 only when a step
# errors).  See the "History" section of bench/README.md.
#
#   bench/history.sh [--quick] [--parts checkpoint,dedup,journal] [--out DIR] [--workdir DIR]
#                    [--journal-runs N] [--results-dir DIR]
#
# Env: LAYERFS, LAYERFS_CTL = paths of the binaries (default target/release/layerfs and
# layerfs-ctl, built with `cargo build --release` when missing).  Needs root, /dev/fuse, loop
# devices and about 25 GB of free disk in the workdir (full mode).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "bench/history.sh: run as root (it mounts filesystems and uses loop devices)" >&2
  exit 1
fi

need=()
command -v rsync >/dev/null || need+=(rsync)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true

LAYERFS=${LAYERFS:-$root/target/release/layerfs}
LAYERFS_CTL=${LAYERFS_CTL:-$root/target/release/layerfs-ctl}
if [ ! -x "$LAYERFS" ] || [ ! -x "$LAYERFS_CTL" ]; then
  echo "building layerfs and layerfs-ctl (cargo build --release)"
  (cd "$root" && cargo build --release --bin layerfs --bin layerfs-ctl)
fi

out=$here/out/history
workdir=/var/tmp/layerfs-bench
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --out) out=${args[i + 1]} ;;
    --out=*) out=${args[i]#--out=} ;;
    --workdir) workdir=${args[i + 1]} ;;
    --workdir=*) workdir=${args[i]#--workdir=} ;;
  esac
done
mkdir -p "$out" "$workdir"
out=$(cd "$out" && pwd)
workdir=$(cd "$workdir" && pwd)

# One history run at a time (bench.py's own lock, WORKDIR/.lock, is taken by history.py around
# its parts, so that the journal part can run bench.py in between).
exec 9>"$workdir/.history.lock"
if ! flock -n 9; then
  echo "another history run holds $workdir/.history.lock; waiting for it to finish"
  flock 9
fi

# Mounts and loop devices under a prefix, deepest mount first.
clear_under() {
  local m dev
  for m in $(awk -v p="$1" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    echo "cleanup: unmounting $m"
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
  for dev in $(losetup -a | awk -F: -v p="$1" 'index($0, p) {print $1}'); do
    echo "cleanup: detaching $dev"
    losetup -d "$dev" || true
  done
}
# What a killed run left: our own image (history-*) always; the journal part's (bench.py's) only
# when no benchmark holds WORKDIR/.lock, i.e. nobody is using them.
cleanup() {
  clear_under "$workdir/history-"
  (flock -n 8 && clear_under "$workdir/") 8>"$workdir/.lock" || true
}
cleanup
trap cleanup EXIT

# Copy the binaries so that a concurrent rebuild cannot change them mid-run.
cp -f "$LAYERFS" "$out/layerfs"
cp -f "$LAYERFS_CTL" "$out/layerfs-ctl"
version="$(cd "$root" && git describe --always --dirty 2>/dev/null || echo unknown)"
version="$version (layerfs sha256 $(sha256sum "$out/layerfs" | cut -c1-12), built $(date -u -r "$LAYERFS" '+%Y-%m-%d %H:%M UTC'))"

# In the background, so that a signal reaches the trap at once; history.py turns SIGTERM into an
# orderly exit (unmounts, detaches the loop device), then the EXIT trap checks again.
python3 "$here/history.py" --layerfs "$out/layerfs" --ctl "$out/layerfs-ctl" \
  --layerfs-version "$version" --out "$out" "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null || true' INT TERM
rc=0
wait $child || rc=$?
while kill -0 $child 2>/dev/null; do
  rc=0
  wait $child || rc=$?
done
exit $rc
