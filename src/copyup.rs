//! Copy-up: bring a lower object into the upper layer before it changes.
//!
//! The copy is built in `workdir/work` under a scratch name (data, owner,
//! mode, xattrs, times, in that order, because chown clears setuid bits and
//! writing data moves mtime), fsynced, then renamed into place: a crash
//! leaves either no upper object or the whole new one. Leftovers in workdir
//! are removed at the next mount.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use tracing::{debug, warn};

use crate::inode::{Node, ROOT_INO};
use crate::layers::split_last;
use crate::sys::{self, Stat};
use crate::union::{errno, fmt_of, Union};
use crate::whiteout;

/// Make sure `node` exists in the upper layer. `with_data = false` creates an
/// empty regular file (the caller is about to truncate it to zero anyway).
pub fn copy_up(u: &Union, node: &Node, with_data: bool) -> io::Result<()> {
    u.check_writable()?;
    if node.state.read().upper {
        return Ok(());
    }
    // Parents first, so the rename below has somewhere to land.
    let parent = node.state.read().parent;
    if node.ino != ROOT_INO {
        let p = u.node(parent)?;
        copy_up(u, &p, true)?;
    }
    let _g = u.lock_ino(node.ino);
    let st = node.state.read().clone();
    if st.upper {
        return Ok(());
    }
    if st.unlinked {
        return Err(errno(libc::ENOENT));
    }
    let pnode = u.node(st.parent)?;
    let pfd = u.upper_dir_fd(&pnode)?;
    let work = u.layers.work()?;
    let tmp = u.tmp_name();

    let (src_dir, src_name) = if node.is_dir() {
        let l = st.lower_dirs.first().ok_or_else(|| errno(libc::ENOENT))?;
        let (pp, base) = split_last(&l.path);
        (u.layers.lower_dir(l.layer, pp)?, base.to_vec())
    } else {
        let l = st.lower.as_ref().ok_or_else(|| errno(libc::ENOENT))?;
        let (pp, base) = split_last(&l.path);
        (u.layers.lower_dir(l.layer, pp)?, base.to_vec())
    };
    let src_name = OsStr::from_bytes(&src_name);
    let sst = sys::fstatat(src_dir.as_fd(), src_name)?;

    let built = build_copy(
        src_dir.as_fd(),
        src_name,
        &sst,
        work,
        &tmp,
        with_data && !node.is_dir(),
        !u.volatile,
    );
    let result = built.and_then(|()| {
        if !node.is_dir() && sst.st_nlink <= 1 {
            // Keep the inode number the file had in the union. Not for a file
            // with other names in its lower layer: those names keep showing
            // the lower file, and two different files must never share a
            // number (tar and rsync would take one for a link to the other).
            whiteout::set_origin(work, &tmp, node.ino)?;
        }
        sys::renameat2(work, &tmp, pfd.as_fd(), &st.name, sys::RENAME_NOREPLACE)
    });
    if let Err(e) = result {
        let _ = crate::layers::remove_tree(work, &tmp);
        warn!(ino = node.ino, name = ?st.name, err = %e, "copy-up failed");
        return Err(e);
    }
    if !node.is_dir() {
        mark_impure(u, &pnode)?;
    }
    node.state.write().upper = true;
    debug!(ino = node.ino, name = ?st.name, "copied up");
    Ok(())
}

/// Record on a directory that it holds entries with foreign inode numbers, so
/// listings know to look for them (kernel overlayfs does the same).
pub fn mark_impure(u: &Union, dir: &Node) -> io::Result<()> {
    if dir.state.read().impure {
        return Ok(());
    }
    let fd = u.upper_dir_fd(dir)?;
    whiteout::set_impure(fd.as_fd())?;
    dir.state.write().impure = true;
    Ok(())
}

fn build_copy(
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    sst: &Stat,
    work: BorrowedFd<'_>,
    tmp: &OsStr,
    with_data: bool,
    sync: bool,
) -> io::Result<()> {
    let fmt = fmt_of(sst);
    let perm = sst.st_mode & 0o7777;
    match fmt {
        libc::S_IFREG => {
            let dst = sys::openat(
                work,
                tmp,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                0o600,
            )?;
            if with_data && sst.st_size > 0 {
                let src = sys::openat(
                    src_dir,
                    src_name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NOATIME,
                    0,
                )
                .or_else(|_| {
                    sys::openat(src_dir, src_name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                })?;
                copy_data(src.as_fd(), dst.as_fd(), sst.st_size as u64, sync)?;
                if sync {
                    sys::fsync(dst.as_fd(), false)?;
                }
            }
        }
        libc::S_IFDIR => sys::mkdirat(work, tmp, 0o700)?,
        libc::S_IFLNK => {
            let target = sys::readlinkat(src_dir, src_name)?;
            sys::symlinkat(OsStr::from_bytes(&target), work, tmp)?;
        }
        _ => {
            sys::mknodat(work, tmp, fmt | 0o600, sst.st_rdev)?;
            if whiteout::looks_like_whiteout(sst) {
                whiteout::mark_chardev(work, tmp)?;
            }
        }
    }
    sys::fchownat(work, tmp, sst.st_uid, sst.st_gid)?;
    copy_xattrs(src_dir, src_name, work, tmp)?;
    if fmt != libc::S_IFLNK {
        sys::chmodat(work, tmp, perm)?;
    }
    sys::utimensat(
        work,
        tmp,
        sys::TimeSpec::At(sst.st_atime, sst.st_atime_nsec),
        sys::TimeSpec::At(sst.st_mtime, sst.st_mtime_nsec),
    )?;
    Ok(())
}

/// Copy all user-visible xattrs (POSIX ACLs included). Private overlay
/// attributes of the source are not carried over.
pub fn copy_xattrs(
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
) -> io::Result<()> {
    let names = match sys::llistxattr(src_dir, Some(src_name)) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(e),
    };
    for n in names {
        if whiteout::is_private_xattr(&n) {
            continue;
        }
        let v = match sys::lgetxattr(src_dir, Some(src_name), &n) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = sys::lsetxattr(dst_dir, Some(dst_name), &n, &v, 0) {
            // security.* labels may be refused by an LSM on the upper; the
            // data is still right, so keep going and say so.
            if n.starts_with(b"security.")
                && matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOTSUP))
            {
                warn!(attr = %String::from_utf8_lossy(&n), err = %e, "xattr not copied up");
                continue;
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Copy file data: reflink when the filesystems allow it, else
/// copy_file_range over data extents only (holes stay holes), else read/write.
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    size: u64,
    sync: bool,
) -> io::Result<()> {
    if sys::ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut off: u64 = 0;
    while off < size {
        let data = match sys::lseek(src, off as i64, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole is left
            Err(_) => off, // SEEK_DATA unsupported: treat everything as data
        };
        let hole = sys::lseek(src, data as i64, libc::SEEK_HOLE)
            .map(|h| h as u64)
            .unwrap_or(size)
            .min(size);
        copy_range(src, dst, data, hole - data, sync)?;
        off = hole;
    }
    // Extends the file over a trailing hole.
    sys::ftruncate(dst, size)
}

fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut off: u64,
    mut len: u64,
    sync: bool,
) -> io::Result<()> {
    let mut use_cfr = true;
    let mut buf = Vec::new();
    while len > 0 {
        // 64 MiB at a time, starting writeback of each chunk as it is done:
        // the final fsync then waits for little more than the last chunk.
        let chunk = len.min(64 << 20) as usize;
        if use_cfr {
            match sys::copy_file_range(src, off, dst, off, chunk) {
                Ok(0) => return Ok(()), // source shrank; nothing more to copy
                Ok(n) => {
                    if sync {
                        sys::start_writeback(dst, off, n as u64);
                    }
                    off += n as u64;
                    len -= n as u64;
                    continue;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV)
                            | Some(libc::EINVAL)
                            | Some(libc::ENOSYS)
                            | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    use_cfr = false;
                    buf = vec![0u8; 1 << 20];
                }
                Err(e) => return Err(e),
            }
        }
        let want = (len as usize).min(buf.len());
        let n = sys::pread(src, &mut buf[..want], off)?;
        if n == 0 {
            return Ok(());
        }
        let mut w = 0;
        while w < n {
            w += sys::pwrite(dst, &buf[w..n], off + w as u64)?;
        }
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}
