//! Attribute changes (chmod, chown, truncate, utimes) and extended
//! attributes. Every change copies the object up first; the overlay's own
//! private attributes are invisible and cannot be set through the union.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::copyup::copy_up;
use crate::files::clear_suid;
use crate::inode::Node;
use crate::sys::{self, Stat, TimeSpec};
use crate::union::{errno, Ctx, Union};
use crate::whiteout;

#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
}

pub fn setattr(
    u: &Union,
    ctx: &Ctx,
    node: &Node,
    open_fd: Option<&OwnedFd>,
    a: SetAttr,
) -> io::Result<Stat> {
    u.check_writable()?;
    copy_up(u, node, a.size != Some(0))?;
    // Through the open (upper) descriptor when the caller gave one: fewer
    // calls, and it works for a file that is open but no longer has a name.
    let loc = match open_fd {
        Some(_) => None,
        None => Some(u.loc(node)?),
    };
    if let Some(size) = a.size {
        if node.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        let owned;
        let f = match (open_fd, &loc) {
            (Some(f), _) => f,
            (None, Some(l)) => {
                owned = sys::openat(
                    l.dir.as_fd(),
                    &l.name,
                    libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                    0,
                )?;
                &owned
            }
            (None, None) => return Err(errno(libc::ENOENT)),
        };
        sys::ftruncate(f.as_fd(), size)?;
        if ctx.uid != 0 {
            let st = sys::fstat(f.as_fd())?;
            if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                clear_suid(f, st.st_mode)?;
            }
        }
    }
    if a.uid.is_some() || a.gid.is_some() {
        let (uid, gid) = (a.uid.unwrap_or(u32::MAX), a.gid.unwrap_or(u32::MAX));
        match (open_fd, &loc) {
            (Some(f), _) => sys::fchown(f.as_fd(), uid, gid)?,
            (None, Some(l)) => sys::fchownat(l.dir.as_fd(), &l.name, uid, gid)?,
            (None, None) => return Err(errno(libc::ENOENT)),
        }
    }
    if let Some(mode) = a.mode {
        if node.fmt == libc::S_IFLNK {
            return Err(errno(libc::EOPNOTSUPP));
        }
        match (open_fd, &loc) {
            (Some(f), _) => sys::fchmod(f.as_fd(), mode & 0o7777)?,
            (None, Some(l)) => {
                let fd = sys::openat(l.dir.as_fd(), &l.name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                sys::chmod_fd(fd.as_fd(), mode & 0o7777)?;
            }
            (None, None) => return Err(errno(libc::ENOENT)),
        }
    }
    if a.atime.is_some() || a.mtime.is_some() {
        let (at, mt) = (
            a.atime.unwrap_or(TimeSpec::Omit),
            a.mtime.unwrap_or(TimeSpec::Omit),
        );
        match (open_fd, &loc) {
            (Some(f), _) => sys::futimens(f.as_fd(), at, mt)?,
            (None, Some(l)) => sys::utimensat(l.dir.as_fd(), &l.name, at, mt)?,
            (None, None) => return Err(errno(libc::ENOENT)),
        }
    }
    let mut st = match (open_fd, &loc) {
        (Some(f), _) => sys::fstat(f.as_fd())?,
        (None, Some(l)) => sys::fstatat(l.dir.as_fd(), &l.name)?,
        (None, None) => return Err(errno(libc::ENOENT)),
    };
    st.st_ino = node.ino;
    Ok(st)
}

pub fn getxattr(u: &Union, node: &Node, name: &[u8]) -> io::Result<Vec<u8>> {
    if whiteout::is_private_xattr(name) {
        return Err(errno(libc::ENODATA));
    }
    let loc = u.loc(node)?;
    sys::lgetxattr(loc.dir.as_fd(), Some(&loc.name), name)
}

/// Names, NUL-terminated each, private ones left out.
pub fn listxattr(u: &Union, node: &Node) -> io::Result<Vec<u8>> {
    let loc = u.loc(node)?;
    let mut out = Vec::new();
    for n in sys::llistxattr(loc.dir.as_fd(), Some(&loc.name))? {
        if !whiteout::is_private_xattr(&n) {
            out.extend_from_slice(&n);
            out.push(0);
        }
    }
    Ok(out)
}

pub fn setxattr(u: &Union, node: &Node, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    u.check_writable()?;
    if whiteout::is_private_xattr(name) {
        return Err(errno(libc::EPERM));
    }
    copy_up(u, node, true)?;
    let loc = u.loc(node)?;
    sys::lsetxattr(loc.dir.as_fd(), Some(&loc.name), name, value, flags)
}

pub fn removexattr(u: &Union, node: &Node, name: &[u8]) -> io::Result<()> {
    u.check_writable()?;
    if whiteout::is_private_xattr(name) {
        return Err(errno(libc::ENODATA));
    }
    // Nothing to remove: answer without copying up.
    getxattr(u, node, name)?;
    copy_up(u, node, true)?;
    let loc = u.loc(node)?;
    sys::lremovexattr(loc.dir.as_fd(), Some(&loc.name), name)
}
