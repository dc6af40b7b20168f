#!/usr/bin/env bash
# layerfs demo: build a small sample repository of two read-only layers,
# mount the union with a writable overlay, and show what happens on disk.
# Run as root on Debian 12 or later; installs what it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
D=${DEMO_DIR:-/tmp/layerfs-demo}

if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 2; fi
for p in fuse3 attr; do
  dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 attr; break; }
done
[ -x target/release/layerfs ] && [ -x target/release/layerfs-ctl ] || cargo build --release --locked -p layerfs
LAYERFS="$root/target/release/layerfs"
CTL="$root/target/release/layerfs-ctl -m $D/server"
export RUST_LOG=${RUST_LOG:-warn}

show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; eval "$@"; }
umount "$D/server" 2>/dev/null || true
rm -rf "$D"; mkdir -p "$D"/{repo/base,repo/webapp,overlay/upper,overlay/work,server}

# The shared repository: a base OS layer and an application layer on top.
mkdir -p "$D"/repo/base/{etc,usr/bin,var/log}
echo 'NAME="Demo Linux"' > "$D/repo/base/etc/os-release"
echo 'Port 22' > "$D/repo/base/etc/sshd_config"
printf '#!/bin/sh\necho hello from the base layer\n' > "$D/repo/base/usr/bin/hello"; chmod 755 "$D/repo/base/usr/bin/hello"
mkdir -p "$D"/repo/webapp/{etc/webapp,srv/www}
echo 'workers = 4' > "$D/repo/webapp/etc/webapp/app.conf"
echo '<h1>it works</h1>' > "$D/repo/webapp/srv/www/index.html"
echo 'obsolete' > "$D/repo/webapp/etc/webapp/legacy.conf"

echo "Sample repository: $D/repo/{webapp,base} (read-only layers), overlay in $D/overlay"
show "$LAYERFS -o lowerdir=$D/repo/webapp:$D/repo/base,upperdir=$D/overlay/upper,workdir=$D/overlay/work $D/server"
show "grep ' $D/server ' /proc/mounts"

echo; echo "# 1. Reads come from the layers; the overlay is still empty."
show "ls -l $D/server/etc $D/server/etc/webapp"
show "$D/server/usr/bin/hello"
show "find $D/overlay/upper | sed 's|$D/||'"

echo; echo "# 2. Changing a file copies it up: the overlay gets a full copy, the layer is untouched."
show "echo 'workers = 16' > $D/server/etc/webapp/app.conf"
show "cat $D/server/etc/webapp/app.conf"
show "cat $D/repo/webapp/etc/webapp/app.conf"
show "ls -l $D/overlay/upper/etc/webapp/"

echo; echo "# 3. Deleting a layer file leaves a whiteout (a 0/0 character device, as kernel overlayfs)."
show "rm $D/server/etc/webapp/legacy.conf"
show "ls $D/server/etc/webapp/"
show "ls -l $D/overlay/upper/etc/webapp/legacy.conf"

echo; echo "# 4. Renaming a directory that lives in the layers: no EXDEV; a redirect is recorded."
show "mv $D/server/srv/www $D/server/srv/html && ls $D/server/srv/html"
show "getfattr --absolute-names -n trusted.overlay.redirect --only-values $D/overlay/upper/srv/html; echo"

echo; echo "# 5. The overlay alone is this server's state; unmount and mount again: all still there."
show "umount $D/server"
show "$LAYERFS -o lowerdir=$D/repo/webapp:$D/repo/base,upperdir=$D/overlay/upper,workdir=$D/overlay/work $D/server"
show "cat $D/server/etc/webapp/app.conf; ls $D/server/etc/webapp/ $D/server/srv"

echo; echo "# 6. Every change is journaled: what, when, by which user and process."
show "$CTL log"

echo; echo "# 7. A checkpoint of this server's state, then a bad change."
show "$CTL checkpoint create --name baseline --message 'approved configuration'"
show "sed -i 's/workers = 16/workers = 0/' $D/server/etc/webapp/app.conf"
show "rm $D/server/etc/sshd_config"
show "echo 'rogue' > $D/server/etc/webapp/debug.conf"
show "$CTL log --since 1m --path /etc"
show "$CTL checkpoint diff baseline"

echo; echo "# 8. Roll back while mounted: the union is the checkpoint again; the bad state is kept."
show "$CTL rollback baseline"
show "cat $D/server/etc/webapp/app.conf; ls $D/server/etc $D/server/etc/webapp"
show "$CTL checkpoint list"

echo; echo "# 9. Roll forward: the rollback saved the state before it as a checkpoint."
saved=$($CTL --json checkpoint list | python3 -c 'import json,sys; print([c["name"] for c in json.load(sys.stdin) if c["name"].startswith("pre-rollback-")][-1])')
show "$CTL rollback $saved"
show "cat $D/server/etc/webapp/app.conf; ls $D/server/etc/webapp"
show "$CTL rollback baseline && $CTL verify"
show "umount $D/server"
echo; echo "Demo done. Files are in $D."
