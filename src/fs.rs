//! The fuser `Filesystem` implementation: translates each FUSE request into a
//! call on the union and the reply. No overlay logic lives here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tracing::info;

use crate::attrs::{self, SetAttr};
use crate::cache::CachePolicy;
use crate::dirmerge::{self, offset_of, DirEnt};
use crate::files::{self, Handles, OpenFile, WriteWatch};
use crate::inode::ROOT_INO;
use crate::iomode::{IoMode, IoModes};
use crate::journal::{Journal, Op, Who};
use crate::namespace::{self, NewObject};
use crate::sys::{self, Stat, TimeSpec};
use crate::union::{Ctx, Union};

/// `__FMODE_EXEC`: the kernel opens a file with this flag to execute it.
const FMODE_EXEC: i32 = 0x20;

pub struct LayerFs {
    pub union: Arc<Union>,
    cache: CachePolicy,
    io: IoModes,
    /// Shared with the control service (open writers matter to checkpoints).
    pub files: Arc<Handles<OpenFile>>,
    journal: Option<Arc<Journal>>,
    /// Files open for execution, by inode: O_TRUNC on them is ETXTBSY. The
    /// kernel checks write opens itself but with atomic O_TRUNC it truncates
    /// (through us) before checking, so we must refuse first.
    executing: Mutex<HashMap<u64, u32>>,
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
        }
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn who(req: &Request) -> Who {
    Who {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn err(e: io::Error) -> Errno {
    Errno::from(e)
}

fn kind(fmt: u32) -> FileType {
    match fmt {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::new(0, nsec as u32)
    }
}

pub fn to_attr(st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode & libc::S_IFMT),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn negative_stat() -> Stat {
    sys::zeroed_stat()
}

fn timespec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::At(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let mut s = -(d.as_secs() as i64);
                let mut ns = -(d.subsec_nanos() as i64);
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                TimeSpec::At(s, ns)
            }
        },
    }
}

impl LayerFs {
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

    fn watch(&self, req: &Request, fd: &std::os::fd::OwnedFd) -> Option<WriteWatch> {
        self.journal.as_ref()?;
        let st = sys::fstat(fd.as_fd()).ok()?;
        Some(WriteWatch {
            who: who(req),
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        })
    }

    fn entry(&self, reply: ReplyEntry, r: io::Result<(Arc<crate::inode::Node>, Stat)>) {
        match r {
            Ok((_, st)) => reply.entry_with_ttls(
                &self.cache.attr_ttl,
                &self.cache.entry_ttl,
                &to_attr(&st),
                Generation(0),
            ),
            Err(e) => reply.error(err(e)),
        }
    }
}

/// Read-only opens of files at least this big use passthrough.
const PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;

impl LayerFs {
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
    fn keep_cache(&self) -> FopenFlags {
        if self.cache.keep_file_cache && !self.io.enabled() {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let want = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_MAX_PAGES;
        // Never FUSE_SETXATTR_EXT: fuser 0.18 mis-parses it. No POSIX/flock
        // lock flags: the kernel then handles locks locally, as for a local fs.
        let caps = config.capabilities();
        let _ = config.add_capabilities(want & caps);
        if self.io.enabled() {
            if !caps.contains(InitFlags::FUSE_PASSTHROUGH) {
                self.io
                    .disable("the kernel has no FUSE passthrough (Linux 6.9 or later)");
            } else if sys::geteuid() != 0 {
                self.io.disable("it needs CAP_SYS_ADMIN");
            } else if config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .is_err()
                || config.set_max_stack_depth(1).is_err()
            {
                self.io.disable("the kernel refused it at init");
            }
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        info!(
            killpriv_v2 = caps.contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2),
            passthrough = self.io.enabled(),
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _gate = self.union.gate.read();
        match self.union.lookup(parent.0, name) {
            // A negative entry the kernel may cache: repeated lookups of
            // missing names (PATH searches, imports) stay in the kernel.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mut attr = to_attr(&negative_stat());
                attr.ino = INodeNo(0);
                reply.entry_with_ttls(&Duration::ZERO, &self.cache.entry_ttl, &attr, Generation(0));
            }
            r => self.entry(reply, r),
        }
    }

    fn destroy(&mut self) {
        // Unmounted cleanly: the next mount need not look for unrecorded changes.
        if let Some(j) = &self.journal {
            j.flush();
            if let Err(e) = j.meta_put(crate::journal::META_CLEAN, Some(b"1")) {
                tracing::warn!(err = %e, "cannot mark the journal clean");
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.union.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _gate = self.union.gate.read();
        let r = (|| {
            if let Some(fh) = fh {
                if let Ok(f) = self.files.get(fh.0) {
                    let mut st = sys::fstat(f.fd.as_fd())?;
                    st.st_ino = ino.0;
                    return Ok(st);
                }
            }
            let node = self.union.node(ino.0)?;
            match self.union.stat_node(&node) {
                // Unlinked but still open (fstat comes without a handle): ask an open descriptor.
                Err(e) if node.state.read().unlinked => {
                    let f = self.files.find(|f| f.ino == ino.0).ok_or(e)?;
                    let mut st = sys::fstat(f.fd.as_fd())?;
                    st.st_ino = ino.0;
                    Ok(st)
                }
                r => r,
            }
        })();
        match r {
            Ok(st) => reply.attr(&self.cache.attr_ttl, &to_attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _gate = self.union.gate.read();
        let r = (|| {
            let node = self.union.node(ino.0)?;
            let f = match fh {
                Some(fh) => self.files.get(fh.0).ok(),
                // fchmod/fchown/futimens come without a handle; a file that
                // is open but has no name left is reached through its handle.
                None if node.state.read().unlinked => {
                    self.files.find(|f| f.ino == ino.0 && f.writable)
                }
                None => None,
            };
            attrs::setattr(
                &self.union,
                &ctx(req),
                &node,
                // Only a handle opened for writing is known to be the upper
                // file; attributes must never be changed through a lower one.
                f.as_ref().filter(|f| f.writable).map(|f| &f.fd),
                SetAttr {
                    mode,
                    uid,
                    gid,
                    size,
                    atime: atime.map(timespec),
                    mtime: mtime.map(timespec),
                },
            )
        })();
        if r.is_ok() {
            let w = who(req);
            if let Some(s) = size {
                self.note_ino(w, Op::Truncate, ino.0, Some(format!("size {s}")));
            }
            if let Some(m) = mode {
                self.note_ino(
                    w,
                    Op::Chmod,
                    ino.0,
                    Some(format!("mode {:04o}", m & 0o7777)),
                );
            }
            if uid.is_some() || gid.is_some() {
                let show = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
                let d = format!("owner {}:{}", show(uid), show(gid));
                self.note_ino(w, Op::Chown, ino.0, Some(d));
            }
            if atime.is_some() || mtime.is_some() {
                self.note_ino(w, Op::Utimes, ino.0, None);
            }
        }
        match r {
            Ok(st) => reply.attr(&self.cache.attr_ttl, &to_attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _gate = self.union.gate.read();
        let r = (|| {
            let node = self.union.node(ino.0)?;
            let loc = self.union.loc(&node)?;
            sys::readlinkat(loc.dir.as_fd(), &loc.name)
        })();
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _gate = self.union.gate.read();
        let r = namespace::create(
            &self.union,
            &ctx(req),
            parent.0,
            name,
            NewObject::Node {
                mode,
                rdev: u64::from(rdev),
            },
        )
        .map(|(n, st, _)| (n, st));
        if let Ok((n, _)) = &r {
            let d = format!("mode {:06o} rdev {rdev}", mode);
            self.note(who(req), Op::Mknod, parent.0, name, n.ino, None, Some(d));
        }
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _gate = self.union.gate.read();
        let r = namespace::create(
            &self.union,
            &ctx(req),
            parent.0,
            name,
            NewObject::Dir { mode },
        )
        .map(|(n, st, _)| (n, st));
        if let Ok((n, _)) = &r {
            self.note(who(req), Op::Mkdir, parent.0, name, n.ino, None, None);
        }
        self.entry(reply, r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _gate = self.union.gate.read();
        // The name is gone afterwards: resolve the path first.
        let path = self.union.path_in(parent.0, name);
        match namespace::unlink(&self.union, parent.0, name) {
            Ok(()) => {
                if let (Some(j), Some(p)) = (&self.journal, path) {
                    j.record(who(req), Op::Unlink, 0, p, None, None);
                }
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _gate = self.union.gate.read();
        let path = self.union.path_in(parent.0, name);
        match namespace::rmdir(&self.union, parent.0, name) {
            Ok(()) => {
                if let (Some(j), Some(p)) = (&self.journal, path) {
                    j.record(who(req), Op::Rmdir, 0, p, None, None);
                }
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _gate = self.union.gate.read();
        let r = namespace::create(
            &self.union,
            &ctx(req),
            parent.0,
            link_name,
            NewObject::Symlink {
                target: target.as_os_str(),
            },
        )
        .map(|(n, st, _)| (n, st));
        if let Ok((n, _)) = &r {
            let d = format!("-> {}", target.display());
            self.note(
                who(req),
                Op::Symlink,
                parent.0,
                link_name,
                n.ino,
                None,
                Some(d),
            );
        }
        self.entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _gate = self.union.gate.read();
        match namespace::rename(
            &self.union,
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
        ) {
            Ok(()) => {
                let to = self.union.path_in(newparent.0, newname);
                let d = (flags.bits() & libc::RENAME_EXCHANGE != 0).then(|| "exchange".to_string());
                self.note(who(req), Op::Rename, parent.0, name, 0, to, d);
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _gate = self.union.gate.read();
        let target = self.union.path_of(ino.0);
        let r = namespace::link(&self.union, ino.0, newparent.0, newname);
        if r.is_ok() {
            self.note(who(req), Op::Link, newparent.0, newname, 0, target, None);
        }
        self.entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _gate = self.union.gate.read();
        let exec = flags.0 & FMODE_EXEC != 0;
        let r = (|| {
            let node = self.union.node(ino.0)?;
            if flags.0 & libc::O_TRUNC != 0 && self.executing.lock().contains_key(&ino.0) {
                return Err(io::Error::from_raw_os_error(libc::ETXTBSY));
            }
            files::open(&self.union, &ctx(req), &node, flags.0)
        })();
        match r {
            Ok(mut f) => {
                if f.writable {
                    f.watch = self.watch(req, &f.fd);
                    if flags.0 & libc::O_TRUNC != 0 {
                        self.note_ino(who(req), Op::Truncate, ino.0, Some("open O_TRUNC".into()));
                    }
                }
                if exec {
                    f.exec = true;
                    *self.executing.lock().entry(ino.0).or_insert(0) += 1;
                }
                let direct = flags.0 & libc::O_DIRECT != 0;
                // Passthrough for writers (the upper file), programs and big
                // files. Small read-only opens of lower files (configuration)
                // go through the page cache: a reader holding a lower backing
                // file would make the kernel refuse a later writer's copy.
                let eligible = f.regular
                    && !f.maybe_suid.load(std::sync::atomic::Ordering::Relaxed)
                    && (f.writable || exec || f.size >= PASSTHROUGH_MIN_SIZE);
                f.mode = match self.io.choose(ino.0, f.key, eligible, direct, || {
                    reply.open_backing(f.fd.as_fd())
                }) {
                    Ok(m) => m,
                    Err(e) => {
                        self.release_exec(&f);
                        return reply.error(err(e));
                    }
                };
                let mode = f.mode.clone();
                let fh = FileHandle(self.files.insert(f));
                match mode {
                    IoMode::Passthrough(b) => {
                        reply.opened_passthrough(fh, FopenFlags::empty(), &b.id)
                    }
                    IoMode::Direct => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO),
                    IoMode::Cached => reply.opened(fh, self.keep_cache()),
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _gate = self.union.gate.read();
        match self
            .files
            .get(fh.0)
            .and_then(|f| f.read(size as usize, offset))
        {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _gate = self.union.gate.read();
        let r = (|| {
            let f = self.files.get(fh.0)?;
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                f.kill_suid()?;
            }
            f.write(data, offset)
        })();
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close (data is written through, locks are the
        // kernel's). ENOSYS tells the kernel to stop sending FLUSH: one round
        // trip less on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _gate = self.union.gate.read();
        if let Some(f) = self.files.remove(fh.0) {
            self.note_release(&f);
            self.io.release(f.ino, &f.mode);
            self.release_exec(&f);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _gate = self.union.gate.read();
        match self
            .files
            .get(fh.0)
            .and_then(|f| sys::fsync(f.fd.as_fd(), datasync))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    /// No OPENDIR: answering ENOSYS makes the kernel stop sending OPENDIR
    /// and RELEASEDIR and cache every listing (FOPEN_CACHE_DIR |
    /// FOPEN_KEEP_CACHE is its default then): two round trips less per
    /// directory walked. Offsets name a listing snapshot (see `Listings`).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _gate = self.union.gate.read();
        let (snap, entries, from) = match self.snapshot(ino.0, offset) {
            Ok(s) => s,
            Err(e) => return reply.error(err(e)),
        };
        for (i, e) in entries.iter().enumerate().skip(from) {
            if reply.add(INodeNo(e.ino), offset_of(snap, i), kind(e.fmt), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    /// Listing with attributes: a cold `ls -l`, `du` or backup walk then
    /// needs no lookup round trip per entry. Each entry handed to the kernel
    /// counts as a lookup ("." and ".." do not).
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _gate = self.union.gate.read();
        let (snap, entries, from) = match self.snapshot(ino.0, offset) {
            Ok(s) => s,
            Err(e) => return reply.error(err(e)),
        };
        let ttl = self.cache.attr_ttl;
        for (i, e) in entries.iter().enumerate().skip(from) {
            let off = offset_of(snap, i);
            if e.name == "." || e.name == ".." {
                let mut st = sys::zeroed_stat();
                st.st_ino = e.ino;
                st.st_mode = libc::S_IFDIR;
                if reply.add(
                    INodeNo(e.ino),
                    off,
                    &e.name,
                    &Duration::ZERO,
                    &to_attr(&st),
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let Ok((node, st)) = self.union.lookup(ino.0, &e.name) else {
                continue; // removed since the listing was taken
            };
            if reply.add(
                INodeNo(st.st_ino),
                off,
                &e.name,
                &ttl,
                &to_attr(&st),
                Generation(0),
            ) {
                // Did not fit: the kernel will ask again; it holds no reference.
                self.union.inodes.forget(node.ino, 1);
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _gate = self.union.gate.read();
        let r = (|| {
            let node = self.union.node(ino.0)?;
            if !node.state.read().upper {
                return Ok(());
            }
            let d = self.union.upper_dir_fd(&node)?;
            let fd = sys::reopen(d.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
            sys::fsync(fd.as_fd(), datasync)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _gate = self.union.gate.read();
        let root = self
            .union
            .layers
            .upper_root()
            .unwrap_or_else(|| self.union.layers.lower_root(1));
        match sys::fstatvfs(root) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _gate = self.union.gate.read();
        let r = self
            .union
            .node(ino.0)
            .and_then(|n| attrs::setxattr(&self.union, &n, name.as_bytes(), value, flags));
        if r.is_ok() {
            let d = Some(name.to_string_lossy().into_owned());
            self.note_ino(who(req), Op::Setxattr, ino.0, d);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _gate = self.union.gate.read();
        let r = self
            .union
            .node(ino.0)
            .and_then(|n| attrs::getxattr(&self.union, &n, name.as_bytes()));
        xattr_reply(reply, r, size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _gate = self.union.gate.read();
        let r = self
            .union
            .node(ino.0)
            .and_then(|n| attrs::listxattr(&self.union, &n));
        xattr_reply(reply, r, size);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _gate = self.union.gate.read();
        let r = self
            .union
            .node(ino.0)
            .and_then(|n| attrs::removexattr(&self.union, &n, name.as_bytes()));
        if r.is_ok() {
            let d = Some(name.to_string_lossy().into_owned());
            self.note_ino(who(req), Op::Removexattr, ino.0, d);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _gate = self.union.gate.read();
        let r = namespace::create(
            &self.union,
            &ctx(req),
            parent.0,
            name,
            NewObject::File { mode, flags },
        );
        match r {
            Ok((node, st, Some(fd))) => {
                self.note(who(req), Op::Create, parent.0, name, node.ino, None, None);
                // The new file's attributes are known: no fstat needed.
                let watch = self.journal.as_ref().map(|_| WriteWatch {
                    who: who(req),
                    size: st.st_size,
                    mtime: (st.st_mtime, st.st_mtime_nsec),
                });
                let direct = flags & libc::O_DIRECT != 0;
                let suid = st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0;
                let key = match sys::fstat(fd.as_fd()) {
                    Ok(real) => (real.st_dev, real.st_ino),
                    Err(e) => return reply.error(err(e)),
                };
                let mode = match self.io.choose(node.ino, key, !suid, direct, || {
                    reply.open_backing(fd.as_fd())
                }) {
                    Ok(m) => m,
                    Err(e) => return reply.error(err(e)),
                };
                let fh = FileHandle(self.files.insert(OpenFile {
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
                }));
                let attr = to_attr(&st);
                let ttl = self.cache.attr_ttl;
                match mode {
                    IoMode::Passthrough(b) => reply.created_passthrough(
                        &ttl,
                        &attr,
                        Generation(0),
                        fh,
                        FopenFlags::empty(),
                        &b.id,
                    ),
                    IoMode::Direct => {
                        reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO)
                    }
                    IoMode::Cached => {
                        reply.created(&ttl, &attr, Generation(0), fh, self.keep_cache())
                    }
                }
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _gate = self.union.gate.read();
        match self
            .files
            .get(fh.0)
            .and_then(|f| sys::fallocate(f.fd.as_fd(), mode, offset, length))
        {
            Ok(()) => {
                let d = format!("mode {mode:#x} offset {offset} length {length}");
                self.note_ino(who(req), Op::Fallocate, ino.0, Some(d));
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _gate = self.union.gate.read();
        match self
            .files
            .get(fh.0)
            .and_then(|f| sys::lseek(f.fd.as_fd(), offset, whence))
        {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, r: io::Result<Vec<u8>>, size: u32) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(Errno::ERANGE),
        Err(e) => reply.error(err(e)),
    }
}
