#!/usr/bin/env bash
# Run the crate's pure unit tests (cargo test --lib: option parsing, inode
# layout, the on-disk format encodings such as whiteout::tests::origin_known_answer)
# on big-endian s390x under qemu-s390x-static. Known-answer byte strings are
# written in the tests themselves, so an encoding that depends on the host's
# byte order fails here.
#
#   packaging/test-s390x.sh
#
# If the target or the cross tools cannot be installed, prints one line
# "s390x: SKIPPED (reason)" and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/s390x-env.sh
s390x_setup run

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --lib -p layerfs --target "$S390X_TARGET" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
    echo "s390x: FAILED (cargo test --lib --target $S390X_TARGET exited $rc)"
    exit "$rc"
fi
if ! grep -q "origin_known_answer ... ok" "$log"; then
    echo "s390x: note: whiteout::tests::origin_known_answer did not run (renamed?)"
fi
echo "s390x: big-endian unit tests passed under qemu-s390x-static"
