//! FUSE requests as they arrive in an io_uring queue entry: decode the
//! kernel's structures, call `LayerFs`, encode the reply in place.
//!
//! An entry has a header buffer (`fuse_in_header`, then the opcode's fixed
//! argument struct in `op_in`, then `fuse_uring_ent_in_out`) and a payload
//! buffer (names, written data). The reply goes back the same way: a
//! `fuse_out_header`, and the reply structs or data in the payload.
//! Layouts are the kernel's (include/uapi/linux/fuse.h), in the machine's
//! own byte order: this is a kernel interface, never stored or sent on.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::attrs::SetAttr;
use crate::fs::{xattr_reply, Caller, LayerFs, Opened, XattrReply};
use crate::sys::{Stat, TimeSpec};

/// Offsets in the header buffer (`struct fuse_uring_req_header`).
pub const HEADER_SIZE: usize = 128 + 128 + 32;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;

mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const READDIR: u32 = 28;
}

const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FUSE_GETATTR_FH: u32 = 1 << 0;
const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;
const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;

/// A malformed request (short arguments, a name without its NUL).
fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Little reader over a byte slice in native byte order.
struct In<'a>(&'a [u8]);

impl In<'_> {
    fn u32(&self, at: usize) -> io::Result<u32> {
        let b = self.0.get(at..at + 4).ok_or_else(einval)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: usize) -> io::Result<u64> {
        let b = self.0.get(at..at + 8).ok_or_else(einval)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    }
}

/// NUL-terminated strings one after another (names, then a link target).
struct Names<'a>(&'a [u8]);

impl<'a> Names<'a> {
    fn next(&mut self) -> io::Result<&'a OsStr> {
        let end = self.0.iter().position(|&b| b == 0).ok_or_else(einval)?;
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Ok(OsStr::from_bytes(s))
    }
}

/// Reply writer into the payload buffer.
struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Out<'_> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        let end = self.len + b.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ERANGE))?
            .copy_from_slice(b);
        self.len = end;
        Ok(())
    }
    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.bytes(&v.to_ne_bytes())
    }
    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.bytes(&v.to_ne_bytes())
    }
}

/// `struct fuse_attr` (88 bytes).
fn attr(o: &mut Out<'_>, st: &Stat) -> io::Result<()> {
    o.u64(st.st_ino)?;
    o.u64(st.st_size as u64)?;
    o.u64(st.st_blocks as u64)?;
    o.u64(st.st_atime as u64)?;
    o.u64(st.st_mtime as u64)?;
    o.u64(st.st_ctime as u64)?;
    o.u32(st.st_atime_nsec as u32)?;
    o.u32(st.st_mtime_nsec as u32)?;
    o.u32(st.st_ctime_nsec as u32)?;
    o.u32(st.st_mode)?;
    o.u32(st.st_nlink as u32)?;
    o.u32(st.st_uid)?;
    o.u32(st.st_gid)?;
    o.u32(st.st_rdev as u32)?;
    o.u32(st.st_blksize as u32)?;
    o.u32(0)
}

/// `struct fuse_entry_out` (128 bytes); `ino` 0 is a negative entry.
fn entry(o: &mut Out<'_>, st: &Stat, entry_ttl: Duration, attr_ttl: Duration) -> io::Result<()> {
    o.u64(st.st_ino)?;
    o.u64(0)?; // generation
    o.u64(entry_ttl.as_secs())?;
    o.u64(attr_ttl.as_secs())?;
    o.u32(entry_ttl.subsec_nanos())?;
    o.u32(attr_ttl.subsec_nanos())?;
    attr(o, st)
}

/// `struct fuse_open_out` (16 bytes).
fn open_out(o: &mut Out<'_>, op: &Opened) -> io::Result<()> {
    o.u64(op.fh)?;
    o.u32(op.flags)?;
    o.u32(op.backing.unwrap_or(0))
}

/// `struct fuse_dirent` header and name, padded to 8 bytes; false when it
/// does not fit in `max`.
fn dirent(o: &mut Out<'_>, max: usize, ino: u64, off: u64, fmt: u32, name: &OsStr) -> bool {
    let n = name.as_bytes();
    let size = (24 + n.len() + 7) & !7;
    if o.len + size > max || o.len + size > o.buf.len() {
        return false;
    }
    let start = o.len;
    let w = &mut o.buf[start..start + size];
    w[0..8].copy_from_slice(&ino.to_ne_bytes());
    w[8..16].copy_from_slice(&off.to_ne_bytes());
    w[16..20].copy_from_slice(&(n.len() as u32).to_ne_bytes());
    w[20..24].copy_from_slice(&((fmt & libc::S_IFMT) >> 12).to_ne_bytes());
    w[24..24 + n.len()].copy_from_slice(n);
    w[24 + n.len()..].fill(0);
    o.len += size;
    true
}

fn time(valid: u32, set: u32, now: u32, secs: u64, nsecs: u32) -> Option<TimeSpec> {
    if valid & set == 0 {
        None
    } else if valid & now != 0 {
        Some(TimeSpec::Now)
    } else {
        Some(TimeSpec::At(secs as i64, i64::from(nsecs)))
    }
}

/// The decoded request header.
pub struct Header {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub caller: Caller,
    /// `fuse_uring_ent_in_out.commit_id`: names the request in the commit.
    pub commit_id: u64,
    pub payload_len: usize,
}

pub fn header(h: &[u8]) -> io::Result<Header> {
    let i = In(h);
    Ok(Header {
        opcode: i.u32(4)?,
        unique: i.u64(8)?,
        nodeid: i.u64(16)?,
        caller: Caller {
            uid: i.u32(24)?,
            gid: i.u32(28)?,
            pid: i.u32(32)?,
        },
        commit_id: i.u64(ENT_IN_OUT + 8)?,
        payload_len: i.u32(ENT_IN_OUT + 16)? as usize,
    })
}

/// Requests whose work is a few system calls on metadata (no data copied,
/// no directory listed, never a copy-up): a queue thread serves these
/// without leaving SCHED_IDLE (see `fuse_ring::serve_queue`).
pub fn is_light(opcode: u32) -> bool {
    matches!(
        opcode,
        op::LOOKUP
            | op::GETATTR
            | op::READLINK
            | op::STATFS
            | op::RELEASE
            | op::GETXATTR
            | op::LISTXATTR
            | op::RELEASEDIR
    )
}

/// Serve one request: `hbuf` is the header buffer, `payload` the payload
/// buffer (request in, reply out). Writes the `fuse_out_header` and the
/// reply length (every outcome is a reply) and returns the commit id that
/// names the request to the kernel; Err only for a header too short to
/// name one.
pub fn serve(fs: &LayerFs, hbuf: &mut [u8], payload: &mut [u8]) -> io::Result<u64> {
    let h = header(hbuf)?;
    let len = h.payload_len.min(payload.len());
    // A bug in one operation must not leave the application waiting for a
    // reply forever: a panic becomes EIO.
    let op_in = &hbuf[OP_IN..ENT_IN_OUT];
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch(fs, &h, op_in, payload, len)
    }))
    .unwrap_or_else(|_| {
        tracing::error!(opcode = h.opcode, "request handler panicked; answered EIO");
        Err(io::Error::from_raw_os_error(libc::EIO))
    });
    let (error, plen) = match result {
        Ok(n) => (0i32, n),
        Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), 0),
    };
    hbuf[0..4].copy_from_slice(&(16 + plen as u32).to_ne_bytes());
    hbuf[4..8].copy_from_slice(&error.to_ne_bytes());
    hbuf[8..16].copy_from_slice(&h.unique.to_ne_bytes());
    hbuf[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&(plen as u32).to_ne_bytes());
    Ok(h.commit_id)
}

/// Decode, call, encode; returns the reply's payload length.
fn dispatch(
    fs: &LayerFs,
    h: &Header,
    op_in: &[u8],
    payload: &mut [u8],
    len: usize,
) -> io::Result<usize> {
    let a = In(op_in);
    let ino = h.nodeid;
    let c = h.caller;
    let attr_ttl = fs.cache.attr_ttl;
    let entry_ttl = fs.cache.entry_ttl;
    // Requests whose payload holds names: copy them out first (the reply
    // is written over the same buffer).
    let owned: Vec<u8>;
    let mut names = match h.opcode {
        op::LOOKUP
        | op::SYMLINK
        | op::MKNOD
        | op::MKDIR
        | op::UNLINK
        | op::RMDIR
        | op::RENAME
        | op::RENAME2
        | op::LINK
        | op::SETXATTR
        | op::GETXATTR
        | op::REMOVEXATTR
        | op::CREATE => {
            owned = payload[..len].to_vec();
            Names(&owned)
        }
        _ => Names(&[]),
    };
    let mut o = Out {
        buf: payload,
        len: 0,
    };
    match h.opcode {
        op::LOOKUP => {
            let name = names.next()?;
            match fs.lookup(ino, name)? {
                Some(st) => entry(&mut o, &st, entry_ttl, attr_ttl)?,
                None => {
                    let mut st = crate::sys::zeroed_stat();
                    st.st_ino = 0;
                    entry(&mut o, &st, entry_ttl, Duration::ZERO)?
                }
            }
        }
        op::GETATTR => {
            let fh = (a.u32(0)? & FUSE_GETATTR_FH != 0).then_some(a.u64(8)?);
            let st = fs.getattr(ino, fh)?;
            attr_out(&mut o, &st, attr_ttl)?;
        }
        op::SETATTR => {
            let valid = a.u32(0)?;
            let get = |bit: u32, v: u32| (valid & bit != 0).then_some(v);
            let s = SetAttr {
                mode: get(FATTR_MODE, a.u32(68)?),
                uid: get(FATTR_UID, a.u32(76)?),
                gid: get(FATTR_GID, a.u32(80)?),
                size: (valid & FATTR_SIZE != 0).then_some(a.u64(16)?),
                atime: time(valid, FATTR_ATIME, FATTR_ATIME_NOW, a.u64(32)?, a.u32(56)?),
                mtime: time(valid, FATTR_MTIME, FATTR_MTIME_NOW, a.u64(40)?, a.u32(60)?),
            };
            let fh = (valid & FATTR_FH != 0).then_some(a.u64(8)?);
            let st = fs.setattr(c, ino, s, fh)?;
            attr_out(&mut o, &st, attr_ttl)?;
        }
        op::READLINK => {
            let t = fs.readlink(ino)?;
            o.bytes(&t)?;
        }
        op::SYMLINK => {
            let name = names.next()?;
            let target = names.next()?;
            let st = fs.symlink(c, ino, name, target)?;
            entry(&mut o, &st, entry_ttl, attr_ttl)?;
        }
        op::MKNOD => {
            let name = names.next()?;
            let st = fs.mknod(c, ino, name, a.u32(0)?, a.u32(4)?)?;
            entry(&mut o, &st, entry_ttl, attr_ttl)?;
        }
        op::MKDIR => {
            let name = names.next()?;
            let st = fs.mkdir(c, ino, name, a.u32(0)?)?;
            entry(&mut o, &st, entry_ttl, attr_ttl)?;
        }
        op::UNLINK => fs.unlink(c, ino, names.next()?)?,
        op::RMDIR => fs.rmdir(c, ino, names.next()?)?,
        op::RENAME | op::RENAME2 => {
            let flags = if h.opcode == op::RENAME2 {
                a.u32(8)?
            } else {
                0
            };
            let (from, to) = (names.next()?, names.next()?);
            fs.rename(c, ino, from, a.u64(0)?, to, flags)?;
        }
        op::LINK => {
            let st = fs.link(c, a.u64(0)?, ino, names.next()?)?;
            entry(&mut o, &st, entry_ttl, attr_ttl)?;
        }
        op::OPEN => {
            let opened = fs.open(c, ino, a.u32(0)? as i32)?;
            open_out(&mut o, &opened)?;
        }
        op::READ => {
            let d = fs.read(a.u64(0)?, a.u64(8)?, a.u32(16)?)?;
            o.bytes(&d)?;
        }
        op::WRITE => {
            let size = (a.u32(16)? as usize).min(len);
            let kill = a.u32(20)? & FUSE_WRITE_KILL_SUIDGID != 0;
            let n = fs.write(a.u64(0)?, a.u64(8)?, &o.buf[..size], kill)?;
            o.u32(n as u32)?;
            o.u32(0)?;
        }
        op::STATFS => {
            let s = fs.statfs()?;
            for v in [s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree] {
                o.u64(v)?;
            }
            for v in [s.f_bsize, s.f_namemax, s.f_frsize] {
                o.u32(v as u32)?;
            }
            o.bytes(&[0u8; 4 + 24])?; // padding, spare[6]
        }
        op::RELEASE => fs.release(a.u64(0)?),
        op::FSYNC => fs.fsync(a.u64(0)?, a.u32(8)? & FUSE_FSYNC_FDATASYNC != 0)?,
        op::FSYNCDIR => fs.fsyncdir(ino, a.u32(8)? & FUSE_FSYNC_FDATASYNC != 0)?,
        op::SETXATTR => {
            let size = a.u32(0)? as usize;
            let name = names.next()?;
            let value = names.0.get(..size).ok_or_else(einval)?;
            fs.setxattr(c, ino, name, value, a.u32(4)? as i32)?;
        }
        op::GETXATTR | op::LISTXATTR => {
            let size = a.u32(0)?;
            let r = if h.opcode == op::GETXATTR {
                fs.getxattr(ino, names.next()?)
            } else {
                fs.listxattr(ino)
            };
            match xattr_reply(r, size)? {
                XattrReply::Size(n) => {
                    o.u32(n)?;
                    o.u32(0)?;
                }
                XattrReply::Data(v) => o.bytes(&v)?,
            }
        }
        op::REMOVEXATTR => fs.removexattr(c, ino, names.next()?)?,
        op::READDIR => {
            let max = a.u32(16)? as usize;
            fs.readdir(ino, a.u64(8)?, |ino, off, fmt, name| {
                !dirent(&mut o, max, ino, off, fmt, name)
            })?;
        }
        op::READDIRPLUS => {
            let max = a.u32(16)? as usize;
            fs.readdirplus(ino, a.u64(8)?, |name, off, st, ttl| {
                let need = 128 + ((24 + name.len() + 7) & !7);
                if o.len + need > max || o.len + need > o.buf.len() {
                    return true;
                }
                let start = o.len;
                // Room was checked: neither write can fail.
                let fits = entry(&mut o, st, ttl, ttl).is_ok()
                    && dirent(&mut o, max, st.st_ino, off, st.st_mode, name);
                if !fits {
                    o.len = start;
                }
                !fits
            })?;
        }
        op::CREATE => {
            let name = names.next()?;
            let (st, opened) = fs.create(c, ino, name, a.u32(4)?, a.u32(0)? as i32)?;
            entry(&mut o, &st, entry_ttl, attr_ttl)?;
            open_out(&mut o, &opened)?;
        }
        op::FALLOCATE => {
            let (fh, off, length) = (a.u64(0)?, a.u64(8)?, a.u64(16)?);
            fs.fallocate(c, ino, fh, off, length, a.u32(24)? as i32)?;
        }
        op::LSEEK => {
            let r = fs.lseek(a.u64(0)?, a.u64(8)? as i64, a.u32(16)? as i32)?;
            o.u64(r as u64)?;
        }
        op::RELEASEDIR => {}
        op::DESTROY => fs.destroy(),
        // FLUSH and OPENDIR: ENOSYS on purpose (see fuse_dev.rs); the rest
        // (locks, ioctl, poll, copy_file_range, ...) are not implemented,
        // as on the /dev/fuse path.
        _ => return Err(io::Error::from_raw_os_error(libc::ENOSYS)),
    }
    Ok(o.len)
}

/// `struct fuse_attr_out` (104 bytes).
fn attr_out(o: &mut Out<'_>, st: &Stat, ttl: Duration) -> io::Result<()> {
    o.u64(ttl.as_secs())?;
    o.u32(ttl.subsec_nanos())?;
    o.u32(0)?;
    attr(o, st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_may_run_long_leave_sched_idle() {
        // Copy-up (OPEN, CREATE, SETATTR, RENAME, LINK), data, listings
        // and syncs must never run SCHED_IDLE: behind busy processes they
        // would get a fraction of a percent of a CPU.
        for opcode in [
            op::OPEN,
            op::CREATE,
            op::SETATTR,
            op::RENAME,
            op::RENAME2,
            op::LINK,
            op::READ,
            op::WRITE,
            op::READDIR,
            op::READDIRPLUS,
            op::FSYNC,
            op::FSYNCDIR,
            op::FALLOCATE,
            op::SETXATTR,
            op::UNLINK,
            op::RMDIR,
            op::MKDIR,
        ] {
            assert!(!is_light(opcode), "opcode {opcode} classed light");
        }
        assert!(is_light(op::LOOKUP) && is_light(op::GETATTR) && is_light(op::GETXATTR));
    }

    #[test]
    fn dirent_layout_and_padding() {
        let mut buf = vec![0xffu8; 64];
        let mut o = Out {
            buf: &mut buf,
            len: 0,
        };
        assert!(dirent(&mut o, 64, 7, 3, libc::S_IFDIR, OsStr::new("abc")));
        assert_eq!(o.len, 32); // 24 + 3, rounded up to 8
        assert_eq!(&buf[0..8], &7u64.to_ne_bytes());
        assert_eq!(&buf[8..16], &3u64.to_ne_bytes());
        assert_eq!(&buf[16..20], &3u32.to_ne_bytes());
        assert_eq!(&buf[20..24], &4u32.to_ne_bytes()); // DT_DIR
        assert_eq!(&buf[24..32], b"abc\0\0\0\0\0");
    }

    #[test]
    fn dirent_refuses_what_does_not_fit() {
        let mut buf = vec![0u8; 64];
        let mut o = Out {
            buf: &mut buf,
            len: 0,
        };
        assert!(!dirent(&mut o, 16, 1, 1, libc::S_IFREG, OsStr::new("x")));
        assert_eq!(o.len, 0);
    }

    #[test]
    fn names_need_their_nul() {
        let mut n = Names(b"a\0bc\0d");
        assert_eq!(n.next().unwrap(), "a");
        assert_eq!(n.next().unwrap(), "bc");
        assert!(n.next().is_err());
    }

    #[test]
    fn short_header_is_an_error_not_a_panic() {
        assert!(header(&[0u8; 20]).is_err());
        let mut h = vec![0u8; HEADER_SIZE];
        h[4..8].copy_from_slice(&op::LOOKUP.to_ne_bytes());
        h[8..16].copy_from_slice(&42u64.to_ne_bytes());
        h[ENT_IN_OUT + 8..ENT_IN_OUT + 16].copy_from_slice(&42u64.to_ne_bytes());
        let hd = header(&h).unwrap();
        assert_eq!((hd.opcode, hd.unique, hd.commit_id), (op::LOOKUP, 42, 42));
    }

    #[test]
    fn entry_is_128_bytes_and_attr_out_104() {
        let st = crate::sys::zeroed_stat();
        let mut buf = vec![0u8; 256];
        let mut o = Out {
            buf: &mut buf,
            len: 0,
        };
        entry(&mut o, &st, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(o.len, 128);
        o.len = 0;
        attr_out(&mut o, &st, Duration::from_secs(1)).unwrap();
        assert_eq!(o.len, 104);
    }
}
