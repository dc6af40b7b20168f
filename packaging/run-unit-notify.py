#!/usr/bin/env python3
"""Run the ExecStart= of layerfs@.service the way systemd would for Type=notify,
without systemd: used by packaging/ci-packages.sh where PID 1 is not systemd.

    run-unit-notify.py UNITFILE INSTANCE ENVFILE

- Environment= defaults, then ENVFILE (stands in for the unit's
  EnvironmentFile=, whose path names /etc), then ${VAR} and %i in ExecStart=.
- Starts the command with $NOTIFY_SOCKET, waits for READY=1 (30 s), checks
  that MOUNTPOINT is mounted and listable at that moment (the guarantee units
  ordered after the service rely on), then sends SIGTERM as "systemctl stop"
  does and checks that the process exits 0 within TimeoutStopSec and the
  mount is gone.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time


def parse_unit(path):
    env, exec_start = {}, None
    for raw in open(path, encoding="utf-8"):
        line = raw.strip()
        if line.startswith("Environment="):
            for item in shlex.split(line[len("Environment="):]):
                k, _, v = item.partition("=")
                env[k] = v
        elif line.startswith("ExecStart="):
            exec_start = line[len("ExecStart="):]
    if exec_start is None:
        sys.exit(f"{path}: no ExecStart=")
    return env, exec_start


def parse_envfile(path, env):
    for raw in open(path, encoding="utf-8"):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        k, _, v = line.partition("=")
        env[k.strip()] = " ".join(shlex.split(v)) if v.strip() else ""


def expand(exec_start, env, instance):
    # systemd: "${VAR}" is replaced by exactly one argument (even when empty);
    # the command line is split on whitespace first.
    argv = []
    for word in shlex.split(exec_start.replace("%i", instance)):
        argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split(" ")[4] == path for line in f)


def main():
    unit, instance, envfile = sys.argv[1:4]
    env, exec_start = parse_unit(unit)
    parse_envfile(envfile, env)
    argv = expand(exec_start, env, instance)
    mountpoint = env["MOUNTPOINT"]
    print("ExecStart:", " ".join(shlex.quote(a) for a in argv))

    with tempfile.TemporaryDirectory() as d:
        sock_path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(30)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": sock_path})
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            proc.kill()
            sys.exit("no READY=1 within 30 s")
        ready = time.monotonic() - t0
        if "READY=1" not in msg.split("\n"):
            proc.kill()
            sys.exit(f"unexpected notification {msg!r}")
        if not is_mounted(mountpoint):
            proc.kill()
            sys.exit(f"READY=1 arrived but {mountpoint} is not mounted")
        entries = sorted(os.listdir(mountpoint))
        print(f"READY=1 after {ready:.2f}s; {mountpoint} mounted, entries: {entries}")

        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            sys.exit("layerfs did not exit within 30 s of SIGTERM")
        if rc != 0:
            sys.exit(f"layerfs exited {rc} after SIGTERM")
        if is_mounted(mountpoint):
            sys.exit(f"{mountpoint} still mounted after SIGTERM")
        print("SIGTERM: layerfs unmounted and exited 0")


if __name__ == "__main__":
    main()
