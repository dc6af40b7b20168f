#!/usr/bin/env bash
# layerfs agent demo: a union, the agent layerd beside it, a coordinator on
# loopback. An admin takes a checkpoint and rolls back through layerctl; the
# coordinator receives every change with the process that made it, and
# commands a checkpoint itself. Run as root on Debian 12 or later.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
D=${DEMO_DIR:-/tmp/layerfs-agent-demo}

if [ "$(id -u)" != 0 ]; then echo "run as root" >&2; exit 2; fi
dpkg -s fuse3 >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3; }
bins=(layerfs layerd layerctl layerfs-coordinator)
for b in "${bins[@]}"; do
  [ -x "target/release/$b" ] || { cargo build --release --locked --workspace; break; }
done
B=$root/target/release
export RUST_LOG=${RUST_LOG:-warn}

show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; eval "$@"; }
cleanup() {
  [ -n "${agent:-}" ] && kill "$agent" 2>/dev/null
  [ -n "${coord:-}" ] && kill "$coord" 2>/dev/null
  umount "$D/server" 2>/dev/null || true
}
trap cleanup EXIT
umount "$D/server" 2>/dev/null || true
rm -rf "$D"; mkdir -p "$D"/{repo/base/etc,overlay/upper,overlay/work,server,coord}
echo 'Port 22' > "$D/repo/base/etc/sshd_config"
echo 'workers = 4' > "$D/repo/base/etc/app.conf"

# The union, the coordinator (loopback: no TLS needed) and the agent.
"$B/layerfs" -o "lowerdir=$D/repo/base,upperdir=$D/overlay/upper,workdir=$D/overlay/work" "$D/server"
head -c 24 /dev/urandom | base64 > "$D/token"; chmod 600 "$D/token"
"$B/layerfs-coordinator" serve --listen 127.0.0.1:7443 --data "$D/coord" --token-file "$D/token" 2>"$D/coord.log" &
coord=$!
cat > "$D/agent.toml" <<EOF
socket = "$D/layerd.sock"
state_dir = "$D/layerd"
server_id = "guest01"
[[mount]]
name = "root"
path = "$D/server"
[coordinator]
address = "127.0.0.1:7443"
token_file = "$D/token"
role = "manager"
EOF
"$B/layerd" --config "$D/agent.toml" 2>"$D/layerd.log" &
agent=$!
for _ in $(seq 100); do [ -S "$D/layerd.sock" ] && break; sleep 0.1; done
CTL="$B/layerctl -s $D/layerd.sock"
COORD="$B/layerfs-coordinator --data $D/coord"

echo "# 1. An admin on the guest: status and a checkpoint through layerctl."
show "$CTL status"
show "$CTL checkpoint create --name approved --message 'approved configuration'"

echo; echo "# 2. Someone changes the configuration; the change is journaled with its process."
show "sed -i 's/workers = 4/workers = 0/' $D/server/etc/app.conf"
show "rm $D/server/etc/sshd_config"
show "$CTL log --path /etc"

echo; echo "# 3. The admin rolls back; the union is the checkpoint again."
show "$CTL checkpoint diff approved"
show "$CTL rollback approved"
show "cat $D/server/etc/app.conf; ls $D/server/etc"

echo; echo "# 4. The coordinator received every change, with the process that made it."
sleep 1
show "$COORD servers | python3 -m json.tool | head -30"
show "$COORD changes --server guest01 | python3 -c 'import json,sys; [print(r[\"seq\"], r[\"op\"], r[\"path\"], r[\"comm\"]) for r in json.load(sys.stdin)]'"

echo; echo "# 5. The coordinator commands a checkpoint; the agent runs it under the coordinator's role and audits it."
show "$COORD command --server guest01 checkpoint --name from-coordinator | python3 -m json.tool | head -12"
show "$CTL checkpoint list"
show "$CTL audit --limit 20"
echo; echo "Demo done. Files are in $D."
