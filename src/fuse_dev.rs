//! Requests read from `/dev/fuse` by fuser's session threads: decode with
//! fuser, call `LayerFs`, answer with fuser's reply types. With FUSE over
//! io_uring (`fuse_ring.rs`) this path still carries INIT, FORGET and
//! INTERRUPT, and any request sent before the ring queues were ready.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::info;

use crate::attrs::SetAttr;
use crate::fs::{xattr_reply, Caller, LayerFs, Opened, XattrReply, FOPEN_PASSTHROUGH};
use crate::sys::{self, Stat, TimeSpec};

/// `FUSE_OVER_IO_URING` (flags2 bit 9 of INIT): requests may come through
/// io_uring queues. fuser 0.18 has no name for it.
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

/// The fuser `Filesystem` over a shared `LayerFs` (shared with the ring
/// queues and the control service).
pub struct DevFs {
    pub fs: Arc<LayerFs>,
    /// Ask for FUSE over io_uring at INIT.
    pub want_uring: bool,
    /// Set at INIT: the kernel agreed to io_uring queues.
    pub uring: Arc<crate::fuse_ring::Negotiated>,
}

fn caller(req: &Request) -> Caller {
    Caller {
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

impl DevFs {
    fn entry(&self, reply: ReplyEntry, r: io::Result<Stat>) {
        let c = &self.fs.cache;
        match r {
            Ok(st) => {
                reply.entry_with_ttls(&c.attr_ttl, &c.entry_ttl, &to_attr(&st), Generation(0))
            }
            Err(e) => reply.error(err(e)),
        }
    }
}

/// Answer an open with fuser's reply types. A passthrough handle owns its
/// backing id; fuser's `BackingId` borrows it for the reply and hands it
/// back unclosed (`into_raw`).
macro_rules! reply_opened {
    ($reply:ident, $o:expr, $fh:ident, $fl:ident, $plain:expr, $bid:ident, $pass:expr) => {{
        let o: Opened = $o;
        let $fh = FileHandle(o.fh);
        let $fl = FopenFlags::from_bits_retain(o.flags & !FOPEN_PASSTHROUGH);
        match o.backing {
            Some(id) => {
                // SAFETY: `id` stays registered while the handle lives.
                let $bid = unsafe { $reply.wrap_backing(id) };
                $pass;
                $bid.into_raw();
            }
            None => $plain,
        }
    }};
}

impl Filesystem for DevFs {
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
        let io = self.fs.io();
        if io.enabled() {
            if !caps.contains(InitFlags::FUSE_PASSTHROUGH) {
                io.disable("the kernel has no FUSE passthrough (Linux 6.9 or later)");
            } else if sys::geteuid() != 0 {
                io.disable("it needs CAP_SYS_ADMIN");
            } else if config
                .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
                .is_err()
                || config.set_max_stack_depth(1).is_err()
            {
                io.disable("the kernel refused it at init");
            }
        }
        let uring = InitFlags::from_bits_retain(FUSE_OVER_IO_URING);
        let uring_ok = self.want_uring && caps.contains(uring);
        if uring_ok {
            let _ = config.add_capabilities(uring);
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        self.uring.set(uring_ok);
        info!(
            killpriv_v2 = caps.contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2),
            passthrough = io.enabled(),
            io_uring = uring_ok,
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(None) => {
                let mut attr = to_attr(&sys::zeroed_stat());
                attr.ino = INodeNo(0);
                let ttl = self.fs.cache.entry_ttl;
                reply.entry_with_ttls(&Duration::ZERO, &ttl, &attr, Generation(0));
            }
            Ok(Some(st)) => self.entry(reply, Ok(st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn destroy(&mut self) {
        self.fs.destroy();
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(st) => reply.attr(&self.fs.cache.attr_ttl, &to_attr(&st)),
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
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timespec),
            mtime: mtime.map(timespec),
        };
        match self.fs.setattr(caller(req), ino.0, a, fh.map(|f| f.0)) {
            Ok(st) => reply.attr(&self.fs.cache.attr_ttl, &to_attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
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
        self.entry(
            reply,
            self.fs.mknod(caller(req), parent.0, name, mode, rdev),
        );
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
        self.entry(reply, self.fs.mkdir(caller(req), parent.0, name, mode));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.fs.unlink(caller(req), parent.0, name))
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.fs.rmdir(caller(req), parent.0, name))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self
            .fs
            .symlink(caller(req), parent.0, link_name, target.as_os_str());
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
        let c = caller(req);
        empty(
            reply,
            self.fs
                .rename(c, parent.0, name, newparent.0, newname, flags.bits()),
        )
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.fs.link(caller(req), ino.0, newparent.0, newname),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(caller(req), ino.0, flags.0) {
            Ok(o) => reply_opened!(
                reply,
                o,
                fh,
                fl,
                reply.opened(fh, fl),
                bid,
                reply.opened_passthrough(fh, fl, &bid)
            ),
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
        match self.fs.read(fh.0, offset, size) {
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
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.fs.write(fh.0, offset, data, kill) {
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
        self.fs.release(fh.0);
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
        empty(reply, self.fs.fsync(fh.0, datasync))
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
        let r = self.fs.readdir(ino.0, offset, |ino, off, fmt, name| {
            reply.add(INodeNo(ino), off, kind(fmt), name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.fs.readdirplus(ino.0, offset, |name, off, st, ttl| {
            let attr = to_attr(st);
            reply.add(INodeNo(st.st_ino), off, name, &ttl, &attr, Generation(0))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsyncdir(ino.0, datasync))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
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
        empty(
            reply,
            self.fs.setxattr(caller(req), ino.0, name, value, flags),
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(reply, xattr_reply(self.fs.getxattr(ino.0, name), size));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(reply, xattr_reply(self.fs.listxattr(ino.0), size));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.fs.removexattr(caller(req), ino.0, name))
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
        match self.fs.create(caller(req), parent.0, name, mode, flags) {
            Ok((st, o)) => {
                let attr = to_attr(&st);
                let ttl = self.fs.cache.attr_ttl;
                reply_opened!(
                    reply,
                    o,
                    fh,
                    fl,
                    reply.created(&ttl, &attr, Generation(0), fh, fl),
                    bid,
                    reply.created_passthrough(&ttl, &attr, Generation(0), fh, fl, &bid)
                )
            }
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
        empty(
            reply,
            self.fs
                .fallocate(caller(req), ino.0, fh.0, offset, length, mode),
        )
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
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn empty(reply: ReplyEmpty, r: io::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

fn xattr(reply: ReplyXattr, r: io::Result<XattrReply>) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(v)) => reply.data(&v),
        Err(e) => reply.error(err(e)),
    }
}
