#!/usr/bin/env bash
# Cross-build layerfs for IBM Z (s390x-unknown-linux-gnu): release binary in
# target/s390x-unknown-linux-gnu/release/, .deb and .rpm in target/packaging/out/.
#
#   packaging/build-s390x.sh
#
# Installs what it needs (rustup target, Debian's gcc-s390x-linux-gnu and
# g++-s390x-linux-gnu) when missing; if that is impossible it prints
# "s390x: SKIPPED (reason)" and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/s390x-env.sh
s390x_setup

cargo build --release --locked -p layerfs --bin layerfs --target "$S390X_TARGET"
bin=target/$S390X_TARGET/release/layerfs
echo "s390x binary: $bin ($(file -b "$bin" | cut -d, -f1-2))"
packaging/build-packages.sh --no-build "$S390X_TARGET"
