#!/usr/bin/env bash
# Build the layerfs .deb (cargo-deb) and .rpm (cargo-generate-rpm).
#
#   packaging/build-packages.sh [--no-build] [TARGET]
#
# TARGET: a Rust target triple; default the host. s390x-unknown-linux-gnu
# sets up its cross toolchain first (packaging/s390x-env.sh); other targets need
# their cross linker configured by the caller.
# --no-build: package the release binary already in target/ instead of running
# `cargo build --release` first (which is a no-op when it is up to date).
#
# Needs: cargo-deb, cargo-generate-rpm (cargo install --locked ...), dpkg-dev
# (dpkg-shlibdeps for the deb's dependencies), a strip for TARGET.
# Output: target/packaging/out/*.deb and *.rpm (paths printed at the end).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

no_build=0
target=""
for a in "$@"; do
    case "$a" in
        --no-build) no_build=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) echo "build-packages: unknown option $a" >&2; exit 2 ;;
        *) target=$a ;;
    esac
done

host=$(rustc -vV | sed -n 's/^host: //p')
target=${target:-$host}

for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null; then
        echo "build-packages: $tool is missing: cargo install --locked $tool" >&2
        exit 1
    fi
done

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ "$target" = "$host" ]; then
    bin="$target_dir/release/layerfs"
    target_args=()
else
    bin="$target_dir/$target/release/layerfs"
    target_args=(--target "$target")
fi

if [ "$target" = s390x-unknown-linux-gnu ]; then
    # Cross linker, C compilers and rustup target (or "s390x: SKIPPED (...)").
    . packaging/s390x-env.sh
    s390x_setup
fi

# 1. The release binary.
if [ "$no_build" = 1 ]; then
    for b in "$bin" "$bin-ctl" "$(dirname "$bin")"/{layerd,layerctl,layerfs-coordinator}; do
        [ -x "$b" ] || { echo "build-packages: --no-build but $b does not exist" >&2; exit 1; }
    done
else
    cargo build --release --locked -p layerfs --bin layerfs --bin layerfs-ctl "${target_args[@]}"
    cargo build --release --locked -p layerfs-agent "${target_args[@]}"
fi

# The strip matching the target: host strip, or the GNU cross binutils' one.
gnu_triple=${target/-unknown-/-}
if [ "$target" = "$host" ]; then
    strip="strip"
elif command -v "$gnu_triple-strip" >/dev/null; then
    strip=$gnu_triple-strip
else
    echo "build-packages: no $gnu_triple-strip for $target (install binutils-$gnu_triple)" >&2
    exit 1
fi

# 2. Generated files, staged where the asset lists in Cargo.toml expect them.
stage=$ROOT/target/packaging
rm -rf "${stage:?}/docs" "${stage:?}/bin"
mkdir -p "$stage/docs" "$stage/bin" "$stage/out"
# Man page and completions from layerfs::cli::Args (a host tool; release
# profile like everything else, so RocksDB is not compiled a second time).
cargo run --release --locked -q -p layerfs-gendocs -- "$stage/docs" >/dev/null
gzip -9nf "$stage/docs/man/layerfs.8"
if [ -f README.md ]; then
    cp README.md "$stage/docs/README.md"
else
    cp packaging/README.md "$stage/docs/README.md"
fi
# Stripped copy for the rpm (cargo-generate-rpm packages files as they are;
# cargo-deb strips its own copy). The binary in target/ is left untouched.
"$strip" -o "$stage/bin/layerfs" "$bin"
"$strip" -o "$stage/bin/layerfs-ctl" "$bin-ctl"
for b in layerd layerctl layerfs-coordinator; do
    "$strip" -o "$stage/bin/$b" "$(dirname "$bin")/$b"
done

# 3. The packages. cargo-deb prints the path of the .deb on stdout.
deb_args=()
[ "$target" = "$host" ] || deb_args=(--variant cross)
deb=$(cargo deb -p layerfs --no-build "${target_args[@]}" "${deb_args[@]}" --output "$stage/out/")
rpm_args=()
if [ "$target" != "$host" ]; then
    # ldd cannot read a foreign binary: state the dependencies of a Rust
    # binary (glibc, libgcc_s for unwinding) instead of discovering them.
    rpm_args=(--auto-req no -s 'requires = { glibc = "*", libgcc = "*" }')
fi
version=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "layerfs"))')
rpm="$stage/out/layerfs-$version-1.${target%%-*}.rpm"
cargo generate-rpm -p . "${target_args[@]}" "${rpm_args[@]}" --output "$rpm"
echo "deb: $deb"
echo "rpm: $rpm"
