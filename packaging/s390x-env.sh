# shellcheck shell=bash
# Sourced by build-s390x.sh and test-s390x.sh: make the s390x cross toolchain
# available and export the cargo settings for it. When something cannot be
# installed it prints ONE line "s390x: SKIPPED (reason)" and exits 0, so CI
# skips only the IBM Z step.
#
# Toolchain: the rustup target s390x-unknown-linux-gnu, Debian's
# gcc-s390x-linux-gnu / g++-s390x-linux-gnu as linker and C/C++ compilers
# (for crates that build C code), qemu-user-static to run test binaries.

S390X_TARGET=s390x-unknown-linux-gnu
S390X_SYSROOT=/usr/s390x-linux-gnu

s390x_skip() {
    echo "s390x: SKIPPED ($*)"
    exit 0
}

s390x_setup() {
    local need_run=${1:-}
    if ! command -v rustup >/dev/null; then
        s390x_skip "rustup is not installed, cannot add the $S390X_TARGET target"
    fi
    if ! rustup target list --installed 2>/dev/null | grep -qx "$S390X_TARGET"; then
        local out
        if ! out=$(RUST_BACKTRACE=0 timeout 600 rustup target add "$S390X_TARGET" 2>&1); then
            local why
            why=$(printf '%s\n' "$out" | grep -i -m 1 'error' || true)
            s390x_skip "rustup target add $S390X_TARGET failed: ${why:-$(printf '%s\n' "$out" | tail -n 1)}"
        fi
    fi
    local pkgs=() p
    for p in gcc-s390x-linux-gnu g++-s390x-linux-gnu libc6-dev-s390x-cross; do
        dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
    done
    if [ -n "$need_run" ] && ! command -v qemu-s390x-static >/dev/null; then
        pkgs+=(qemu-user-static)
    fi
    if [ "${#pkgs[@]}" -gt 0 ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            s390x_skip "missing ${pkgs[*]} and cannot apt-get install them here"
        fi
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/tmp/s390x-apt.log 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/tmp/s390x-apt.log 2>&1 ||
                s390x_skip "apt-get install ${pkgs[*]} failed: $(tail -n 1 /tmp/s390x-apt.log)"
        fi
    fi
    export CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_LINKER=s390x-linux-gnu-gcc
    export CC_s390x_unknown_linux_gnu=s390x-linux-gnu-gcc
    export CXX_s390x_unknown_linux_gnu=s390x-linux-gnu-g++
    export AR_s390x_unknown_linux_gnu=s390x-linux-gnu-ar
    # Test binaries run under user-mode qemu with the cross glibc as sysroot.
    export CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_RUNNER="qemu-s390x-static -L $S390X_SYSROOT"
}
