#!/usr/bin/env bash
# Coordinator link throughput: records/s delivered from a mounted layerfs
# through layerd to layerfs-coordinator, and layerd's peak RSS (VmHWM).
# A measurement, never a test: nothing fails on a slow figure.
#
#   bench/agent-link.sh [RECORDS] [WRITERS]
#
# RECORDS (default 200000) journal records from create/unlink loops in the
# union: half written while the link is up (WRITERS threads, default 2: the
# "live" figure is bounded by how fast the union takes the loop), half while
# the coordinator is down, then delivered at once when it comes back (the
# "catch-up" figure: the link's own speed). Needs root and /dev/fuse.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "$(id -u)" != 0 ]; then
  echo "bench/agent-link.sh: run as root (it mounts a layerfs)" >&2
  exit 1
fi
cargo build --release --workspace
BENCH_RECORDS="${1:-200000}" BENCH_WRITERS="${2:-2}" \
  cargo test --release -p layerfs-agent --test coordinator bench_agent_link -- --ignored --nocapture 2>&1 |
  grep -E '^(live|catch-up|layerd VmHWM)|panicked|error'
