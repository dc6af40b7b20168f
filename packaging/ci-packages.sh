#!/usr/bin/env bash
# CI for packaging, systemd units and IBM Z. Run as root from anywhere:
#
#   bash packaging/ci-packages.sh
#
# Steps (each timed): install tools, release binary (the existing
# target/release build is used as is), build .deb and .rpm, systemd-analyze
# verify every unit, install the .deb, exercise the INSTALLED layerfs (direct
# mount, the layerfs@ unit's command line with Type=notify and SIGTERM,
# mount -t fuse.layerfs and an fstab line through /sbin/mount.fuse.layerfs),
# check that an upgrade keeps an edited conffile, remove and purge the package
# and check the union's data is untouched, list the .rpm, run the big-endian
# unit tests under qemu-s390x-static. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
    echo "ci-packages: must run as root (installs packages, mounts)" >&2
    exit 1
fi

TMP=$(mktemp -d /tmp/layerfs-ci.XXXXXX)
cleanup() {
    local m
    # Our own mounts only (under $TMP); a layerfs daemon exits once its mount is gone.
    for m in $(awk -v t="$TMP" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

STEP_NAMES=()
STEP_TIMES=()
summary() {
    local i
    echo
    echo "== packaging CI: time per step"
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-44s %7ss\n' "${STEP_NAMES[$i]}" "${STEP_TIMES[$i]}"
    done
}
step() {
    local name=$1
    shift
    echo
    echo "== $name"
    local t0 t1 rc
    t0=$(date +%s.%N)
    # A subshell with errexit in force (it would be ignored under "|| rc=$?").
    set +e
    (set -e; "$@")
    rc=$?
    set -e
    t1=$(date +%s.%N)
    STEP_NAMES+=("$name")
    STEP_TIMES+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')")
    echo "-- $name: ${STEP_TIMES[-1]}s"
    if [ "$rc" != 0 ]; then
        summary
        echo "ci-packages: FAILED at step '$name' (exit $rc)"
        exit "$rc"
    fi
}
die() { echo "FAIL: $*" >&2; exit 1; }

mounted() { awk -v m="$(realpath "$1")" '$5 == m { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# --- steps --------------------------------------------------------------------

install_tools() {
    local pkgs=() p
    for p in systemd rpm dpkg-dev file man-db python3 util-linux; do
        dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
    done
    if [ "${#pkgs[@]}" -gt 0 ]; then
        echo "apt-get install ${pkgs[*]}"
        apt-get update -qq
        apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
    local missing=()
    command -v cargo-deb >/dev/null || missing+=(cargo-deb)
    command -v cargo-generate-rpm >/dev/null || missing+=(cargo-generate-rpm)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "cargo install --locked ${missing[*]}"
        cargo install --locked "${missing[@]}"
    fi
    cargo deb --version
    cargo generate-rpm --version 2>/dev/null || true
    systemd-analyze --version | head -n 1
}

release_binary() {
    if [ -x target/release/layerfs ] && [ -x target/release/layerd ]; then
        echo "using the existing target/release/layerfs ($(stat -c '%y' target/release/layerfs))"
    else
        cargo build --release --locked --workspace
    fi
}

build_packages() {
    packaging/build-packages.sh --no-build | tee "$TMP/build.out"
    DEB=$(sed -n 's/^deb: //p' "$TMP/build.out")
    RPM=$(sed -n 's/^rpm: //p' "$TMP/build.out")
    [ -f "$DEB" ] && [ -f "$RPM" ] || die "packages not found in build output"
    printf '%s\n%s\n' "$DEB" "$RPM" > "$TMP/packages"
    dpkg-deb -c "$DEB"
}

verify_units() {
    local deb root u units=()
    deb=$(sed -n 1p "$TMP/packages")
    # The package's own files as the root to verify against (ExecStart binaries
    # must exist), plus the host's units for the standard targets.
    root=$TMP/verify-root
    mkdir -p "$root/usr/lib/systemd/system"
    dpkg-deb -x "$deb" "$root"
    cp -a /lib/systemd/system/. "$root/usr/lib/systemd/system/"
    [ -x "$root/usr/bin/layerd" ] || die "the package lacks /usr/bin/layerd"
    # As on a merged-/usr system (/lib -> usr/lib); the example .mount unit as
    # an administrator would install it.
    cp -a "$root"/lib/systemd/system/. "$root/usr/lib/systemd/system/"
    mkdir -p "$root/etc/systemd/system"
    cp "$root"/usr/share/doc/layerfs/examples/*.mount "$root/etc/systemd/system/"
    for u in "$root"/lib/systemd/system/layer*; do
        units+=("$root/usr/lib/systemd/system/${u##*/}")
    done
    for u in "$root"/usr/share/doc/layerfs/examples/*.mount; do
        units+=("$root/etc/systemd/system/${u##*/}")
    done
    # The units in the repo must be the ones packaged.
    for u in systemd/*; do
        cmp -s "$u" "$root/lib/systemd/system/$(basename "$u")" ||
            cmp -s "$u" "$root/usr/share/doc/layerfs/examples/$(basename "$u")" ||
            die "$u differs from the packaged copy"
    done
    echo "systemd-analyze verify --root=<deb contents> ${units[*]##*/}"
    systemd-analyze verify --man=no --root="$root" "${units[@]}" 2>&1 | tee "$TMP/verify.out"
    [ "${PIPESTATUS[0]}" = 0 ] || die "systemd-analyze verify failed"
    if [ -s "$TMP/verify.out" ]; then die "systemd-analyze verify printed warnings"; fi
    echo "verify: ${#units[@]} units OK"
}

install_deb() {
    local deb
    deb=$(sed -n 1p "$TMP/packages")
    dpkg -i "$deb" </dev/null
    [ "$(dpkg-query -W -f '${Status}' layerfs)" = "install ok installed" ] || die "layerfs not installed"
    [ -x /usr/bin/layerfs ] || die "/usr/bin/layerfs missing"
    [ "$(readlink -f /sbin/mount.fuse.layerfs)" = /usr/bin/layerfs ] || die "/sbin/mount.fuse.layerfs is not a link to /usr/bin/layerfs"
    dpkg -S /usr/bin/layerfs
    /usr/bin/layerfs --version
    for b in layerfs-ctl layerd layerctl layerfs-coordinator; do
        /usr/bin/$b --version >/dev/null || die "/usr/bin/$b does not run"
    done
    # Nothing is enabled by installing.
    for u in /etc/systemd/system/*.wants/layer* /etc/systemd/system/sockets.target.wants/layerd.socket; do
        [ -e "$u" ] && die "installing enabled $u"
    done
    # The installed unit, now with its binary and man page in place.
    systemd-analyze verify /lib/systemd/system/layerfs@.service
    man -w layerfs
    echo "installed; nothing enabled"
}

make_union() { # DIR -> lower/upper/work/mnt with a few files
    local d=$1
    mkdir -p "$d/lower/dir" "$d/upper" "$d/work" "$d/mnt"
    echo "from the lower layer" > "$d/lower/a.txt"
    echo "to be deleted" > "$d/lower/dir/b.txt"
}

installed_layerfs() {
    local d=$TMP/direct
    make_union "$d"
    /usr/bin/layerfs -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" "$d/mnt"
    mounted "$d/mnt" || die "not mounted after layerfs returned"
    awk -v m="$d/mnt" '$2 == m' /proc/mounts
    [ "$(cat "$d/mnt/a.txt")" = "from the lower layer" ] || die "lower file not readable"
    echo "written through the union" > "$d/mnt/new.txt"
    echo "changed" >> "$d/mnt/a.txt"
    rm "$d/mnt/dir/b.txt"
    sync
    # The installed CLI reaches the mount's control socket.
    /usr/bin/layerfs-ctl -m "$d/mnt" checkpoint create --name ci >/dev/null || die "layerfs-ctl checkpoint failed"
    /usr/bin/layerfs-ctl -m "$d/mnt" log --op unlink | grep -q '/dir/b.txt' || die "journal lacks the unlink"
    # The installed agent serves the same mount to layerctl.
    printf 'socket = "%s"\nstate_dir = "%s"\n[[mount]]\nname = "ci"\npath = "%s"\n' \
        "$d/layerd.sock" "$d/layerd-state" "$d/mnt" > "$d/agent.toml"
    /usr/bin/layerd --config "$d/agent.toml" 2>"$d/layerd.log" &
    local agent=$!
    for _ in $(seq 100); do [ -S "$d/layerd.sock" ] && break; sleep 0.1; done
    /usr/bin/layerctl -s "$d/layerd.sock" -m ci checkpoint list | grep -q '^ci ' ||
        { cat "$d/layerd.log"; die "layerctl does not list the checkpoint through layerd"; }
    kill "$agent"; wait "$agent" || true
    [ "$(cat "$d/upper/new.txt")" = "written through the union" ] || die "upper layer lacks new.txt"
    grep -q changed "$d/upper/a.txt" || die "a.txt was not copied up"
    [ "$(cat "$d/lower/a.txt")" = "from the lower layer" ] || die "lower layer was modified"
    [ "$(stat -c '%F %t:%T' "$d/upper/dir/b.txt")" = "character special file 0:0" ] || die "no whiteout for dir/b.txt"
    umount "$d/mnt"
    mounted "$d/mnt" && die "still mounted after umount"
    echo "read, write, copy-up, whiteout, unmount: OK"
}

unit_notify() {
    local d=$TMP/unit
    make_union "$d"
    cat > "$TMP/ci.conf" <<EOF
# as /etc/layerfs/mounts/ci.conf would be
LOWERDIR=$d/lower
UPPERDIR=$d/upper
WORKDIR=$d/work
MOUNTPOINT=$d/mnt
EOF
    python3 packaging/run-unit-notify.py /lib/systemd/system/layerfs@.service ci "$TMP/ci.conf"
    echo "EXTRA_OPTIONS=nodev,noatime,threads=2" >> "$TMP/ci.conf"
    python3 packaging/run-unit-notify.py /lib/systemd/system/layerfs@.service ci "$TMP/ci.conf"
}

mount_helper() {
    local d=$TMP/helper
    make_union "$d"
    mount -t fuse.layerfs layerfs "$d/mnt" -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work,nodev"
    mounted "$d/mnt" || die "mount -t fuse.layerfs did not mount"
    awk -v m="$d/mnt" '$2 == m' /proc/mounts
    local type
    type=$(awk -v m="$d/mnt" '$2 == m { print $3 }' /proc/mounts)
    [ "$type" = fuse.layerfs ] || die "mounted with type '$type', not fuse.layerfs"
    [ "$(cat "$d/mnt/a.txt")" = "from the lower layer" ] || die "lower file not readable"
    echo helper > "$d/mnt/h.txt"
    umount "$d/mnt"
    [ "$(cat "$d/upper/h.txt")" = helper ] || die "upper layer lacks h.txt"
    # The same through an fstab line (a private fstab file: /etc/fstab is not touched).
    echo "layerfs $d/mnt fuse.layerfs lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work,nodev,noatime 0 0" > "$TMP/fstab"
    mount -T "$TMP/fstab" "$d/mnt"
    mounted "$d/mnt" || die "fstab line did not mount"
    [ "$(cat "$d/mnt/h.txt")" = helper ] || die "upper file not visible"
    umount "$d/mnt"
    echo "mount -t fuse.layerfs and fstab line: OK"
}

upgrade_keeps_config() {
    local deb conf=/etc/layerfs/mounts/example.conf.sample
    deb=$(sed -n 1p "$TMP/packages")
    echo "# edited by ci-packages" >> "$conf"
    dpkg -i "$deb" </dev/null
    grep -q "edited by ci-packages" "$conf" || die "reinstall/upgrade overwrote the edited $conf"
    echo "edited conffile kept"
}

remove_package() {
    local d=$TMP/direct
    dpkg -r layerfs
    [ ! -e /usr/bin/layerfs ] || die "/usr/bin/layerfs still there"
    [ ! -e /sbin/mount.fuse.layerfs ] && [ ! -L /sbin/mount.fuse.layerfs ] || die "mount helper still there"
    [ -f /etc/layerfs/mounts/example.conf.sample ] || die "remove deleted a conffile (only purge may)"
    [ "$(cat "$d/upper/new.txt")" = "written through the union" ] || die "upper data lost on remove"
    [ -e "$d/upper/dir/b.txt" ] && [ -f "$d/lower/a.txt" ] || die "layer data lost on remove"
    dpkg -P layerfs
    [ "$(cat "$d/upper/new.txt")" = "written through the union" ] || die "upper data lost on purge"
    [ -f "$d/lower/a.txt" ] || die "layer data lost on purge"
    echo "removed and purged; union data untouched"
}

list_rpm() {
    local rpm f
    rpm=$(sed -n 2p "$TMP/packages")
    rpm -qp --qf '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}: %{SUMMARY}\n' "$rpm"
    rpm -qlp "$rpm" | tee "$TMP/rpm.list"
    for f in /usr/bin/layerfs /sbin/mount.fuse.layerfs /usr/lib/systemd/system/layerfs@.service \
        /usr/lib/systemd/system/layerd.service /usr/lib/systemd/system/layerd.socket \
        /etc/layerfs/mounts/example.conf.sample /usr/share/man/man8/layerfs.8.gz; do
        grep -qx "$f" "$TMP/rpm.list" || die "rpm lacks $f"
    done
    echo "config files (noreplace):"
    rpm -qp --qf '[%{FILEFLAGS:fflags}|%{FILENAMES}\n]' "$rpm" | awk -F'|' '$1 ~ /c/ && $1 ~ /n/ { print "  " $2 }' | tee "$TMP/rpm.conf"
    grep -q /etc/layerfs/mounts/example.conf.sample "$TMP/rpm.conf" || die "example.conf.sample is not %config(noreplace)"
    echo "requires: $(rpm -qp --requires "$rpm" | grep -v '^rpmlib' | sort -u | tr '\n' ' ')"
}

s390x_tests() {
    packaging/test-s390x.sh
}

step "install tools" install_tools
step "release binary" release_binary
step "build .deb and .rpm" build_packages
step "systemd-analyze verify" verify_units
step "install .deb" install_deb
step "installed layerfs: mount/read/write/unmount" installed_layerfs
step "layerfs@ unit: Type=notify, SIGTERM" unit_notify
step "mount -t fuse.layerfs, fstab line" mount_helper
step "upgrade keeps edited conffile" upgrade_keeps_config
step "dpkg -r / -P keeps data" remove_package
step "rpm -qlp" list_rpm
step "s390x big-endian unit tests" s390x_tests
summary
echo "ci-packages: OK"
