//! What each FUSE request does, independent of how it arrived: the fuser
//! session reading `/dev/fuse` (`fuse_dev.rs`) and the per-CPU io_uring
//! queues (`fuse_ring.rs`) both decode a request, call one method here and
//! encode its result. No overlay logic lives here either: that is `union`,
//! `namespace`, `files` and `attrs`; this layer adds journaling, the
//! executing-file rule and the choice of I/O mode.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::attrs::{self, SetAttr};
use crate::cache::CachePolicy;
use crate::dirmerge::{self, offset_of, DirEnt};
use crate::files::{self, Handles, OpenFile, WriteWatch};
use crate::inode::ROOT_INO;
use crate::iomode::{IoMode, IoModes};
use crate::journal::{Journal, Op, Who};
use crate::namespace::{self, NewObject};
use crate::sys::{self, Stat};
use crate::union::{errno, Ctx, Union};

/// `__FMODE_EXEC`: the kernel opens a file with this flag to execute it.
const FMODE_EXEC: i32 = 0x20;

/// `fuse_open_out.open_flags` bits (include/uapi/linux/fuse.h).
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// Read-only opens of files at least this big use passthrough.
const PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;

/// Who sent a request (from the FUSE request header).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    fn ctx(&self) -> Ctx {
        Ctx {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }

    fn who(&self) -> Who {
        Who {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }
}

/// The answer to an open or create: handle, `FOPEN_*` flags and, for
/// passthrough, the backing file id (the handle keeps it registered).
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    pub flags: u32,
    pub backing: Option<u32>,
}

pub struct LayerFs {
    pub union: Arc<Union>,
    pub cache: CachePolicy,
    io: IoModes,
    /// Shared with the control service (open writers matter to checkpoints).
    pub files: Arc<Handles<OpenFile>>,
    journal: Option<Arc<Journal>>,
    /// Files open for execution, by inode: O_TRUNC on them is ETXTBSY. The
    /// kernel checks write opens itself but with atomic O_TRUNC it truncates
    /// (through us) before checking, so we must refuse first.
    executing: Mutex<HashMap<u64, u32>>,
    /// DESTROY may come on either transport (and fuser calls it again at
    /// the session's end): the journal is closed once.
    destroyed: AtomicBool,
}

impl LayerFs {
    pub fn new(
        union: Arc<Union>,
        cache: CachePolicy,
        passthrough: bool,
        journal: Option<Arc<Journal>>,
    ) -> Self {
        LayerFs {
            union,
            cache,
            io: IoModes::new(passthrough),
            files: Arc::new(Handles::default()),
            journal,
            executing: Mutex::new(HashMap::new()),
            destroyed: AtomicBool::new(false),
        }
    }

    pub fn io(&self) -> &IoModes {
        &self.io
    }

    /// Journal a change to `name` in `parent` (done after it succeeded);
    /// `ino`: the object's node id when known (0 if not).
    #[allow(clippy::too_many_arguments)]
    fn note(
        &self,
        who: Who,
        op: Op,
        parent: u64,
        name: &OsStr,
        ino: u64,
        path2: Option<Vec<u8>>,
        detail: Option<String>,
    ) {
        if let Some(j) = &self.journal {
            if let Some(p) = self.union.path_in(parent, name) {
                j.record(who, op, ino, p, path2, detail);
            }
        }
    }

    /// Journal a change to the object `ino`: folded into the last record
    /// when that one is about the same object by the same caller (no path
    /// to build then), else a record of its own.
    fn note_ino(&self, who: Who, op: Op, ino: u64, detail: Option<String>) {
        if let Some(j) = &self.journal {
            if j.fold_into_last(who, op, ino, detail.as_deref()) {
                return;
            }
            if let Some(p) = self.union.path_of(ino) {
                j.record(who, op, ino, p, None, detail);
            }
        }
    }

    /// A writable handle closes: one record for all its writes, if any.
    fn note_release(&self, f: &OpenFile) {
        let (Some(w), Some(_)) = (&f.watch, &self.journal) else {
            return;
        };
        if let Ok(st) = sys::fstat(f.fd.as_fd()) {
            if st.st_size != w.size || (st.st_mtime, st.st_mtime_nsec) != w.mtime {
                let detail = format!("size {} -> {}", w.size, st.st_size);
                self.note_ino(w.who, Op::Write, f.ino, Some(detail));
            }
        }
    }

    fn watch(&self, who: Who, fd: &std::os::fd::OwnedFd) -> Option<WriteWatch> {
        self.journal.as_ref()?;
        let st = sys::fstat(fd.as_fd()).ok()?;
        Some(WriteWatch {
            who,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        })
    }

    fn release_exec(&self, f: &OpenFile) {
        if f.exec {
            let mut ex = self.executing.lock();
            if let Some(c) = ex.get_mut(&f.ino) {
                *c -= 1;
                if *c == 0 {
                    ex.remove(&f.ino);
                }
            }
        }
    }

    fn snapshot(&self, ino: u64, offset: u64) -> io::Result<(u32, Arc<Vec<DirEnt>>, usize)> {
        self.union.listings.get(ino, offset, || self.listing(ino))
    }

    /// "." and "..", then the merged entries.
    fn listing(&self, ino: u64) -> io::Result<Vec<DirEnt>> {
        let node = self.union.node(ino)?;
        let parent = node.state.read().parent;
        let mut entries = vec![
            DirEnt {
                name: ".".into(),
                ino,
                fmt: libc::S_IFDIR,
            },
            DirEnt {
                name: "..".into(),
                ino: if ino == ROOT_INO { ROOT_INO } else { parent },
                fmt: libc::S_IFDIR,
            },
        ];
        entries.extend(dirmerge::list(&self.union, &node)?);
        Ok(entries)
    }

    /// Page cache across opens is safe only while no passthrough handle can
    /// have written the file behind the cache's back.
    fn keep_cache(&self) -> u32 {
        if self.cache.keep_file_cache && !self.io.enabled() {
            FOPEN_KEEP_CACHE
        } else {
            0
        }
    }

    fn opened(&self, fh: u64, mode: &IoMode) -> Opened {
        match mode {
            IoMode::Passthrough(b) => Opened {
                fh,
                flags: FOPEN_PASSTHROUGH,
                backing: Some(b.id),
            },
            IoMode::Direct => Opened {
                fh,
                flags: FOPEN_DIRECT_IO,
                backing: None,
            },
            IoMode::Cached => Opened {
                fh,
                flags: self.keep_cache(),
                backing: None,
            },
        }
    }
}

/// The operations, one per FUSE request.
impl LayerFs {
    /// `Ok(None)`: the name does not exist (a negative entry the kernel may
    /// cache, so repeated lookups of missing names stay in the kernel).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<Option<Stat>> {
        let _gate = self.union.gate.read();
        match self.union.lookup(parent, name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            r => r.map(|(_, st)| Some(st)),
        }
    }

    /// Unmounted cleanly: the next mount need not look for unrecorded changes.
    pub fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(j) = &self.journal {
            j.flush();
            if let Err(e) = j.meta_put(crate::journal::META_CLEAN, Some(b"1")) {
                tracing::warn!(err = %e, "cannot mark the journal clean");
            }
        }
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.union.inodes.forget(ino, nlookup);
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> io::Result<Stat> {
        let _gate = self.union.gate.read();
        if let Some(fh) = fh {
            if let Ok(f) = self.files.get(fh) {
                let mut st = sys::fstat(f.fd.as_fd())?;
                st.st_ino = ino;
                return Ok(st);
            }
        }
        let node = self.union.node(ino)?;
        match self.union.stat_node(&node) {
            // Unlinked but still open (fstat comes without a handle): ask an open descriptor.
            Err(e) if node.state.read().unlinked => {
                let f = self.files.find(|f| f.ino == ino).ok_or(e)?;
                let mut st = sys::fstat(f.fd.as_fd())?;
                st.st_ino = ino;
                Ok(st)
            }
            r => r,
        }
    }

    pub fn setattr(&self, c: Caller, ino: u64, a: SetAttr, fh: Option<u64>) -> io::Result<Stat> {
        let _gate = self.union.gate.read();
        let r = (|| {
            let node = self.union.node(ino)?;
            let f = match fh {
                Some(fh) => self.files.get(fh).ok(),
                // fchmod/fchown/futimens come without a handle; a file that
                // is open but has no name left is reached through its handle.
                None if node.state.read().unlinked => {
                    self.files.find(|f| f.ino == ino && f.writable)
                }
                None => None,
            };
            attrs::setattr(
                &self.union,
                &c.ctx(),
                &node,
                // Only a handle opened for writing is known to be the upper
                // file; attributes must never be changed through a lower one.
                f.as_ref().filter(|f| f.writable).map(|f| &f.fd),
                a,
            )
        })();
        if r.is_ok() {
            let w = c.who();
            if let Some(s) = a.size {
                self.note_ino(w, Op::Truncate, ino, Some(format!("size {s}")));
            }
            if let Some(m) = a.mode {
                let d = format!("mode {:04o}", m & 0o7777);
                self.note_ino(w, Op::Chmod, ino, Some(d));
            }
            if a.uid.is_some() || a.gid.is_some() {
                let show = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
                let d = format!("owner {}:{}", show(a.uid), show(a.gid));
                self.note_ino(w, Op::Chown, ino, Some(d));
            }
            if a.atime.is_some() || a.mtime.is_some() {
                self.note_ino(w, Op::Utimes, ino, None);
            }
        }
        r
    }

    pub fn readlink(&self, ino: u64) -> io::Result<Vec<u8>> {
        let _gate = self.union.gate.read();
        let node = self.union.node(ino)?;
        let loc = self.union.loc(&node)?;
        sys::readlinkat(loc.dir.as_fd(), &loc.name)
    }

    pub fn mknod(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> io::Result<Stat> {
        let _gate = self.union.gate.read();
        let obj = NewObject::Node {
            mode,
            rdev: u64::from(rdev),
        };
        let (n, st, _) = namespace::create(&self.union, &c.ctx(), parent, name, obj)?;
        let d = format!("mode {:06o} rdev {rdev}", mode);
        self.note(c.who(), Op::Mknod, parent, name, n.ino, None, Some(d));
        Ok(st)
    }

    pub fn mkdir(&self, c: Caller, parent: u64, name: &OsStr, mode: u32) -> io::Result<Stat> {
        let _gate = self.union.gate.read();
        let obj = NewObject::Dir { mode };
        let (n, st, _) = namespace::create(&self.union, &c.ctx(), parent, name, obj)?;
        self.note(c.who(), Op::Mkdir, parent, name, n.ino, None, None);
        Ok(st)
    }

    pub fn unlink(&self, c: Caller, parent: u64, name: &OsStr) -> io::Result<()> {
        self.remove(c, parent, name, false)
    }

    pub fn rmdir(&self, c: Caller, parent: u64, name: &OsStr) -> io::Result<()> {
        self.remove(c, parent, name, true)
    }

    fn remove(&self, c: Caller, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
        let _gate = self.union.gate.read();
        // The name is gone afterwards: resolve the path first (only for the
        // journal; without one no path is built).
        let path = self
            .journal
            .as_ref()
            .and_then(|_| self.union.path_in(parent, name));
        if dir {
            namespace::rmdir(&self.union, parent, name)?;
        } else {
            namespace::unlink(&self.union, parent, name)?;
        }
        if let (Some(j), Some(p)) = (&self.journal, path) {
            let op = if dir { Op::Rmdir } else { Op::Unlink };
            j.record(c.who(), op, 0, p, None, None);
        }
        Ok(())
    }

    pub fn symlink(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> io::Result<Stat> {
        let _gate = self.union.gate.read();
        let obj = NewObject::Symlink { target };
        let (n, st, _) = namespace::create(&self.union, &c.ctx(), parent, name, obj)?;
        let d = format!("-> {}", std::path::Path::new(target).display());
        self.note(c.who(), Op::Symlink, parent, name, n.ino, None, Some(d));
        Ok(st)
    }

    pub fn rename(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        let _gate = self.union.gate.read();
        namespace::rename(&self.union, parent, name, newparent, newname, flags)?;
        let to = self
            .journal
            .as_ref()
            .and_then(|_| self.union.path_in(newparent, newname));
        let d = (flags & libc::RENAME_EXCHANGE != 0).then(|| "exchange".to_string());
        self.note(c.who(), Op::Rename, parent, name, 0, to, d);
        Ok(())
    }

    pub fn link(&self, c: Caller, ino: u64, newparent: u64, newname: &OsStr) -> io::Result<Stat> {
        let _gate = self.union.gate.read();
        let target = self.journal.as_ref().and_then(|_| self.union.path_of(ino));
        let (_, st) = namespace::link(&self.union, ino, newparent, newname)?;
        self.note(c.who(), Op::Link, newparent, newname, 0, target, None);
        Ok(st)
    }

    pub fn open(&self, c: Caller, ino: u64, flags: i32) -> io::Result<Opened> {
        let _gate = self.union.gate.read();
        let exec = flags & FMODE_EXEC != 0;
        let node = self.union.node(ino)?;
        if flags & libc::O_TRUNC != 0 && self.executing.lock().contains_key(&ino) {
            return Err(errno(libc::ETXTBSY));
        }
        let mut f = files::open(&self.union, &c.ctx(), &node, flags)?;
        if f.writable {
            f.watch = self.watch(c.who(), &f.fd);
            if flags & libc::O_TRUNC != 0 {
                self.note_ino(c.who(), Op::Truncate, ino, Some("open O_TRUNC".into()));
            }
        }
        if exec {
            f.exec = true;
            *self.executing.lock().entry(ino).or_insert(0) += 1;
        }
        let direct = flags & libc::O_DIRECT != 0;
        // Passthrough for writers (the upper file), programs and big files.
        // Small read-only opens of lower files (configuration) go through
        // the page cache: a reader holding a lower backing file would make
        // the kernel refuse a later writer's copy.
        let eligible = f.regular
            && !f.maybe_suid.load(Ordering::Relaxed)
            && (f.writable || exec || f.size >= PASSTHROUGH_MIN_SIZE);
        f.mode = match self.io.choose(ino, f.key, eligible, direct, f.fd.as_fd()) {
            Ok(m) => m,
            Err(e) => {
                self.release_exec(&f);
                return Err(e);
            }
        };
        let mode = f.mode.clone();
        let fh = self.files.insert(f);
        Ok(self.opened(fh, &mode))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let _gate = self.union.gate.read();
        self.files
            .get(fh)
            .and_then(|f| f.read(size as usize, offset))
    }

    /// `kill_suid`: the kernel asks for setuid/setgid to be cleared
    /// (`FUSE_WRITE_KILL_SUIDGID`, with HANDLE_KILLPRIV_V2).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suid: bool) -> io::Result<usize> {
        let _gate = self.union.gate.read();
        let f = self.files.get(fh)?;
        if kill_suid {
            f.kill_suid()?;
        }
        f.write(data, offset)
    }

    pub fn release(&self, fh: u64) {
        let _gate = self.union.gate.read();
        if let Some(f) = self.files.remove(fh) {
            self.note_release(&f);
            self.io.release(f.ino, &f.mode);
            self.release_exec(&f);
        }
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        let _gate = self.union.gate.read();
        self.files
            .get(fh)
            .and_then(|f| sys::fsync(f.fd.as_fd(), datasync))
    }

    /// The listing from `offset` on: `add(ino, next offset, type, name)`
    /// returns true when the reply is full.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, u32, &OsStr) -> bool,
    ) -> io::Result<()> {
        let _gate = self.union.gate.read();
        let (snap, entries, from) = self.snapshot(ino, offset)?;
        for (i, e) in entries.iter().enumerate().skip(from) {
            if add(e.ino, offset_of(snap, i), e.fmt, &e.name) {
                break;
            }
        }
        Ok(())
    }

    /// Listing with attributes: a cold `ls -l`, `du` or backup walk then
    /// needs no lookup round trip per entry. `add(name, next offset, stat,
    /// ttl)` returns true when the reply is full. Each entry handed to the
    /// kernel counts as a lookup ("." and ".." do not: their ttl is zero).
    pub fn readdirplus(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(&OsStr, u64, &Stat, Duration) -> bool,
    ) -> io::Result<()> {
        let _gate = self.union.gate.read();
        let (snap, entries, from) = self.snapshot(ino, offset)?;
        let ttl = self.cache.attr_ttl;
        for (i, e) in entries.iter().enumerate().skip(from) {
            let off = offset_of(snap, i);
            if e.name == "." || e.name == ".." {
                let mut st = sys::zeroed_stat();
                st.st_ino = e.ino;
                st.st_mode = libc::S_IFDIR;
                if add(&e.name, off, &st, Duration::ZERO) {
                    break;
                }
                continue;
            }
            let Ok((node, st)) = self.union.lookup(ino, &e.name) else {
                continue; // removed since the listing was taken
            };
            if add(&e.name, off, &st, ttl) {
                // Did not fit: the kernel will ask again; it holds no reference.
                self.union.inodes.forget(node.ino, 1);
                break;
            }
        }
        Ok(())
    }

    pub fn fsyncdir(&self, ino: u64, datasync: bool) -> io::Result<()> {
        let _gate = self.union.gate.read();
        let node = self.union.node(ino)?;
        if !node.state.read().upper {
            return Ok(());
        }
        let d = self.union.upper_dir_fd(&node)?;
        let fd = sys::reopen(d.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        sys::fsync(fd.as_fd(), datasync)
    }

    pub fn statfs(&self) -> io::Result<libc::statvfs> {
        let _gate = self.union.gate.read();
        let root = self
            .union
            .layers
            .upper_root()
            .unwrap_or_else(|| self.union.layers.lower_root(1));
        sys::fstatvfs(root)
    }

    pub fn setxattr(
        &self,
        c: Caller,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> io::Result<()> {
        let _gate = self.union.gate.read();
        let n = self.union.node(ino)?;
        attrs::setxattr(&self.union, &n, name.as_bytes(), value, flags)?;
        let d = Some(name.to_string_lossy().into_owned());
        self.note_ino(c.who(), Op::Setxattr, ino, d);
        Ok(())
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> io::Result<Vec<u8>> {
        let _gate = self.union.gate.read();
        let n = self.union.node(ino)?;
        attrs::getxattr(&self.union, &n, name.as_bytes())
    }

    pub fn listxattr(&self, ino: u64) -> io::Result<Vec<u8>> {
        let _gate = self.union.gate.read();
        let n = self.union.node(ino)?;
        attrs::listxattr(&self.union, &n)
    }

    pub fn removexattr(&self, c: Caller, ino: u64, name: &OsStr) -> io::Result<()> {
        let _gate = self.union.gate.read();
        let n = self.union.node(ino)?;
        attrs::removexattr(&self.union, &n, name.as_bytes())?;
        let d = Some(name.to_string_lossy().into_owned());
        self.note_ino(c.who(), Op::Removexattr, ino, d);
        Ok(())
    }

    pub fn create(
        &self,
        c: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> io::Result<(Stat, Opened)> {
        let _gate = self.union.gate.read();
        let obj = NewObject::File { mode, flags };
        let (node, st, fd) = namespace::create(&self.union, &c.ctx(), parent, name, obj)?;
        let fd = fd.ok_or_else(|| errno(libc::EIO))?;
        self.note(c.who(), Op::Create, parent, name, node.ino, None, None);
        // The new file's attributes are known: no fstat needed.
        let watch = self.journal.as_ref().map(|_| WriteWatch {
            who: c.who(),
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        });
        let direct = flags & libc::O_DIRECT != 0;
        let suid = st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0;
        let real = sys::fstat(fd.as_fd())?;
        let key = (real.st_dev, real.st_ino);
        let mode = self.io.choose(node.ino, key, !suid, direct, fd.as_fd())?;
        let fh = self.files.insert(OpenFile {
            ino: node.ino,
            fd,
            key,
            regular: true,
            size: 0,
            writable: true,
            mode: mode.clone(),
            append: flags & libc::O_APPEND != 0,
            exec: false,
            maybe_suid: suid.into(),
            watch,
        });
        Ok((st, self.opened(fh, &mode)))
    }

    pub fn fallocate(
        &self,
        c: Caller,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> io::Result<()> {
        let _gate = self.union.gate.read();
        self.files
            .get(fh)
            .and_then(|f| sys::fallocate(f.fd.as_fd(), mode, offset, length))?;
        let d = format!("mode {mode:#x} offset {offset} length {length}");
        self.note_ino(c.who(), Op::Fallocate, ino, Some(d));
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        let _gate = self.union.gate.read();
        self.files
            .get(fh)
            .and_then(|f| sys::lseek(f.fd.as_fd(), offset, whence))
    }
}

/// The xattr reply rule: size 0 asks for the size; a too-small buffer is
/// ERANGE.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

pub fn xattr_reply(r: io::Result<Vec<u8>>, size: u32) -> io::Result<XattrReply> {
    let v = r?;
    if size == 0 {
        Ok(XattrReply::Size(v.len() as u32))
    } else if v.len() <= size as usize {
        Ok(XattrReply::Data(v))
    } else {
        Err(errno(libc::ERANGE))
    }
}
