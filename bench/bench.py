#!/usr/bin/env python3
"""Side-by-side benchmark: native directory, kernel overlayfs, fuse-overlayfs, layerfs.

Started by bench/run.sh (which installs the tools and builds layerfs and the C
helper); see bench/README.md for what each workload does and how to read the
table.  Only the standard library is used.
"""

import argparse
import fcntl
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SEED = 20261124
GEN_VERSION = "1"  # bump when the generated layers change

SIZES = {
    "full": dict(tree_files=100_000, bigdir=20_000, big=1 << 30, fio_secs=5, create=10_000,
                 create_bytes=512, src_files=12_000, src_bytes=175_000_000, rewrite=2_000,
                 appends=200_000, roundtrips=100_000, append_bytes=128, readdir_reps=20, runs=3, image="16G"),
    "quick": dict(tree_files=8_000, bigdir=2_000, big=64 << 20, fio_secs=2, create=1_000,
                  create_bytes=512, src_files=1_200, src_bytes=16_000_000, rewrite=200,
                  appends=20_000, roundtrips=20_000, append_bytes=128, readdir_reps=5, runs=1, image="3G"),
}

BACKENDS = ["native", "overlay", "fuse-overlayfs", "layerfs"]
# Not run by default: layerfs without its change journal (`-o journal=off`), to measure what the
# journal costs, and layerfs with requests through /dev/fuse (`-o uring=off`), to measure what the
# io_uring queues bring, and layerfs with unsynced copy-ups (`-o volatile`, as kernel overlayfs's
# option), to compare copy-up with fuse-overlayfs, which never syncs one.
EXTRA_BACKENDS = ["layerfs-nojournal", "layerfs-devfuse", "layerfs-volatile"]
LABEL = {"native": "native ext4", "overlay": "kernel overlayfs",
         "fuse-overlayfs": "fuse-overlayfs", "layerfs": "layerfs",
         "layerfs-nojournal": "layerfs journal=off", "layerfs-devfuse": "layerfs uring=off",
         "layerfs-volatile": "layerfs volatile"}
LAYERFS_NAMES = ("layerfs", "layerfs-nojournal", "layerfs-devfuse", "layerfs-volatile")
# layerfs runs with its requests through per-CPU io_uring queues (`uring=on`, which turns on the
# kernel's fuse.enable_uring); `layerfs-devfuse` is the same through /dev/fuse.
LAYERFS_OPTS = {"layerfs": ",uring=on", "layerfs-nojournal": ",uring=on,journal=off",
                "layerfs-devfuse": ",uring=off", "layerfs-volatile": ",uring=on,volatile"}

BIG_REL = "srv/data/big.img"
BIGDIR_REL = "var/cache/bigdir"
LOG_REL = "var/log/bench.log"


class BenchError(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, timeout=600, check=True, **kw):
    """Run a command; on failure raise BenchError with its stderr."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}")
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        tail = " | ".join(err[-3:]) if err else ""
        raise BenchError(f"`{' '.join(map(str, cmd))}` exited {p.returncode}: {tail}")
    return p


def kv(out):
    return {k: float(v) for k, v in (w.split("=", 1) for w in out.split())}


def drop_caches():
    sh(["sync"], timeout=600)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --------------------------------------------------------------------------- generation

class Gen:
    """Deterministic layers: the same seed gives byte-identical trees."""

    def __init__(self, fs, P):
        self.fs, self.P = fs, P
        self.rng = random.Random(SEED)
        self.blob = self.rng.randbytes(4 << 20)
        self.dirs = set()
        self.files = {}  # rel -> (layer, size) for regular files in the merged view
        self.links = 0

    def _mkdir(self, path):
        if path not in self.dirs:
            os.makedirs(path, exist_ok=True)
            self.dirs.add(path)

    def put(self, layer, rel, size):
        data = self.data(size)
        for top in (layer, "native"):
            p = os.path.join(self.fs, top, rel)
            self._mkdir(os.path.dirname(p))
            with open(p, "wb") as f:
                f.write(data)
        self.files[rel] = (layer, size)

    def symlink(self, layer, rel, target):
        for top in (layer, "native"):
            p = os.path.join(self.fs, top, rel)
            self._mkdir(os.path.dirname(p))
            if not os.path.lexists(p):
                os.symlink(target, p)
        self.links += 1

    def data(self, size):
        off = self.rng.randrange(0, len(self.blob) - size) if size < len(self.blob) else 0
        return self.blob[off:off + size]

    def small_size(self):
        r, u = self.rng.random(), self.rng.uniform
        if r < 0.75:
            return int(u(64, 4096))
        if r < 0.97:
            return int(u(4096, 16384))
        if r < 0.998:
            return int(u(16384, 98304))
        return int(u(98304, 1 << 20))

    def name(self):
        syl = ["lib", "ab", "cor", "de", "fo", "gi", "ha", "xi", "mo", "nu", "per", "qu",
               "ra", "so", "tu", "vel", "wa", "ze", "ly", "dy", "kr", "zo", "tra", "gl"]
        return "".join(self.rng.choice(syl) for _ in range(self.rng.randint(2, 4)))

    def tree(self):
        """An OS-like tree: packages spread over the usual directories, in two layers."""
        P, rng = self.P, self.rng
        langs = ["de", "fr", "es", "it", "ja", "ko", "pt_BR", "ru", "zh_CN", "zh_TW", "nl", "pl",
                 "sv", "cs", "fi", "da", "tr", "uk", "hu", "el"]
        exts = [".py", ".h", ".json", ".txt", ".png", ".xml", ".so", ".conf", ".pyc", ".svg"]
        subs = ["data", "share", "plugins", "modules", "icons", "templates", "lib", "include",
                "scripts", "tests", "locale", "doc", "hicolor", "16x16", "48x48", "apps"]
        count, pkg = 0, 0
        l2_regular = []
        while count < P["tree_files"]:
            pkg += 1
            layer = "l2" if rng.random() < 0.6 else "l1"
            nm = f"{self.name()}{pkg}"
            before = len(self.files) + self.links

            for k in range(rng.choice([0, 0, 1, 1, 2, 3])):
                self.put(layer, f"usr/bin/{nm}{'-' + str(k) if k else ''}", int(rng.uniform(16384, 400000)))
            if rng.random() < 0.4:
                maj = rng.randint(0, 9)
                real = f"usr/lib/x86_64-linux-gnu/lib{nm}.so.{maj}.{rng.randint(0, 30)}.0"
                self.put(layer, real, self.small_size() * 4)
                self.symlink(layer, f"usr/lib/x86_64-linux-gnu/lib{nm}.so.{maj}", os.path.basename(real))
            self.put(layer, f"usr/share/doc/{nm}/copyright", int(rng.uniform(600, 8000)))
            self.put(layer, f"usr/share/doc/{nm}/changelog.Debian.gz", int(rng.uniform(300, 16000)))
            if rng.random() < 0.2:
                for lg in rng.sample(langs, rng.randint(3, len(langs))):
                    self.put(layer, f"usr/share/locale/{lg}/LC_MESSAGES/{nm}.mo", self.small_size())
            if rng.random() < 0.5:
                sec = rng.choice([1, 1, 1, 3, 5, 8])
                self.put(layer, f"usr/share/man/man{sec}/{nm}.{sec}.gz", int(rng.uniform(500, 9000)))
            self.put(layer, f"var/lib/dpkg/info/{nm}.list", int(rng.uniform(100, 6000)))
            self.put(layer, f"var/lib/dpkg/info/{nm}.md5sums", int(rng.uniform(100, 9000)))

            base = rng.choice([f"usr/share/{nm}", f"usr/lib/python3/dist-packages/{nm}",
                               f"usr/lib/{nm}", f"usr/include/{nm}", f"etc/{nm}"])
            ndirs = rng.randint(1, 12)
            pdirs = [base]
            for _ in range(ndirs):
                parent = rng.choice(pdirs)
                if parent.count("/") < 7:
                    pdirs.append(f"{parent}/{rng.choice(subs)}{rng.randint(0, 9)}")
            for k in range(int(rng.expovariate(1 / 38))):
                d = rng.choice(pdirs)
                rel = f"{d}/{self.name()}{k}{rng.choice(exts)}"
                if k > 2 and rng.random() < 0.03:
                    sib = f"{self.name()}{k - 1}.lnk"
                    self.symlink(layer, rel, sib)  # dangling or not: both are normal
                else:
                    self.put(layer, rel, self.small_size())
                    if layer == "l2":
                        l2_regular.append(rel)
            count += len(self.files) + self.links - before

        # The upper lower layer (l1) updates 1% of the base layer's files.
        for rel in rng.sample(l2_regular, len(l2_regular) // 100):
            self.put("l1", rel, self.small_size())
        # Some log files for the append workload's directory.
        for k in range(5):
            self.put("l2", f"var/log/old{k}.log", int(rng.uniform(1000, 50000)))
        return count

    def bigdir(self):
        n = self.P["bigdir"]
        for i in range(n):
            # l2 holds the first 3/4, l1 the last 1/2: a merged directory with shadowed names.
            layers = []
            if i < n * 3 // 4:
                layers.append("l2")
            if i >= n // 2:
                layers.append("l1")
            for layer in layers:
                self.put(layer, f"{BIGDIR_REL}/e{i:06d}.dat", self.rng.randint(0, 256))

    def bigfile(self):
        size = self.P["big"]
        for top in ("l2", "native"):
            p = os.path.join(self.fs, top, BIG_REL)
            self._mkdir(os.path.dirname(p))
            with open(p, "wb") as f:
                off = 0
                while off < size:
                    n = min(1 << 20, size - off)
                    start = (off // (1 << 20) * 4099) % (len(self.blob) - n)
                    f.write(self.blob[start:start + n])
                    off += n

    def rewrite_list(self):
        cand = sorted(r for r in self.files if not r.startswith((BIGDIR_REL, "srv/", "var/log/")))
        pick = random.Random(SEED + 1).sample(cand, self.P["rewrite"])
        path = os.path.join(self.fs, "rewrite.list")
        with open(path, "w") as f:
            for rel in sorted(pick):
                f.write(f"{os.path.getsize(os.path.join(self.fs, 'native', rel))}\t{rel}\n")
        return path

    def tarball(self):
        """A deterministic uncompressed source tarball (text files, ~12k entries)."""
        P, rng = self.P, random.Random(SEED + 2)
        words = ["fn", "let", "mut", "self", "impl", "struct", "return", "match", "Some", "None",
                 "Ok", "Err", "pub", "use", "crate", "mod", "if", "else", "for", "in", "while",
                 "loop", "u64", "usize", "String", "Vec", "Option", "Result", "&", "->", "=>",
                 "{", "}", "(", ")", ";", "::", "inode", "layer", "path", "buf", "len", "offset",
                 "// ", "assert_eq!", "unsafe", "const", "static", "where", "dyn", "Box", "Arc"]
        lines = []
        for _ in range(60000):
            indent = " " * (4 * rng.randint(0, 4))
            lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(1, 14))))
        pool = ("\n".join(lines) + "\n").encode()
        sizes = [min(max(int(rng.lognormvariate(8.8, 1.1)), 200), 1 << 20) for _ in range(P["src_files"])]
        scale = P["src_bytes"] / sum(sizes)
        sizes = [max(1, int(s * scale)) for s in sizes]
        dirs = ["src"]
        for i in range(max(8, P["src_files"] // 14)):
            parent = rng.choice(dirs)
            if parent.count("/") < 6:
                dirs.append(f"{parent}/{rng.choice(['core', 'io', 'fs', 'net', 'sys', 'util', 'tests', 'ui', 'alloc', 'sync', 'fmt'])}{i}")
        entries = {d: None for d in dirs}
        exts = [".rs", ".c", ".h", ".md", ".toml", ".txt", ".py", ".js"]
        for i, sz in enumerate(sizes):
            d = rng.choice(dirs)
            entries[f"{d}/file{i}{rng.choice(exts)}"] = sz
        path = os.path.join(self.fs, "src.tar")
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            for name in sorted(entries):
                sz = entries[name]
                ti = tarfile.TarInfo("srctree/" + name)
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 1700000000, 0, 0, "root", "root"
                if sz is None:
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    tf.addfile(ti)
                else:
                    off = rng.randrange(0, len(pool) - sz) if sz < len(pool) else 0
                    data = (pool * (1 + sz // len(pool)))[off:off + sz] if sz >= len(pool) else pool[off:off + sz]
                    ti.mode, ti.size = 0o644, len(data)
                    tf.addfile(ti, io.BytesIO(data))
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return path, len(entries), os.path.getsize(path), h.hexdigest()


def build_layers(fs, P):
    for d in ("l1", "l2", "native"):
        os.makedirs(os.path.join(fs, d), exist_ok=True)
    g = Gen(fs, P)
    t0 = time.time()
    tree = g.tree()
    log(f"  tree: {tree} entries ({len(g.files)} regular files, {g.links} symlinks)")
    g.bigdir()
    g.bigfile()
    rl = g.rewrite_list()
    tar, tar_entries, tar_bytes, tar_sha = g.tarball()
    log(f"  tarball: {tar_entries} entries, {tar_bytes / 1e6:.0f} MB, sha256 {tar_sha[:16]}")
    sh(["sync"])
    info = dict(tree_entries=tree, regular_files=len(g.files), symlinks=g.links,
                bigdir_entries=P["bigdir"], big_bytes=P["big"], rewrite_list=rl,
                tarball=tar, tarball_entries=tar_entries, tarball_bytes=tar_bytes,
                tarball_sha256=tar_sha, build_secs=round(time.time() - t0, 1))
    with open(os.path.join(fs, "layers.json"), "w") as f:
        json.dump(info, f)
    return info


# --------------------------------------------------------------------------- backends

class Backend:
    def __init__(self, name, fs, logdir, layerfs_bin=None):
        self.name, self.fs, self.logdir, self.bin = name, fs, logdir, layerfs_bin
        base = os.path.join(fs, "run", name)
        self.upper, self.work, self.mnt = (os.path.join(base, x) for x in ("upper", "work", "mnt"))
        self.root = os.path.join(fs, "native") if name == "native" else self.mnt
        self.pid = None
        self.mount_error = None

    @property
    def fuse(self):
        return self.name in ("fuse-overlayfs",) + LAYERFS_NAMES

    def mounted(self):
        mnt = self.mnt.encode()
        with open("/proc/self/mountinfo", "rb") as f:
            return any(line.split()[4] == mnt for line in f)

    def mount(self):
        if self.name == "native":
            return
        for d in (self.upper, self.work, self.mnt):
            os.makedirs(d, exist_ok=True)
        opts = (f"lowerdir={self.fs}/l1:{self.fs}/l2,upperdir={self.upper},workdir={self.work}")
        cmd = {"overlay": ["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt],
               "fuse-overlayfs": ["fuse-overlayfs", "-o", opts, self.mnt],
               **{n: [self.bin or "layerfs", "-o", opts + LAYERFS_OPTS[n], self.mnt]
                  for n in LAYERFS_NAMES}}[self.name]
        with open(os.path.join(self.logdir, f"{self.name}.log"), "a") as lf:
            lf.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
            lf.flush()
            try:
                p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, timeout=120)
            except subprocess.TimeoutExpired:
                raise BenchError(f"mount timed out: {' '.join(cmd)}")
        if p.returncode != 0 or not self.mounted():
            tail = open(os.path.join(self.logdir, f"{self.name}.log")).read().strip().splitlines()[-2:]
            raise BenchError(f"mount failed (exit {p.returncode}): {' | '.join(tail)}")
        self.pid = self.find_pid() if self.fuse else None

    def find_pid(self):
        want = os.path.basename(self.bin) if self.name in LAYERFS_NAMES else "fuse-overlayfs"
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0].decode(errors="replace")) == want \
                    and self.mnt.encode() in argv:
                return int(d)
        return None

    def umount(self):
        if self.name == "native" or not self.mounted():
            self._reap()
            return
        try:
            sh(["umount", self.mnt], timeout=120)
        except BenchError as e:
            log(f"  {self.name}: umount failed ({e}); forcing")
            self._force()
        self._reap()

    def _force(self):
        try:
            dev = os.stat(self.mnt).st_dev
            ab = f"/sys/fs/fuse/connections/{os.minor(dev)}/abort"
            if self.fuse and os.path.exists(ab):
                with open(ab, "w") as f:
                    f.write("1")
        except OSError:
            pass
        subprocess.run(["umount", "-l", self.mnt], stderr=subprocess.DEVNULL, timeout=60)

    def _reap(self):
        """Wait for the daemon we started to exit after its unmount; kill it (by pid) if it lingers."""
        if not self.pid:
            return
        for _ in range(100):
            if not os.path.exists(f"/proc/{self.pid}") or _zombie(self.pid):
                break
            time.sleep(0.1)
        else:
            log(f"  {self.name}: daemon {self.pid} still running after unmount; killing it")
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pid = None

    def reset(self):
        """Fresh state: unmount, empty upper and work, mount again (native: remove scratch files)."""
        if self.name == "native":
            for e in os.listdir(self.root):
                if e.startswith("bench-"):
                    _rm(os.path.join(self.root, e))
            for rel in (LOG_REL + ".0", LOG_REL + ".1"):
                _rm(os.path.join(self.root, rel))
            big = os.path.join(self.root, BIG_REL)
            os.truncate(big, os.path.getsize(os.path.join(self.fs, "l2", BIG_REL)))
            return
        self.umount()
        _rm(self.upper)
        _rm(self.work)
        self.mount()

    def daemon_stats(self):
        if not self.pid:
            raise BenchError("daemon pid not found")
        st = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "Threads"):
                    st[k] = int(v.split()[0])
        st["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        return st


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _rm(p):
    if os.path.islink(p) or os.path.isfile(p):
        os.unlink(p)
    elif os.path.isdir(p):
        shutil.rmtree(p)


# --------------------------------------------------------------------------- workloads

class Ctx:
    def __init__(self, fs, P, info, lfbench, timeout):
        self.fs, self.P, self.info, self.lfbench, self.timeout = fs, P, info, lfbench, timeout
        self.expect_entries = None

    def lfb(self, *args):
        return kv(sh([self.lfbench, *map(str, args)], timeout=self.timeout).stdout)


# Each metric: key, label, unit, better ("higher"/"lower").
METRICS = [
    ("seqread_warm", "sequential read of the 1 GiB lower file, warm cache", "MB/s", "higher"),
    ("seqread_cold", "sequential read of the 1 GiB lower file, cold cache", "MB/s", "higher"),
    ("randread", "random 4 KiB reads of the 1 GiB lower file (fio psync, warm)", "IOPS", "higher"),
    ("seqwrite", "sequential write of 1 GiB + fsync (new file)", "MB/s", "higher"),
    ("copyup", "first 1-byte append to the 1 GiB lower file (copy-up)", "s", "lower"),
    ("find_warm", "find over the whole tree, warm", "entries/s", "higher"),
    ("find_cold", "find over the whole tree, cold", "entries/s", "higher"),
    ("stat_warm", "readdir + lstat of every entry of the tree, warm", "entries/s", "higher"),
    ("stat_cold", "readdir + lstat of every entry of the tree, cold", "entries/s", "higher"),
    ("readdir_warm", "list the 20,000-entry merged directory, repeated, warm", "entries/s", "higher"),
    ("readdir_cold", "list the 20,000-entry merged directory once, cold", "entries/s", "higher"),
    ("roundtrip", "one request to the filesystem: statx(AT_STATX_FORCE_SYNC) of a lower file, warm "
     "(through FUSE: a GETATTR round trip to the daemon)", "us", "lower"),
    ("create", "create 10,000 small files (512 B)", "files/s", "higher"),
    ("delete", "delete those 10,000 files", "files/s", "higher"),
    ("untar", "untar a 175 MB source tarball (12k entries)", "s", "lower"),
    ("rewrite", "package upgrade: rewrite 2,000 lower files (write .dpkg-new, rename over)", "s", "lower"),
    ("append1", "128-byte appends to a log file, 1 job", "writes/s", "higher"),
    ("append2", "128-byte appends, 2 jobs in parallel (own file each; aggregate)", "writes/s", "higher"),
    ("rss", "daemon peak RSS (VmHWM) after the tree walks", "MiB", "lower"),
    ("fds", "daemon open descriptors after the tree walks", "count", "lower"),
]


def big_size(P):
    return f"{P['big'] >> 30} GiB" if P["big"] >= 1 << 30 else f"{P['big'] >> 20} MiB"


def labels_for(P):
    """Metric labels with the sizes actually used (quick mode shrinks them)."""
    big = big_size(P)
    out = {}
    for key, label, unit, better in METRICS:
        label = (label.replace("1 GiB", big).replace("20,000", f"{P['bigdir']:,}")
                 .replace("10,000", f"{P['create']:,}").replace("2,000", f"{P['rewrite']:,}")
                 .replace("175 MB", f"{P['src_bytes'] / 1e6:.0f} MB")
                 .replace("12k", f"{P['src_files'] / 1000:.1f}k".replace(".0k", "k")))
        out[key] = label
    return out


def w_seqread(c, b):
    r = c.lfb("read", os.path.join(b.root, BIG_REL))
    return r["bytes"] / r["secs"] / 1e6


def w_randread(c, b):
    path = os.path.join(b.root, BIG_REL)
    c.lfb("read", path)  # warm the cache fio reads from
    out = sh(["fio", "--name=randread", f"--filename={path}", "--readonly", "--rw=randread",
              "--bs=4k", "--ioengine=psync", f"--size={c.P['big']}", f"--runtime={c.P['fio_secs']}",
              "--time_based", "--invalidate=0", "--output-format=json"], timeout=c.timeout).stdout
    js = json.loads(out[out.index("{"):])
    job = js["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio error {job['error']}")
    return job["read"]["iops"]


def w_seqwrite(c, b):
    r = c.lfb("write", os.path.join(b.root, "bench-write.dat"), c.P["big"])
    return r["bytes"] / r["secs"] / 1e6


def prep_copyup(c, b):
    c.lfb("read", os.path.join(c.fs, "l2", BIG_REL))  # lower data in the page cache
    sh(["sync"])


def w_copyup(c, b):
    path = os.path.join(b.root, BIG_REL)
    r = c.lfb("append1", path)
    size = os.stat(path).st_size
    if size != c.P["big"] + 1:
        raise BenchError(f"after a 1-byte append {BIG_REL} has {size} bytes, expected {c.P['big'] + 1}")
    return r["secs"]


def w_find(c, b):
    t0 = time.perf_counter()
    p = sh(["find", b.root], timeout=c.timeout)
    t = time.perf_counter() - t0
    n = p.stdout.count("\n")
    if c.expect_entries and n != c.expect_entries + 1:
        raise BenchError(f"find listed {n} entries, native has {c.expect_entries + 1}")
    return n / t


def w_stat(c, b):
    r = c.lfb("walk", b.root)
    if c.expect_entries is None and b.name == "native":
        c.expect_entries = int(r["entries"])
        log(f"  the tree has {c.expect_entries:,} entries in {int(r['dirs']):,} directories")
    elif c.expect_entries and int(r["entries"]) != c.expect_entries:
        raise BenchError(f"walk saw {int(r['entries'])} entries, native has {c.expect_entries}")
    return r["entries"] / r["secs"]


def w_readdir(reps):
    def f(c, b):
        r = c.lfb("readdir", os.path.join(b.root, BIGDIR_REL), reps)
        if int(r["entries"]) != c.P["bigdir"] * reps:
            raise BenchError(f"listing returned {int(r['entries']) // reps} entries, expected {c.P['bigdir']}")
        return r["entries"] / r["secs"]
    return f


def w_roundtrip(c, b):
    r = c.lfb("getattr", os.path.join(b.root, BIG_REL), c.P["roundtrips"])
    return r["secs"] / r["calls"] * 1e6


def w_createdelete(c, b):
    r = c.lfb("create", os.path.join(b.root, "bench-create"), c.P["create"], c.P["create_bytes"])
    return {"create": r["files"] / r["create_secs"], "delete": r["files"] / r["delete_secs"]}


def prep_untar(c, b):
    c.lfb("read", c.info["tarball"])
    os.makedirs(os.path.join(b.root, "bench-untar"), exist_ok=True)
    sh(["sync"])


def w_untar(c, b):
    t0 = time.perf_counter()
    sh(["tar", "-xf", c.info["tarball"], "-C", os.path.join(b.root, "bench-untar")], timeout=c.timeout)
    return time.perf_counter() - t0


def w_rewrite(c, b):
    return c.lfb("rewrite", b.root, c.info["rewrite_list"])["secs"]


def w_append(jobs):
    def f(c, b):
        r = c.lfb("append", os.path.join(b.root, LOG_REL), c.P["appends"], c.P["append_bytes"], jobs)
        return r["writes"] / r["secs"]
    return f


def presync(c, b):
    sh(["sync"])


# (metric(s), function, mode, prepare) -- mode: warm = one untimed pass first, cold = drop caches
# before every run, fresh = reset upper/work and remount before every run.
def plan(P):
    return [
        ("group", "reads: fresh mounts, nothing written"),
        ("seqread_warm", w_seqread, "warm", None),
        ("seqread_cold", w_seqread, "cold", None),
        ("randread", w_randread, "plain", None),
        ("group", "tree walks: fresh mounts, then daemon memory and descriptors"),
        ("stat_cold", w_stat, "cold", None),
        ("stat_warm", w_stat, "warm", None),
        ("find_cold", w_find, "cold", None),
        ("find_warm", w_find, "warm", None),
        ("readdir_cold", w_readdir(1), "cold", None),
        ("readdir_warm", w_readdir(P["readdir_reps"]), "warm", None),
        ("daemon", None, None, None),
        ("group", "writes: fresh upper and work before every run"),
        ("seqwrite", w_seqwrite, "fresh", presync),
        ("copyup", w_copyup, "fresh", prep_copyup),
        ("roundtrip", w_roundtrip, "warm", None),
        (("create", "delete"), w_createdelete, "fresh", presync),
        ("untar", w_untar, "fresh", prep_untar),
        ("rewrite", w_rewrite, "fresh", presync),
        ("append1", w_append(1), "fresh", presync),
        ("append2", w_append(2), "fresh", presync),
    ]


# --------------------------------------------------------------------------- runner

class Results:
    def __init__(self, backends):
        self.runs = {m[0]: {b: [] for b in backends} for m in METRICS}
        self.errors = {m[0]: {} for m in METRICS}

    def add(self, keys, b, val):
        if isinstance(val, dict):
            for k, v in val.items():
                self.runs[k][b].append(v)
        else:
            self.runs[keys[0]][b].append(val)

    def error(self, keys, b, msg):
        for k in keys:
            self.errors[k].setdefault(b, msg)

    def median(self, key, b):
        v = self.runs[key].get(b) or []
        return statistics.median(v) if v else None


def run_all(c, backends, runs, res, only=None):
    bmap = {b.name: b for b in backends}

    def attempt(keys, b, fn, record=True):
        try:
            val = fn(c, b)
            if record:
                res.add(keys, b.name, val)
            return True
        except (BenchError, OSError, ValueError, KeyError) as e:
            msg = str(e)
            log(f"  ERROR {b.name} {'/'.join(keys)}: {msg}")
            res.error(keys, b.name, msg)
            return False

    def safe_reset(b, keys):
        try:
            b.reset()
            return True
        except (BenchError, OSError) as e:
            log(f"  ERROR {b.name}: reset/mount: {e}")
            res.error(keys, b.name, f"mount: {e}")
            return False

    for item in plan(c.P):
        if item[0] == "group":
            log(f"== {item[1]}")
            if "fresh mounts" in item[1]:
                for b in backends:
                    safe_reset(b, [])
            continue
        keys, fn, mode, prep = item
        keys = (keys,) if isinstance(keys, str) else keys
        if only and not (set(keys) | ({"rss", "fds"} if keys[0] == "daemon" else set())) & only:
            continue
        if keys[0] == "daemon":
            for b in backends:
                if b.fuse:
                    try:
                        st = b.daemon_stats()
                        res.runs["rss"][b.name].append(st["VmHWM"] / 1024)
                        res.runs["fds"][b.name].append(st["fds"])
                        log(f"  {b.name}: VmHWM {st['VmHWM'] / 1024:.1f} MiB, VmRSS {st['VmRSS'] / 1024:.1f} MiB, "
                            f"{st['fds']} fds, {st['Threads']} threads")
                    except (BenchError, OSError) as e:
                        res.error(("rss", "fds"), b.name, str(e))
            continue
        log(f"-- {'/'.join(keys)} ({mode}, {runs} run{'s' if runs > 1 else ''})")
        failed = set()
        for b in backends:
            if b.name != "native" and not b.mounted() and not safe_reset(b, keys):
                failed.add(b.name)
        if mode == "warm":
            for b in backends:
                if b.name not in failed and not attempt(keys, b, fn, record=False):
                    failed.add(b.name)
        for r in range(runs):
            order = backends[r % len(backends):] + backends[:r % len(backends)]
            for b in order:
                if b.name in failed:
                    continue
                if mode == "fresh" and not safe_reset(b, keys):
                    failed.add(b.name)
                    continue
                if prep and not attempt(keys, b, prep, record=False):
                    failed.add(b.name)
                    continue
                if mode == "cold":
                    drop_caches()
                if not attempt(keys, b, fn):
                    failed.add(b.name)
                    if b.fuse and (not b.mounted() or not _alive(b)):
                        log(f"  {b.name}: mount is gone after the error; remounting")
                    safe_reset(b, [])
        line = []
        for k in keys:
            line.append(k + ": " + ", ".join(
                f"{bn}={_fmt(res.median(k, bn))}" if bn not in res.errors[k] else f"{bn}=ERROR"
                for bn in bmap))
        log("   " + " ; ".join(line))
        if mode == "fresh":
            for b in backends:  # free the space the last run used
                if b.name not in failed:
                    safe_reset(b, [])


def _alive(b):
    try:
        os.stat(b.root)
        return True
    except OSError:
        return False


def _fmt(v, unit=None):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "MiB":
        return f"{v:.1f}"
    if unit == "count":
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def ratio(a, b, better):
    """Speed ratio of a (layerfs) to b: > 1 means a is better, whatever the unit."""
    if a is None or b is None or a == 0 or b == 0:
        return None
    return a / b if better == "higher" else b / a


# Ratio columns: row key, the other backend, column header, short header (console).  A column is
# shown when both layerfs and the other backend ran; "vs_nojournal" is what the journal costs.
RATIOS = [("vs_kernel", "overlay", "layerfs vs kernel overlayfs", "vs kernel"),
          ("vs_fuse_overlayfs", "fuse-overlayfs", "layerfs vs fuse-overlayfs", "vs fuse-ovl"),
          ("vs_nojournal", "layerfs-nojournal", "layerfs vs layerfs journal=off", "vs nojournal"),
          ("vs_devfuse", "layerfs-devfuse", "layerfs vs layerfs uring=off", "vs uring=off")]


def ratio_cols(names):
    return [c for c in RATIOS if "layerfs" in names and c[1] in names]


# Synchronous FUSE requests the kernel (6.18) makes for one file of the create and delete workloads,
# counted with its fuse_request_send/end tracepoints: create = GETATTR of the parent (default_permissions
# re-checks it after each change), LOOKUP, CREATE, GETXATTR security.capability (first write to a new
# inode); its RELEASE is sent after close() returns. delete = GETATTR of the parent, UNLINK.
SYNC_REQUESTS = {"create": 4, "delete": 2}


def fuse_ceilings(res):
    """The best any FUSE server could do on this machine: the synchronous requests of one file, each
    costing at least layerfs's measured round trip (a GETATTR, whose work is one fstat), with no time
    left for the filesystem work itself; as files/s and as a ratio to kernel overlayfs."""
    rtt = res.median("roundtrip", "layerfs")
    out = []
    for key, n in SYNC_REQUESTS.items():
        ovl = res.median(key, "overlay")
        if not rtt or not ovl:
            continue
        best = 1e6 / (n * rtt)
        out.append(f"- {key}: {n} synchronous requests x {rtt:.1f} us = {n * rtt:.0f} us per file at the least, "
                   f"so at most {best:,.0f} files/s = {best / ovl:.2f}x kernel overlayfs "
                   f"({1e6 / ovl:.0f} us per file there)")
    return out


def report(res, backends, meta, labels, outdir):
    names = [b.name for b in backends]
    cols = ratio_cols(names)
    rows = []
    for key, _, unit, better in METRICS:
        vals = {n: res.median(key, n) for n in names}
        if all(v is None for v in vals.values()) and not res.errors[key]:
            continue
        rows.append(dict(key=key, workload=labels[key], unit=unit, better=better, values=vals,
                         runs={n: res.runs[key][n] for n in names},
                         errors=res.errors[key],
                         vs_kernel=ratio(vals.get("layerfs"), vals.get("overlay"), better)
                         if key not in ("rss", "fds") else None,
                         vs_fuse_overlayfs=ratio(vals.get("layerfs"), vals.get("fuse-overlayfs"), better),
                         vs_nojournal=ratio(vals.get("layerfs"), vals.get("layerfs-nojournal"), better),
                         vs_devfuse=ratio(vals.get("layerfs"), vals.get("layerfs-devfuse"), better)))
    notes, md = [], []
    head = ["workload", "unit", "better"] + [LABEL[n] for n in names] + [c[2] for c in cols]
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "---|" * len(head))
    for r in rows:
        cells = [r["workload"], r["unit"], r["better"]]
        for n in names:
            if n in r["errors"]:
                notes.append(f"{LABEL[n]}, {r['key']}: {r['errors'][n]}")
                cells.append(f"ERROR [{len(notes)}]")
            elif r["values"][n] is None:
                cells.append("n/a")
            else:
                cells.append(_fmt(r["values"][n], r["unit"]))
        for k, *_ in cols:
            cells.append("-" if r[k] is None else f"{r[k]:.2f}x")
        md.append("| " + " | ".join(cells) + " |")
    text = [
        "# layerfs benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- kernel: {meta['kernel']}; os: {meta['os']}",
        f"- versions: layerfs {meta['layerfs']}; {meta['fuse_overlayfs']}; {meta['fio']}",
        f"- mode: {meta['mode']}, {meta['runs']} run(s) per value (median); layers on a loop-mounted ext4 image "
        f"({meta['image']}, {meta['loop']})",
        f"- layers: {meta['layers']}",
        f"- load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}",
        "",
        "Ratios are speed ratios of layerfs to the other backend: above 1.00x layerfs is better, below "
        "1.00x it is worse, whatever the unit (for rates layerfs/other, for seconds and sizes other/layerfs).",
        "",
    ] + md
    ceilings = fuse_ceilings(res)
    if ceilings:
        text += ["", "Ceilings for any FUSE server here (round trips alone, from the `roundtrip` row):", ""] + ceilings
    if notes:
        text += ["", "Errors:", ""] + [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    text = "\n".join(text) + "\n"
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return text, rows, notes


def print_table(rows, names):
    cols = ratio_cols(names)
    head = ["workload", "unit", "better"] + names + [c[3] for c in cols]
    table = [head]
    for r in rows:
        cells = [r["key"], r["unit"], r["better"]]
        for n in names:
            cells.append("ERROR" if n in r["errors"] else
                         ("n/a" if r["values"][n] is None else _fmt(r["values"][n], r["unit"])))
        for k, *_ in cols:
            cells.append("-" if r[k] is None else f"{r[k]:.2f}x")
        table.append(cells)
    w = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w[j]) if j < 3 else c.rjust(w[j]) for j, c in enumerate(row)))
        if i == 0:
            print("  ".join("-" * x for x in w))


# --------------------------------------------------------------------------- main

def machine_meta():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    osr = "?"
    try:
        with open("/etc/os-release") as f:
            osr = dict(l.rstrip("\n").split("=", 1) for l in f if "=" in l).get("PRETTY_NAME", "?").strip('"')
    except OSError:
        pass
    return dict(machine=f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, {platform.machine()}",
                kernel=platform.release(), os=osr)


def clear_stale_mounts(workdir):
    """Unmount what a killed earlier run left under workdir (deepest first), and free its loop devices."""
    prefix = os.path.realpath(workdir).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        mnts = [l.split()[4] for l in f]
    for m in sorted((m for m in mnts if m.startswith(prefix)), key=len, reverse=True):
        log(f"unmounting {m}, left by an earlier run")
        if subprocess.run(["umount", m], stderr=subprocess.DEVNULL, timeout=120).returncode != 0:
            subprocess.run(["umount", "-l", m], timeout=60)
    out = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():
        if prefix in line:
            dev = line.split(":", 1)[0]
            log(f"detaching {dev}, left by an earlier run")
            subprocess.run(["losetup", "-d", dev], timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 run (smoke test)")
    ap.add_argument("--runs", type=int, help="runs per value (default 3, quick 1)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench", help="where the ext4 image lives")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--only", help="comma-separated metric keys to run (debugging)")
    ap.add_argument("--keep", action="store_true", help="keep the image (and reuse a matching one)")
    ap.add_argument("--layerfs", required=True)
    ap.add_argument("--lfbench", required=True)
    ap.add_argument("--layerfs-version", default="?")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (mounts, drop_caches)")

    mode = "quick" if a.quick else "full"
    P = dict(SIZES[mode])
    runs = a.runs or P["runs"]
    names = [n for n in a.backends.split(",") if n]
    unknown = [n for n in names if n not in LABEL]
    if unknown or not names:
        sys.exit(f"bench: unknown backend(s) {','.join(unknown) or '(none)'}; "
                 f"known: {','.join(BACKENDS + EXTRA_BACKENDS)}")
    os.makedirs(a.out, exist_ok=True)
    logdir = os.path.join(a.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    os.makedirs(a.workdir, exist_ok=True)
    img = os.path.join(a.workdir, f"layers-{mode}.img")
    fs = os.path.join(a.workdir, f"fs-{mode}")
    stamp = f"{GEN_VERSION} {SEED} {json.dumps(P, sort_keys=True)}"
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), mode=mode, runs=runs,
                loadavg_start=" ".join(open("/proc/loadavg").read().split()[:3]), **machine_meta())
    meta["layerfs"] = a.layerfs_version
    fv = sh(["fuse-overlayfs", "--version"], check=False).stdout.splitlines()
    meta["fuse_overlayfs"] = next((l for l in fv if l.startswith("fuse-overlayfs")), "fuse-overlayfs ?")
    meta["fio"] = sh(["fio", "--version"]).stdout.strip()

    # One run at a time per workdir: two runs would share the image and spoil each other's numbers.
    lock = open(os.path.join(a.workdir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another benchmark run holds {a.workdir}/.lock; waiting for it to finish")
        fcntl.flock(lock, fcntl.LOCK_EX)
    clear_stale_mounts(a.workdir)

    backends, loop = [], None
    try:
        os.makedirs(fs, exist_ok=True)
        reuse = a.keep and os.path.exists(img) and os.path.exists(img + ".stamp") \
            and open(img + ".stamp").read() == stamp
        if not reuse:
            log(f"creating {P['image']} ext4 image {img}")
            for p in (img, img + ".stamp"):
                if os.path.exists(p):
                    os.unlink(p)
            sh(["truncate", "-s", P["image"], img])
            # No lazy init: background inode-table zeroing would run during the measurements.
            sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", img], timeout=900)
        # Direct I/O on the loop device: no second copy of the data in the host page cache.
        p = sh(["losetup", "-f", "--show", "--direct-io=on", img], check=False)
        if p.returncode != 0:
            p = sh(["losetup", "-f", "--show", img])
        loop = p.stdout.strip()
        dio = open(f"/sys/block/{os.path.basename(loop)}/loop/dio").read().strip() == "1"
        sh(["mount", "-t", "ext4", loop, fs])
        meta["image"] = f"{P['image']} ext4, default mount options (no discard)"
        meta["loop"] = f"loop direct-io {'on' if dio else 'off'}"
        if reuse:
            log(f"reusing layers in {img}")
            info = json.load(open(os.path.join(fs, "layers.json")))
            _rm(os.path.join(fs, "run"))
        else:
            log(f"building layers ({mode})")
            info = build_layers(fs, P)
            with open(img + ".stamp", "w") as f:
                f.write(stamp)
        meta["layers"] = (f"two lowers; tree {info['tree_entries']:,} entries ({info['regular_files']:,} "
                          f"regular files incl. the big directory, {info['symlinks']:,} symlinks); "
                          f"{P['bigdir']:,}-entry merged directory; "
                          f"{big_size(P)} file; tarball "
                          f"{info['tarball_entries']:,} entries / {info['tarball_bytes'] / 1e6:.0f} MB "
                          f"(sha256 {info['tarball_sha256'][:16]})")
        meta["layers_info"] = info
        meta["sizes"] = P

        backends = [Backend(n, fs, logdir, a.layerfs) for n in names]
        c = Ctx(fs, P, info, a.lfbench, 600 if mode == "full" else 300)
        res = Results(names)
        run_all(c, backends, runs, res, set(a.only.split(",")) if a.only else None)
        meta["walk_entries"] = c.expect_entries
    finally:
        for b in backends:
            try:
                b.umount()
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                log(f"cleanup {b.name}: {e}")
        if os.path.ismount(fs):
            subprocess.run(["umount", fs], timeout=300)
        if loop:
            subprocess.run(["losetup", "-d", loop], timeout=60)
        if not a.keep and os.path.exists(img):
            os.unlink(img)
            if os.path.exists(img + ".stamp"):
                os.unlink(img + ".stamp")

    meta["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    text, rows, notes = report(res, backends, meta, labels_for(P), a.out)
    print()
    print_table(rows, names)
    print()
    print("speed ratios: >1.00x = layerfs better (rates: layerfs/other; seconds, MiB, count: other/layerfs)")
    if notes:
        print("errors:")
        for i, e in enumerate(notes):
            print(f"  {i + 1}. {e}")
    print(f"\nwritten: {os.path.join(a.out, 'results.md')} and results.json")


if __name__ == "__main__":
    main()
