#!/usr/bin/env python3
"""Checkpoint, rollback, dedup and journal-overhead benchmark of layerfs, side by side.

Started by bench/history.sh (which installs the tools and builds layerfs and layerfs-ctl); see the
"History" section of bench/README.md for what runs and how to read the table.  Like bench.py it is a
measurement, never a test: a slow number never fails it, but a step that errors (a mount, a
layerfs-ctl call, a rollback that leaves the wrong content) makes it exit 1 after the report is
written.  Only the standard library is used; helpers come from bench.py.
"""

import argparse
import fcntl
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

from bench import BenchError, _rm, _zombie, log, machine_meta, sh

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SEED = 20261125
GiB, MiB = 1 << 30, 1 << 20

SIZES = {
    # rounds: change sets per variant (checkpoint right after the changes / after a separate sync).
    "full": dict(files=100_000, bytes=5 * GiB, lower_files=1_000, rewrite=1_000, create=100, delete=100,
                 rounds=3, dedup_files=1_024, dedup_rewrite=10, dedup_checkpoints=10, journal_runs=9,
                 image="40G"),
    "quick": dict(files=10_000, bytes=200 * MiB, lower_files=200, rewrite=100, create=10, delete=10,
                  rounds=3, dedup_files=100, dedup_rewrite=1, dedup_checkpoints=10, journal_runs=1,
                  image="4G"),
}
JOURNAL_KEYS = ["create", "delete", "untar", "rewrite", "append1", "append2"]
JOURNAL_BACKENDS = "overlay,layerfs,layerfs-nojournal"
BARS = dict(checkpoint_s=1.0, hold_s=0.100, rollback_s=2.0, store_bytes=1.2 * GiB, journal_cost=0.05)


def timed(cmd, timeout=3600):
    t0 = time.perf_counter()
    sh(cmd, timeout=timeout)
    return time.perf_counter() - t0


def syncfs(path):
    """Flush the benchmark filesystem only (`sync -f`): the host's own writes stay out of the timing."""
    return timed(["sync", "-f", path])


def med(v):
    return statistics.median(v) if v else None


# --------------------------------------------------------------------------- layerfs mount

class Mount:
    """One layerfs mount: lower, upper, work and mnt under `base`."""

    def __init__(self, base, bin_, ctl, logdir, name):
        self.base, self.bin, self.ctl_bin, self.name = base, bin_, ctl, name
        self.lower, self.upper, self.work, self.mnt = (os.path.join(base, x) for x in
                                                       ("lower", "upper", "work", "mnt"))
        self.objects = os.path.join(self.work, "layerfs", "objects")
        self.logpath = os.path.join(logdir, f"{name}.log")
        self.pid = None
        for d in (self.lower, self.upper, self.work, self.mnt):
            os.makedirs(d, exist_ok=True)

    def mounted(self):
        mnt = self.mnt.encode()
        with open("/proc/self/mountinfo", "rb") as f:
            return any(line.split()[4] == mnt for line in f)

    def mount(self):
        cmd = [self.bin, "-o", f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}", self.mnt]
        with open(self.logpath, "a") as lf:
            lf.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
            lf.flush()
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, timeout=600)
            except subprocess.TimeoutExpired:
                raise BenchError(f"mount timed out: {' '.join(cmd)}")
            secs = time.perf_counter() - t0
        if p.returncode != 0 or not self.mounted():
            tail = open(self.logpath).read().strip().splitlines()[-2:]
            raise BenchError(f"mount failed (exit {p.returncode}): {' | '.join(tail)}")
        self.pid = self.find_pid()
        return secs

    def find_pid(self):
        want = os.path.basename(self.bin)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0].decode(errors="replace")) == want and self.mnt.encode() in argv:
                return int(d)
        return None

    def umount(self):
        if self.mounted():
            p = sh(["umount", self.mnt], timeout=300, check=False)
            if p.returncode != 0:
                log(f"  {self.name}: umount failed ({p.stderr.strip()}); lazy unmount")
                subprocess.run(["umount", "-l", self.mnt], stderr=subprocess.DEVNULL, timeout=60)
        if self.pid:
            # The daemon closes its database after the unmount: wait for it (by pid) before the image goes.
            for _ in range(600):
                if not os.path.exists(f"/proc/{self.pid}") or _zombie(self.pid):
                    break
                time.sleep(0.1)
            else:
                log(f"  {self.name}: daemon {self.pid} still running 60 s after unmount; killing it")
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass
            self.pid = None

    def ctl(self, *args, timeout=3600):
        """layerfs-ctl --json ARGS; returns the parsed JSON and the command's wall time."""
        t0 = time.perf_counter()
        p = sh([self.ctl_bin, "-m", self.mnt, "--json", *args], timeout=timeout)
        wall = time.perf_counter() - t0
        try:
            return json.loads(p.stdout), wall
        except ValueError:
            raise BenchError(f"layerfs-ctl {' '.join(args)}: not JSON: {p.stdout[:200]!r}")

    def checkpoint(self, name):
        js, wall = self.ctl("checkpoint", "create", "--name", name)
        for k in ("took_ms", "hold_ms"):
            if not isinstance(js.get(k), (int, float)):
                raise BenchError(f"checkpoint create {name}: no {k} in {js}")
        return dict(name=name, took=js["took_ms"] / 1e3, hold=js["hold_ms"] / 1e3, wall=wall,
                    files=js.get("files"), bytes=js.get("bytes"))

    def rollback(self, name):
        js, wall = self.ctl("rollback", name)
        for k in ("took_ms", "hold_ms", "changed_paths"):
            if not isinstance(js.get(k), (int, float)):
                raise BenchError(f"rollback {name}: no {k} in {js}")
        return dict(to=name, took=js["took_ms"] / 1e3, hold=js["hold_ms"] / 1e3, wall=wall,
                    changed=js["changed_paths"], saved_as=js.get("saved_as"))

    def store_sizes(self):
        st, _ = self.ctl("status")
        du_b = int(sh(["du", "-sb", self.objects]).stdout.split()[0])
        du_alloc = int(sh(["du", "-s", "--block-size=1", self.objects]).stdout.split()[0])
        return dict(store_bytes=st.get("store_bytes"), du_sb=du_b, du_alloc=du_alloc,
                    checkpoints=st.get("checkpoints"))


# --------------------------------------------------------------------------- part 1: checkpoints

class Corpus:
    """The 5 GiB upper: deterministic names, sizes and bytes (a header makes every file version unique)."""

    def __init__(self, P):
        self.P = P
        rng = random.Random(SEED)
        self.blob = rng.randbytes(64 * MiB)
        raw = [rng.lognormvariate(9.6, 1.3) for _ in range(P["files"])]
        scale = P["bytes"] / sum(raw)
        self.files = {}  # id -> [rel, size, version]; present in the union
        for fid, r in enumerate(raw):
            size = min(max(int(r * scale), 64), 8 * MiB)
            self.files[fid] = [self.rel(fid), size, 0]
        self.dirs = sorted({os.path.dirname(v[0]) for v in self.files.values()})
        self.next_id = P["files"]

    @staticmethod
    def rel(fid):
        return f"srv/d{fid // 1000:03d}/s{fid // 100 % 10}/f{fid:06d}.bin"

    def content(self, fid, ver, size):
        head = b"layerfs-history file %d version %d\n" % (fid, ver)
        off = (fid * 2654435761 + ver * 40503) % (len(self.blob) - size)
        return head + self.blob[off:off + size - len(head)]

    def expect(self, fid):
        rel, size, ver = self.files[fid]
        return rel, hashlib.sha256(self.content(fid, ver, size)).hexdigest()

    def populate(self, upper, lower):
        rng = random.Random(SEED + 1)
        for d in self.dirs:
            os.makedirs(os.path.join(upper, d), exist_ok=True)
        for fid, (rel, size, ver) in self.files.items():
            with open(os.path.join(upper, rel), "wb") as f:
                f.write(self.content(fid, ver, size))
        # A small lower layer: a base tree, and a few files in the upper's directories (merged).
        for k in range(self.P["lower_files"]):
            rel = (f"usr/share/base/p{k % 50:02d}/file{k}.txt" if k % 10
                   else f"{self.dirs[k % len(self.dirs)]}/lower-{k}.txt")
            p = os.path.join(lower, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(self.content(10_000_000 + k, 0, rng.randint(256, 8192)))

    def plan(self, rnd):
        """One change set: (rewrite ids, delete ids, new [(id, rel, size)])."""
        P, rng = self.P, random.Random(SEED + 1000 + rnd)
        ids = rng.sample(sorted(self.files), P["rewrite"] + P["delete"])
        new = []
        for _ in range(P["create"]):
            fid = self.next_id
            self.next_id += 1
            size = self.files[rng.choice(ids)][1]
            new.append((fid, f"{rng.choice(self.dirs)}/new-{fid:07d}.bin", size))
        return ids[:P["rewrite"]], ids[P["rewrite"]:], new

    def apply(self, mnt, plan):
        """Make the changes through the union; returns the seconds it took (no sync)."""
        rewrite, delete, new = plan
        t0 = time.perf_counter()
        for fid in rewrite:
            ent = self.files[fid]
            ent[2] += 1
            with open(os.path.join(mnt, ent[0]), "wb") as f:  # O_TRUNC: a full rewrite, same size
                f.write(self.content(fid, ent[2], ent[1]))
        for fid, rel, size in new:
            with open(os.path.join(mnt, rel), "xb") as f:
                f.write(self.content(fid, 0, size))
            self.files[fid] = [rel, size, 0]
        for fid in delete:
            os.unlink(os.path.join(mnt, self.files.pop(fid)[0]))
        return time.perf_counter() - t0

    def snapshot(self):
        return {fid: list(v) for fid, v in self.files.items()}


def check_union(mnt, present, absent, what):
    """Read files through the union and compare with the expected bytes; raise on any difference."""
    bad = []
    for fid, (rel, sha) in present.items():
        try:
            with open(os.path.join(mnt, rel), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            bad.append(f"{rel}: {e}")
            continue
        if got != sha:
            bad.append(f"{rel}: content differs (sha256 {got[:12]}, expected {sha[:12]})")
    for rel in absent:
        if os.path.lexists(os.path.join(mnt, rel)):
            bad.append(f"{rel}: exists, expected absent")
    if bad:
        raise BenchError(f"{what}: {len(bad)} of {len(present) + len(absent)} checked files wrong: "
                         + "; ".join(bad[:5]))
    return len(present) + len(absent)


def part_checkpoint(P, fs, a, logdir):
    res = dict(rounds=[], rollbacks=[])
    base = os.path.join(fs, "cp")
    m = Mount(base, a.layerfs, a.ctl, logdir, "checkpoint")
    snaps, copy = os.path.join(base, "snaps"), os.path.join(base, "copy")
    os.makedirs(snaps, exist_ok=True)
    corpus = Corpus(P)
    try:
        log(f"populating the upper: {P['files']:,} files, {P['bytes'] / GiB:.2f} GiB; lower: "
            f"{P['lower_files']:,} small files")
        t0 = time.perf_counter()
        corpus.populate(m.upper, m.lower)
        syncfs(m.upper)
        total = sum(v[1] for v in corpus.files.values())
        res["upper"] = dict(files=len(corpus.files), bytes=total, dirs=len(corpus.dirs),
                            populate_s=round(time.perf_counter() - t0, 1))
        log(f"  {len(corpus.files):,} files, {total:,} bytes (mean {total / len(corpus.files) / 1024:.1f} KiB) "
            f"in {res['upper']['populate_s']} s")
        res["mount_s"] = m.mount()
        log(f"mounted layerfs in {res['mount_s']:.2f} s")

        log("first full checkpoint (cp0)")
        c = m.checkpoint("cp0")
        res["first"] = c
        log(f"  took {c['took']:.2f} s, writes held {c['hold'] * 1e3:.0f} ms ({c['files']} files)")
        res["store_after_first"] = m.store_sizes()
        log("rsync -a: first full copy of the upper (the base for --link-dest)")
        res["rsync_first_s"] = timed(["rsync", "-a", m.upper + "/", os.path.join(snaps, "r0") + "/"])
        log(f"  {res['rsync_first_s']:.2f} s")
        syncfs(m.upper)

        n = 2 * P["rounds"]
        for rnd in range(1, n + 1):
            # Alternate so that drift (page cache filling, other load) hits both variants alike.
            variant = "direct" if rnd % 2 else "after-sync"
            syncfs(m.upper)  # clean start: nothing left over from the previous round's copies
            time.sleep(1)
            before_last = corpus.snapshot()
            plan = corpus.plan(rnd)
            r = dict(round=rnd, variant=variant)
            r["changes_s"] = corpus.apply(m.mnt, plan)
            if variant == "after-sync":
                r["sync_s"] = syncfs(m.upper)
            c = m.checkpoint(f"cp{rnd}")
            r.update(checkpoint_s=c["took"], hold_s=c["hold"], ctl_wall_s=c["wall"])
            r["rsync_s"] = timed(["rsync", "-a", f"--link-dest={os.path.join(snaps, f'r{rnd - 1}')}",
                                  m.upper + "/", os.path.join(snaps, f"r{rnd}") + "/"])
            r["cp_s"] = timed(["cp", "-a", "--reflink=auto", m.upper, copy])
            _rm(copy)
            res["rounds"].append(r)
            log(f"  round {rnd} ({variant}): changes {r['changes_s']:.2f} s"
                + (f", sync {r['sync_s']:.3f} s" if "sync_s" in r else "")
                + f"; checkpoint {r['checkpoint_s'] * 1e3:.0f} ms (held {r['hold_s'] * 1e3:.1f} ms); "
                f"rsync --link-dest {r['rsync_s']:.2f} s; cp -a {r['cp_s']:.2f} s")
            last_plan = plan

        # Rollback to the checkpoint before the last change set, forward again, and back once more.
        after_last = corpus.snapshot()
        rewrite, delete, new = last_plan
        sample_rw, sample_del, sample_new = rewrite[:5], delete[:3], [x[0] for x in new[:3]]
        keep = [fid for fid in sorted(after_last) if fid in before_last and fid not in set(rewrite)][:2]

        def expect(state, fids):
            return {fid: (state[fid][0], hashlib.sha256(corpus.content(fid, state[fid][2], state[fid][1]))
                          .hexdigest()) for fid in fids}
        old_state = (expect(before_last, sample_rw + sample_del + keep), [after_last[f][0] for f in sample_new])
        new_state = (expect(after_last, sample_rw + sample_new + keep), [before_last[f][0] for f in sample_del])
        prev = f"cp{n - 1}"
        syncfs(m.upper)
        time.sleep(1)
        forward = None
        for step, (target, state, what) in enumerate([(prev, old_state, "rollback"),
                                                      (None, new_state, "roll forward"),
                                                      (prev, old_state, "rollback again")]):
            rb = m.rollback(target or forward)
            if step == 0:
                forward = rb["saved_as"]
                if not forward:
                    raise BenchError(f"rollback {prev}: no saved_as in the report")
            rb["what"] = what
            rb["checked"] = check_union(m.mnt, state[0], state[1], f"after {what} to {rb['to']}")
            res["rollbacks"].append(rb)
            log(f"  {what} to {rb['to']}: took {rb['took'] * 1e3:.0f} ms, held {rb['hold'] * 1e3:.0f} ms, "
                f"{rb['changed']} paths changed; {rb['checked']} files checked through the union: ok")
        res["store_end"] = m.store_sizes()
    finally:
        m.umount()
    return res


# --------------------------------------------------------------------------- part 2: dedup

def part_dedup(P, fs, a, logdir):
    base = os.path.join(fs, "dedup")
    m = Mount(base, a.layerfs, a.ctl, logdir, "dedup")
    n, k = P["dedup_files"], P["dedup_rewrite"]

    def data(fid, ver):
        return random.Random(f"{SEED}-{fid}-{ver}").randbytes(MiB)

    def rel(fid):
        return f"data/g{fid // 128:02d}/blob{fid:05d}.bin"

    res = dict(files=n, file_bytes=MiB, rounds=[])
    try:
        log(f"populating the upper: {n:,} files of 1 MiB of random data")
        for fid in range(n):
            p = os.path.join(m.upper, rel(fid))
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data(fid, 0))
        with open(os.path.join(m.lower, "README"), "w") as f:
            f.write("lower layer of the dedup benchmark\n")
        syncfs(m.upper)
        m.mount()
        versions = [0] * n
        rewritten = 0
        for c in range(1, P["dedup_checkpoints"] + 1):
            if c > 1:
                for fid in random.Random(SEED + 2000 + c).sample(range(n), k):
                    versions[fid] += 1
                    with open(os.path.join(m.mnt, rel(fid)), "wb") as f:
                        f.write(data(fid, versions[fid]))
                    rewritten += 1
            cp = m.checkpoint(f"d{c}")
            res["rounds"].append(dict(name=cp["name"], took=cp["took"], hold=cp["hold"]))
        res["rewritten_files"] = rewritten
        res["distinct_bytes"] = (n + rewritten) * MiB  # every version of every file, once
        res.update(m.store_sizes())
        log(f"  {P['dedup_checkpoints']} checkpoints, {rewritten} files rewritten in between: store "
            f"{res['du_sb'] / GiB:.3f} GiB (du -sb), status.store_bytes {res['store_bytes'] / GiB:.3f} GiB; "
            f"every version once: {res['distinct_bytes'] / GiB:.3f} GiB")
    finally:
        m.umount()
    return res


# --------------------------------------------------------------------------- part 3: journal overhead

def part_journal(a, out):
    jout = os.path.join(out, "journal")
    cmd = [os.path.join(HERE, "run.sh"), "--backends", JOURNAL_BACKENDS, "--only", ",".join(JOURNAL_KEYS),
           "--out", jout, "--workdir", a.workdir, "--runs", str(a.journal_runs)]
    if a.quick:
        cmd.append("--quick")
    env = dict(os.environ, LAYERFS=a.layerfs)
    log(f"journal overhead: {' '.join(cmd)}")
    p = subprocess.run(cmd, env=env)
    if p.returncode != 0:
        raise BenchError(f"bench/run.sh exited {p.returncode}")
    return load_journal(os.path.join(jout, "results.json"), " ".join(cmd))


def load_journal(path, command):
    """The journal part's rows from bench.py's results.json."""
    with open(path) as f:
        js = json.load(f)
    rows = []
    for r in js["rows"]:
        if r["key"] not in JOURNAL_KEYS:
            continue
        v, runs = r["values"], r["runs"]
        cost = None if not r.get("vs_nojournal") else 1 / r["vs_nojournal"] - 1
        # Best of the runs too: other load on the machine only ever slows a run down, so the best run
        # is the least disturbed one; the spread (slowest / fastest run) says how disturbed they were.
        on, off = runs.get("layerfs") or [], runs.get("layerfs-nojournal") or []
        pick = max if r["better"] == "higher" else min
        cost_best = spread = None
        if on and off and pick(on) and pick(off):
            cost_best = (pick(off) / pick(on) if r["better"] == "higher" else pick(on) / pick(off)) - 1
            spread = max(max(x) / min(x) for x in (on, off) if min(x) > 0)
        rows.append(dict(key=r["key"], workload=r["workload"], unit=r["unit"], better=r["better"],
                         overlay=v.get("overlay"), layerfs=v.get("layerfs"),
                         nojournal=v.get("layerfs-nojournal"), cost=cost, cost_best=cost_best, spread=spread,
                         vs_kernel=r.get("vs_kernel"), runs=runs, errors=r["errors"]))
    return dict(rows=rows, meta=js["meta"], command=command)


# --------------------------------------------------------------------------- report

def f_s(v):
    if v is None:
        return "-"
    return f"{v * 1e3:.0f} ms" if v < 10 else f"{v:.1f} s"


def yes_no(ok):
    return "-" if ok is None else ("yes" if ok else "**no**")


def summarise(P, cp, dd, jn):
    """Table rows: (measure, value, compared with, ratio, bar, met) and the JSON summary."""
    rows, summ = [], {}
    if cp:
        direct = [r for r in cp["rounds"] if r["variant"] == "direct"]
        synced = [r for r in cp["rounds"] if r["variant"] == "after-sync"]
        ck, hold = med([r["checkpoint_s"] for r in direct]), med([r["hold_s"] for r in direct])
        ck2, hold2 = med([r["checkpoint_s"] for r in synced]), med([r["hold_s"] for r in synced])
        rb = med([r["took"] for r in cp["rollbacks"]])
        rbh = med([r["hold"] for r in cp["rollbacks"]])
        rs, cpa = med([r["rsync_s"] for r in cp["rounds"]]), med([r["cp_s"] for r in cp["rounds"]])
        sy, ch = med([r["sync_s"] for r in synced]), med([r["changes_s"] for r in cp["rounds"]])
        changed = med([r["changed"] for r in cp["rollbacks"]])
        u = cp["upper"]
        chg = f"{P['rewrite']:,} rewritten + {P['create']} created + {P['delete']} deleted"
        summ.update(checkpoint_s=ck, hold_s=hold, checkpoint_after_sync_s=ck2, hold_after_sync_s=hold2,
                    rollback_s=rb, rollback_hold_s=rbh, rollback_changed_paths=changed, rsync_link_dest_s=rs,
                    cp_a_s=cpa, sync_changes_s=sy, changes_s=ch, first_checkpoint_s=cp["first"]["took"],
                    first_hold_s=cp["first"]["hold"], rsync_first_s=cp["rsync_first_s"],
                    bar_checkpoint=ck is not None and ck < BARS["checkpoint_s"],
                    bar_hold=hold is not None and hold < BARS["hold_s"],
                    bar_rollback=rb is not None and rb < BARS["rollback_s"])

        def ratio(other, mine):
            return None if not other or not mine else other / mine
        rows += [
            ("checkpoint", f"first full checkpoint ({u['files']:,} files, {u['bytes'] / GiB:.2f} GiB)",
             f_s(cp["first"]["took"]) + f" (held {f_s(cp['first']['hold'])})", "rsync -a, first full copy: "
             + f_s(cp["rsync_first_s"]), ratio(cp["rsync_first_s"], cp["first"]["took"]), "none (may be slow)", None),
            ("checkpoint", f"checkpoint after {chg}, median of {len(direct)}", f_s(ck),
             "-", None, "< 1 s", summ["bar_checkpoint"]),
            ("checkpoint", "  writes held during it", f_s(hold), "-", None, "< 100 ms", summ["bar_hold"]),
            ("checkpoint", "  vs rsync -a --link-dest snapshot of the upper", f_s(ck),
             f"rsync --link-dest: {f_s(rs)}", ratio(rs, ck), "-", None),
            ("checkpoint", "  vs cp -a --reflink=auto copy of the upper (ext4: a real copy)", f_s(ck),
             f"cp -a: {f_s(cpa)}", ratio(cpa, ck), "-", None),
            ("checkpoint", f"checkpoint after a separate sync of the changes, median of {len(synced)}",
             f_s(ck2) + f" (held {f_s(hold2)})", f"sync -f of the changes alone: {f_s(sy)}", ratio(sy, ck2),
             "-", None),
            ("checkpoint", f"rollback to the previous checkpoint ({changed:,.0f} paths), median of "
             f"{len(cp['rollbacks'])}", f_s(rb) + f" (held {f_s(rbh)})", "-", None, "< 2 s", summ["bar_rollback"]),
        ]
    if dd:
        ok = dd["du_sb"] <= BARS["store_bytes"] and (dd["store_bytes"] or 0) <= BARS["store_bytes"]
        summ.update(store_du_sb=dd["du_sb"], store_bytes=dd["store_bytes"], store_du_alloc=dd["du_alloc"],
                    bar_store=ok)
        nck = len(dd["rounds"])
        rows.append(("dedup", f"object store after {nck} checkpoints of {dd['files'] * dd['file_bytes'] / GiB:.2f} GiB "
                     f"({dd['rewritten_files']} files of 1 MiB rewritten in between)",
                     f"{dd['du_sb'] / GiB:.3f} GiB (du -sb); store_bytes {dd['store_bytes'] / GiB:.3f} GiB",
                     f"{nck} full copies: {nck * dd['files'] * dd['file_bytes'] / GiB:.2f} GiB; every version "
                     f"once: {dd['distinct_bytes'] / GiB:.3f} GiB (store {dd['du_sb'] / dd['distinct_bytes'] * 100 - 100:+.1f} %)",
                     nck * dd["files"] * dd["file_bytes"] / dd["du_sb"], "<= 1.2 GiB", ok))
    if jn:
        worst = None
        for r in jn["rows"]:
            if r["errors"]:
                ok, val = False, "ERROR: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items())
            elif r["cost"] is None:
                ok, val = None, "-"
            else:
                ok, val = r["cost"] < BARS["journal_cost"], f"{r['cost'] * 100:+.1f} %"
                if r.get("cost_best") is not None:
                    val += f" (best runs: {r['cost_best'] * 100:+.1f} %)"
                if (r.get("spread") or 0) > 1.3:
                    val += f"; noisy: runs differ up to {r['spread']:.1f}x"
                worst = r["cost"] if worst is None else max(worst, r["cost"])
            unit = r["unit"]
            fmt = (lambda v: "-" if v is None else (f"{v:.3f}" if unit == "s" else f"{v:,.0f}"))
            rows.append(("journal", f"{r['workload']} ({unit}, {r['better']} is better): journal cost",
                         val, f"journal=off {fmt(r['nojournal'])}, on {fmt(r['layerfs'])}; kernel overlayfs "
                         f"{fmt(r['overlay'])}", r["vs_kernel"], "< 5 %", ok))
        summ["journal_worst_cost"] = worst
    return rows, summ


def write_report(P, meta, cp, dd, jn, errors, out, results_dir):
    rows, summ = summarise(P, cp, dd, jn)
    md = ["# layerfs history benchmark: checkpoints, rollback, dedup, journal overhead", ""]
    md += [f"- date: {meta['date']}", f"- machine: {meta['machine']}; nproc {meta['nproc']}",
           f"- kernel: {meta['kernel']}; os: {meta['os']}",
           f"- layerfs: {meta['layerfs']}",
           f"- mode: {meta['mode']}; everything on a loop-mounted ext4 image ({meta.get('image', '?')})",
           f"- load average at start / end: {meta['loadavg_start']} / {meta.get('loadavg_end', '?')}", ""]
    md += ["Ratios: how many times faster (or smaller) layerfs is than the thing it is compared with "
           "(the other's time or size / layerfs's); below 1.00x layerfs is slower. For the journal rows the ratio "
           "is layerfs (journal on) against kernel overlayfs, and the cost is layerfs journal=off -> on "
           "(positive: the journal makes it slower).", ""]
    md += ["| part | measure | layerfs | compared with | ratio | bar | met |", "|---|---|---|---|---|---|---|"]
    for part, what, val, other, ratio, bar, ok in rows:
        md.append(f"| {part} | {what} | {val} | {other} | {'-' if ratio is None else f'{ratio:.2f}x'} | {bar} | "
                  f"{yes_no(ok)} |")
    if cp:
        md += ["", "Checkpoint rounds (each: changes through the union, then the checkpoint; `after-sync` rounds "
               "time a `sync -f` of the changes first; then the rsync and cp snapshots of the same upper):", "",
               "| round | variant | changes | sync -f | checkpoint took | held | rsync --link-dest | cp -a |",
               "|---|---|---|---|---|---|---|---|"]
        for r in cp["rounds"]:
            md.append(f"| {r['round']} | {r['variant']} | {f_s(r['changes_s'])} | {f_s(r.get('sync_s'))} | "
                      f"{f_s(r['checkpoint_s'])} | {r['hold_s'] * 1e3:.1f} ms | {f_s(r['rsync_s'])} | {f_s(r['cp_s'])} |")
        md += ["", "| rollback | took | held | paths changed | files checked through the union |",
               "|---|---|---|---|---|"]
        for r in cp["rollbacks"]:
            md.append(f"| {r['what']} to {r['to']} | {f_s(r['took'])} | {f_s(r['hold'])} | {r['changed']:,} | "
                      f"{r['checked']} ok |")
        s = cp["store_end"]
        md += ["", f"Object store after the checkpoint part: {s['du_sb'] / GiB:.2f} GiB (du -sb), "
               f"status.store_bytes {s['store_bytes'] / GiB:.2f} GiB, {s['checkpoints']} checkpoints."]
    if dd:
        md += ["", "Dedup checkpoints: " + ", ".join(f"{c['name']} {f_s(c['took'])} (held {f_s(c['hold'])})"
                                                  for c in dd["rounds"])]
    if jn:
        md += ["", f"Journal overhead: `{jn['command']}` (medians of {jn['meta']['runs']} run(s), load average "
               f"{jn['meta'].get('loadavg_start', '?')} at the start; full table in journal/results.md of the "
               f"output directory). Every run:", "",
               "| workload | unit | kernel overlayfs | layerfs | layerfs journal=off |", "|---|---|---|---|---|"]
        for r in jn["rows"]:
            fmt = (lambda v, u=r["unit"]: f"{v:.3f}" if u == "s" else f"{v:,.0f}")
            md.append(f"| {r['key']} | {r['unit']} | " + " | ".join(
                ", ".join(fmt(x) for x in r["runs"].get(b) or []) or "-"
                for b in ("overlay", "layerfs", "layerfs-nojournal")) + " |")
    if errors:
        md += ["", "Errors:", ""] + [f"{i + 1}. {e}" for i, e in enumerate(errors)]
    text = "\n".join(md) + "\n"
    doc = dict(meta=meta, sizes=P, bars=BARS, summary=summ, checkpoint=cp, dedup=dd,
               journal=jn and {k: jn[k] for k in ("rows", "command")}, errors=errors)
    paths = [os.path.join(out, "history.md")]
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        paths.append(os.path.join(results_dir, f"{meta['date'][:10]}-history.md"))
    for p in paths:
        with open(p, "w") as f:
            f.write(text)
        with open(p[:-3] + ".json", "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return text, paths


# --------------------------------------------------------------------------- main

def clear_stale(prefix):
    """Unmount what a killed earlier run left under prefix (deepest first), and free its loop devices."""
    with open("/proc/self/mountinfo") as f:
        mnts = [l.split()[4] for l in f]
    for m in sorted((m for m in mnts if m.startswith(prefix)), key=len, reverse=True):
        log(f"unmounting {m}, left by an earlier run")
        if subprocess.run(["umount", m], stderr=subprocess.DEVNULL, timeout=300).returncode != 0:
            subprocess.run(["umount", "-l", m], timeout=60)
    out = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():
        if prefix in line:
            dev = line.split(":", 1)[0]
            log(f"detaching {dev}, left by an earlier run")
            subprocess.run(["losetup", "-d", dev], timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--parts", default="checkpoint,dedup,journal", help="which parts to run")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "history"))
    ap.add_argument("--results-dir", help="also write DATE-history.md/.json here (full runs: bench/results)")
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench")
    ap.add_argument("--journal-runs", type=int)
    ap.add_argument("--layerfs", required=True)
    ap.add_argument("--ctl", required=True)
    ap.add_argument("--layerfs-version", default="?")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("history: must run as root (mounts, loop devices)")
    # Absolute: mount points are compared with /proc/self/mountinfo.
    a.workdir, a.out = os.path.realpath(a.workdir), os.path.realpath(a.out)
    # SIGTERM (history.sh forwards Ctrl-C as one) unwinds like an error: the finally blocks unmount.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = "quick" if a.quick else "full"
    P = dict(SIZES[mode])
    a.journal_runs = a.journal_runs or P["journal_runs"]
    parts = [p for p in a.parts.split(",") if p]
    if set(parts) - {"checkpoint", "dedup", "journal"}:
        sys.exit(f"history: unknown part(s) in --parts {a.parts}")
    if a.results_dir is None and mode == "full":
        a.results_dir = os.path.join(HERE, "results")
    os.makedirs(a.out, exist_ok=True)
    logdir = os.path.join(a.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(a.workdir, exist_ok=True)

    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mode=mode, nproc=os.cpu_count(),
                loadavg_start=" ".join(open("/proc/loadavg").read().split()[:3]), **machine_meta(),
                layerfs=a.layerfs_version, parts=parts)
    img = os.path.join(a.workdir, f"history-{mode}.img")
    fs = os.path.join(a.workdir, f"history-{mode}")
    cp = dd = jn = None
    errors = []

    if {"checkpoint", "dedup"} & set(parts):
        # The same lock as bench.py: a run of either waits for the other (they would share the disk and CPU).
        lock = open(os.path.join(a.workdir, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another benchmark run holds {a.workdir}/.lock; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        clear_stale(os.path.realpath(a.workdir).rstrip("/") + "/history-")
        loop = None
        try:
            for p in (img,):
                if os.path.exists(p):
                    os.unlink(p)
            log(f"creating {P['image']} ext4 image {img}")
            sh(["truncate", "-s", P["image"], img])
            sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img], timeout=900)
            p = sh(["losetup", "-f", "--show", "--direct-io=on", img], check=False)
            if p.returncode != 0:
                p = sh(["losetup", "-f", "--show", img])
            loop = p.stdout.strip()
            dio = open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
            os.makedirs(fs, exist_ok=True)
            sh(["mount", "-t", "ext4", loop, fs])
            meta["image"] = f"{P['image']} ext4, default mount options (no discard), loop direct-io " \
                            f"{'on' if dio else 'off'}"
            if "checkpoint" in parts:
                log("== checkpoint and rollback")
                try:
                    cp = part_checkpoint(P, fs, a, logdir)
                except (BenchError, OSError, subprocess.SubprocessError) as e:
                    log(f"ERROR checkpoint part: {e}")
                    errors.append(f"checkpoint part: {e}")
                _rm(os.path.join(fs, "cp"))  # free the space for the next part
            if "dedup" in parts:
                log("== dedup")
                try:
                    dd = part_dedup(P, fs, a, logdir)
                except (BenchError, OSError, subprocess.SubprocessError) as e:
                    log(f"ERROR dedup part: {e}")
                    errors.append(f"dedup part: {e}")
        finally:
            clear_stale(fs + "/")
            if os.path.ismount(fs):
                subprocess.run(["umount", fs], timeout=300)
            if loop:
                subprocess.run(["losetup", "-d", loop], timeout=60)
            if os.path.exists(img):
                os.unlink(img)
            lock.close()

    if "journal" in parts:
        log("== journal overhead")
        try:
            jn = part_journal(a, a.out)
            for r in jn["rows"]:
                for b, e in r["errors"].items():
                    errors.append(f"journal part, {r['key']} on {b}: {e}")
        except (BenchError, OSError, ValueError, KeyError) as e:
            log(f"ERROR journal part: {e}")
            errors.append(f"journal part: {e}")

    meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    text, paths = write_report(P, meta, cp, dd, jn, errors, a.out, a.results_dir)
    print()
    print(text)
    print("written: " + ", ".join(paths) + " (and .json)")
    if errors:
        print(f"history: {len(errors)} step(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
