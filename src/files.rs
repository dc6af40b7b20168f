//! Open files and directories: the handle tables and the rules for opening
//! (copy-up on write, O_TRUNC without copying data, setuid clearing).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::copyup::copy_up;
use crate::inode::Node;
use crate::iomode::IoMode;
use crate::sys;
use crate::union::{errno, Ctx, Union};

pub struct OpenFile {
    pub ino: u64,
    pub fd: OwnedFd,
    /// (st_dev, st_ino) of the real file behind `fd`.
    pub key: (u64, u64),
    pub regular: bool,
    /// Size at open (to decide whether passthrough is worth a backing file).
    pub size: u64,
    /// Opened for writing: the object was copied up first, so `fd` is the
    /// upper file (a read-only handle may still be the lower one).
    pub writable: bool,
    /// How the kernel does I/O on this handle (set when the open is answered).
    pub mode: IoMode,
    pub append: bool,
    /// Opened by the kernel to execute the file.
    pub exec: bool,
    /// The file may carry setuid/setgid bits that a write must clear.
    pub maybe_suid: AtomicBool,
    /// Writable handles: who opened it and the file's size and mtime then,
    /// so release can journal one coalesced write record.
    pub watch: Option<WriteWatch>,
}

/// What a writable handle looked like when opened (see `OpenFile::watch`).
#[derive(Debug, Clone, Copy)]
pub struct WriteWatch {
    pub who: crate::journal::Who,
    pub size: i64,
    pub mtime: (i64, i64),
}

const SHARDS: usize = 16;

/// Handle table: fh -> object, sharded so parallel opens do not contend.
pub struct Handles<T> {
    shards: Vec<Mutex<HashMap<u64, Arc<T>>>>,
    next: AtomicU64,
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Handles<T> {
    pub fn insert(&self, v: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shards[fh as usize % SHARDS]
            .lock()
            .insert(fh, Arc::new(v));
        fh
    }

    pub fn get(&self, fh: u64) -> io::Result<Arc<T>> {
        self.shards[fh as usize % SHARDS]
            .lock()
            .get(&fh)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.shards[fh as usize % SHARDS].lock().remove(&fh)
    }

    /// First handle matching `pred` (a scan: for rare paths only).
    pub fn find(&self, pred: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.shards
            .iter()
            .find_map(|s| s.lock().values().find(|v| pred(v)).cloned())
    }

    /// Every open handle matching `pred`.
    pub fn filter(&self, pred: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .values()
                    .filter(|v| pred(v))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

fn wants_write(flags: i32) -> bool {
    let acc = flags & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || flags & libc::O_TRUNC != 0
}

/// Flags for the descriptor on the layer: the caller's, minus what the union
/// handles itself. O_DIRECT is dropped (FUSE buffers are not aligned; the
/// handle is opened with FOPEN_DIRECT_IO instead, so the page cache is still bypassed).
pub fn backing_flags(flags: i32) -> i32 {
    (flags
        & !(libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_TRUNC
            | libc::O_DIRECT
            | libc::O_NOFOLLOW))
        | libc::O_NOFOLLOW
}

/// Open `node` for I/O. Opening for write copies the object up first; with
/// O_TRUNC the copy carries no data (it is about to be discarded).
pub fn open(u: &Union, ctx: &Ctx, node: &Node, flags: i32) -> io::Result<OpenFile> {
    let trunc = flags & libc::O_TRUNC != 0;
    if wants_write(flags) {
        u.check_writable()?;
        copy_up(u, node, !trunc)?;
    }
    let loc = u.loc(node)?;
    let fd = sys::openat(loc.dir.as_fd(), &loc.name, backing_flags(flags), 0)?;
    let st = sys::fstat(fd.as_fd())?;
    let suid = st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0;
    if trunc && st.st_size != 0 {
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            // O_RDONLY|O_TRUNC truncates on Linux; that needs a writable descriptor.
            let w = sys::openat(
                loc.dir.as_fd(),
                &loc.name,
                libc::O_WRONLY | libc::O_NOFOLLOW,
                0,
            )?;
            sys::ftruncate(w.as_fd(), 0)?;
        } else {
            sys::ftruncate(fd.as_fd(), 0)?;
        }
    }
    if trunc && ctx.uid != 0 && suid {
        clear_suid(&fd, st.st_mode)?;
    }
    Ok(OpenFile {
        ino: node.ino,
        key: (st.st_dev, st.st_ino),
        regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        size: st.st_size as u64,
        writable: wants_write(flags),
        mode: IoMode::Cached,
        fd,
        append: flags & libc::O_APPEND != 0,
        exec: false,
        maybe_suid: AtomicBool::new(suid),
        watch: None,
    })
}

/// Clear setuid, and setgid when group-executable (setgid without group
/// execute is mandatory locking and stays), as the kernel does on write.
pub fn clear_suid(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    let mut new = mode & 0o7777 & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        new &= !libc::S_ISGID;
    }
    if new != mode & 0o7777 {
        sys::fchmod(fd.as_fd(), new)?;
    }
    Ok(())
}

impl OpenFile {
    /// Before a write by an unprivileged caller: drop setuid/setgid bits.
    pub fn kill_suid(&self) -> io::Result<()> {
        if !self.maybe_suid.load(Ordering::Relaxed) {
            return Ok(());
        }
        let st = sys::fstat(self.fd.as_fd())?;
        clear_suid(&self.fd, st.st_mode)?;
        self.maybe_suid.store(false, Ordering::Relaxed);
        Ok(())
    }

    pub fn write(&self, data: &[u8], off: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < data.len() {
            let n = if self.append {
                // The kernel picks the end of file: concurrent appenders stay whole.
                sys::write(self.fd.as_fd(), &data[done..])?
            } else {
                sys::pwrite(self.fd.as_fd(), &data[done..], off + done as u64)?
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    pub fn read(&self, size: usize, off: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < size {
            let n = sys::pread(self.fd.as_fd(), &mut buf[done..], off + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }
}
