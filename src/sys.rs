//! Every raw system call and every `unsafe` block of layerfs lives here.
//!
//! The wrappers are thin: they take directory descriptors and single path
//! components (never paths with `/`), so callers cannot accidentally follow a
//! symlink or `..` out of a layer. Each returns `io::Result`.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

pub use libc::stat as Stat;

pub mod uring;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_ssize(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `/proc/self/fd/N[/name]`: lets path-only calls (xattrs, chmod, utimes) act on
/// an `O_PATH` descriptor without re-resolving anything outside the layer.
fn proc_path(fd: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        if n.as_bytes().contains(&b'/') {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        p.push(b'/');
        p.extend_from_slice(n.as_bytes());
    }
    CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A single path component: refuses `/`, `.`, `..` and empty names.
pub fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if b.len() > 255 {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    Ok(())
}

pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid C string and descriptor; the returned fd is owned by us.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    check(fd)?;
    // SAFETY: fd was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory (absolute path, for layer roots) as an `O_PATH` descriptor.
pub fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopen an `O_PATH` descriptor with real access flags (through procfs, which
/// re-checks permissions against the object itself, not a path).
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_path(fd, None)?;
    // SAFETY: valid C string.
    let nfd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    check(nfd)?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Stat> {
    let c = cstr(name)?;
    let mut st = MaybeUninit::<Stat>::zeroed();
    // SAFETY: st is a valid out pointer.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::zeroed();
    // SAFETY: valid out pointer; AT_EMPTY_PATH stats the descriptor itself (works on O_PATH).
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: filled by the kernel.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string and descriptor.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string and descriptor.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            c.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })
    .map(drop)
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let t = cstr(target)?;
    let c = cstr(name)?;
    // SAFETY: valid C strings and descriptor.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf is writable for its length.
    let n = check_ssize(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, rmdir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string and descriptor.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;
pub const RENAME_WHITEOUT: u32 = libc::RENAME_WHITEOUT;

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let o = cstr(oldname)?;
    let n = cstr(newname)?;
    // SAFETY: valid C strings and descriptors.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn linkat(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
) -> io::Result<()> {
    let o = cstr(oldname)?;
    let n = cstr(newname)?;
    // SAFETY: valid C strings and descriptors; flags 0 = do not follow symlinks.
    check(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            o.as_ptr(),
            newdir.as_raw_fd(),
            n.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// Change owner without following a final symlink. `u32::MAX` leaves a field unchanged.
pub fn fchownat(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string and descriptor.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            c.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

fn fchmodat2(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, flags: libc::c_int) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string and descriptor.
    let r = unsafe {
        libc::syscall(
            nr::FCHMODAT2,
            dir.as_raw_fd(),
            c.as_ptr(),
            mode as libc::mode_t,
            flags,
        )
    };
    check(r as libc::c_int).map(drop)
}

/// chmod of the object an `O_PATH` descriptor refers to (no re-resolution
/// of a name, and never through a symlink in the layer): `fchmodat2` with
/// AT_EMPTY_PATH, else through its procfs path.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    with_fallback(
        &FCHMODAT2,
        || fchmodat2(fd, OsStr::new(""), mode, libc::AT_EMPTY_PATH),
        || {
            let p = proc_path(fd, None)?;
            // SAFETY: valid C string.
            check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
        },
    )
}

/// chmod of `name` in `dir`, never following a final symlink: one call
/// with `fchmodat2`, else open it `O_PATH` and go through procfs.
pub fn chmodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    with_fallback(
        &FCHMODAT2,
        || fchmodat2(dir, name, mode, libc::AT_SYMLINK_NOFOLLOW),
        || {
            let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
            let p = proc_path(fd.as_fd(), None)?;
            // SAFETY: valid C string.
            check(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
        },
    )
}

/// A time for `utimensat`: leave unchanged, set to now, or set to a value.
#[derive(Debug, Clone, Copy)]
pub enum TimeSpec {
    Omit,
    Now,
    At(i64, i64),
}

fn timespec_of(t: TimeSpec) -> libc::timespec {
    match t {
        TimeSpec::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        TimeSpec::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        TimeSpec::At(s, ns) => libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: ns as _,
        },
    }
}

/// Set access and modification times of `name` in `dir` (never following a final symlink).
pub fn utimensat(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    atime: TimeSpec,
    mtime: TimeSpec,
) -> io::Result<()> {
    let c = cstr(name)?;
    let times = [timespec_of(atime), timespec_of(mtime)];
    // SAFETY: valid C string; times points to 2 timespecs.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

/// Sets the calling thread's filesystem gid for the guard's lifetime, so new
/// objects get the caller's group (or the setgid directory's) from the
/// filesystem itself. Changing only the fsgid keeps every capability.
pub struct FsGid(u32);

impl FsGid {
    pub fn set(gid: u32) -> FsGid {
        // SAFETY: setfsgid affects only the calling thread (raw syscall, no
        // glibc broadcast to other threads).
        let prev = unsafe { libc::syscall(libc::SYS_setfsgid, gid) } as u32;
        FsGid(prev)
    }
}

impl Drop for FsGid {
    fn drop(&mut self) {
        // SAFETY: restores the previous fsgid of this thread.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, self.0);
        }
    }
}

/// System calls newer than the libc crate's tables. New calls have had one
/// number on every architecture since Linux 5.1 (x86_64, aarch64, s390x
/// alike); elsewhere the fast paths stay off.
mod nr {
    pub const FCHMODAT2: libc::c_long = 452;
    pub const SETXATTRAT: libc::c_long = 463;
    pub const GETXATTRAT: libc::c_long = 464;
    pub const LISTXATTRAT: libc::c_long = 465;
    pub const REMOVEXATTRAT: libc::c_long = 466;
}

const NEW_SYSCALLS: bool = cfg!(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "s390x"
));

/// `struct xattr_args` of the `*xattrat` calls (kernel ABI, native order).
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Cleared when the kernel lacks the `*xattrat` calls (Linux 6.13) or a
/// seccomp filter refuses them.
static XATTRAT: AtomicBool = AtomicBool::new(NEW_SYSCALLS);
/// Cleared when the kernel lacks `fchmodat2` (Linux 6.6).
static FCHMODAT2: AtomicBool = AtomicBool::new(NEW_SYSCALLS);

/// `fast` while `avail` holds, else `slow`. A fast call refused with ENOSYS
/// (not in this kernel) or EPERM (the usual seccomp answer, but also a real
/// refusal) is retried the slow way; `avail` is cleared unless both fail
/// alike, that is unless the EPERM was real.
fn with_fallback<T>(
    avail: &AtomicBool,
    fast: impl FnOnce() -> io::Result<T>,
    slow: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    if !avail.load(Ordering::Relaxed) {
        return slow();
    }
    match fast() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            let r = slow();
            if e.raw_os_error() == Some(libc::ENOSYS) || r.is_ok() {
                avail.store(false, Ordering::Relaxed);
            }
            r
        }
        r => r,
    }
}

/// Run an xattr call on `name` in `dir` (`dir` itself when None), never
/// following a final symlink: with `at(dirfd, name)` (`*xattrat`, one
/// lookup of one name) where the kernel has it, else with `by_path` on
/// `/proc/self/fd/N/name` (a procfs walk each time: 4.3 instead of 1.2 us).
fn xattr_call(
    dir: BorrowedFd<'_>,
    name: Option<&OsStr>,
    at: impl Fn(RawFd, *const libc::c_char) -> libc::c_long,
    by_path: impl Fn(*const libc::c_char) -> libc::ssize_t,
) -> io::Result<usize> {
    // "." (and "N/." in procfs) is the directory itself; a bare "N" would
    // name the procfs link, which l*xattr calls do not follow.
    let n = name.unwrap_or(OsStr::new("."));
    let by_path = || check_ssize(by_path(proc_path(dir, Some(n))?.as_ptr()));
    with_fallback(
        &XATTRAT,
        || {
            if n.as_bytes().contains(&b'/') {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let c = cstr(n)?;
            check_ssize(at(dir.as_raw_fd(), c.as_ptr()) as libc::ssize_t)
        },
        by_path,
    )
}

/// Extended attributes of `name` inside directory `dir` (or of `dir` itself
/// when `name` is None), never following a final symlink.
pub fn lgetxattr(dir: BorrowedFd<'_>, name: Option<&OsStr>, attr: &[u8]) -> io::Result<Vec<u8>> {
    let a = CString::new(attr).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let n = xattr_call(
            dir,
            name,
            |fd, c| {
                let mut args = XattrArgs {
                    value: ptr as u64,
                    size: len as u32,
                    flags: 0,
                };
                // SAFETY: valid strings, args and a buffer of `len` bytes
                // (zero-size query first, then the returned size).
                unsafe {
                    libc::syscall(
                        nr::GETXATTRAT,
                        fd,
                        c,
                        libc::AT_SYMLINK_NOFOLLOW,
                        a.as_ptr(),
                        &mut args as *mut XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                }
            },
            // SAFETY: as above.
            |p| unsafe { libc::lgetxattr(p, a.as_ptr(), ptr.cast(), len) },
        );
        match n {
            Ok(n) if buf.is_empty() && n > 0 => buf.resize(n, 0),
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Raced with a change that grew the value: ask again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => buf.clear(),
            Err(e) => return Err(e),
        }
    }
}

pub fn lsetxattr(
    dir: BorrowedFd<'_>,
    name: Option<&OsStr>,
    attr: &[u8],
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    let a = CString::new(attr).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    xattr_call(
        dir,
        name,
        |fd, c| {
            let args = XattrArgs {
                value: value.as_ptr() as u64,
                size: value.len() as u32,
                flags: flags as u32,
            };
            // SAFETY: valid strings, args and value buffer.
            unsafe {
                libc::syscall(
                    nr::SETXATTRAT,
                    fd,
                    c,
                    libc::AT_SYMLINK_NOFOLLOW,
                    a.as_ptr(),
                    &args as *const XattrArgs,
                    std::mem::size_of::<XattrArgs>(),
                )
            }
        },
        // SAFETY: valid strings and value buffer.
        |p| unsafe {
            libc::lsetxattr(p, a.as_ptr(), value.as_ptr().cast(), value.len(), flags) as isize
        },
    )
    .map(drop)
}

pub fn lremovexattr(dir: BorrowedFd<'_>, name: Option<&OsStr>, attr: &[u8]) -> io::Result<()> {
    let a = CString::new(attr).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    xattr_call(
        dir,
        name,
        // SAFETY: valid strings.
        |fd, c| unsafe {
            libc::syscall(
                nr::REMOVEXATTRAT,
                fd,
                c,
                libc::AT_SYMLINK_NOFOLLOW,
                a.as_ptr(),
            )
        },
        // SAFETY: valid strings.
        |p| unsafe { libc::lremovexattr(p, a.as_ptr()) as isize },
    )
    .map(drop)
}

/// List of xattr names (NUL-separated as the kernel returns them, split here).
pub fn llistxattr(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<Vec<Vec<u8>>> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        let n = xattr_call(
            dir,
            name,
            // SAFETY: zero-size query, then a buffer of the returned size.
            |fd, c| unsafe {
                libc::syscall(nr::LISTXATTRAT, fd, c, libc::AT_SYMLINK_NOFOLLOW, ptr, len)
            },
            // SAFETY: as above.
            |p| unsafe { libc::llistxattr(p, ptr.cast(), len) },
        );
        match n {
            Ok(n) if buf.is_empty() && n > 0 => buf.resize(n, 0),
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.to_vec())
                    .collect());
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => buf.clear(),
            Err(e) => return Err(e),
        }
    }
}

/// One entry read from a directory descriptor.
pub struct DirEntry {
    pub ino: u64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// Read all entries of a directory (without `.` and `..`).
pub fn read_dir_all(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let fd = openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    read_dir_fd(fd.as_fd())
}

pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE as _, src.as_raw_fd()) }).map(drop)
}

pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let mut so = src_off as libc::loff_t;
    let mut d = dst_off as libc::loff_t;
    // SAFETY: offsets are valid pointers; descriptors are open.
    check_ssize(unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, len, 0)
    } as libc::ssize_t)
}

pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: buf is writable for its length.
    check_ssize(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as i64,
        )
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: buf is readable for its length.
    check_ssize(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) })
}

/// `write` at the current offset (for O_APPEND descriptors, where the kernel picks the offset).
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is readable for its length.
    check_ssize(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid out pointer.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: filled by the kernel.
    Ok(unsafe { st.assume_init() })
}

/// Give the calling thread its own umask and cwd (so one request's umask
/// never leaks into another thread's create).
pub fn unshare_fs() -> io::Result<()> {
    // SAFETY: affects only the calling thread's fs struct.
    check(unsafe { libc::unshare(libc::CLONE_FS) }).map(drop)
}

pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// Supplementary groups of a process, from /proc (FUSE requests carry only uid/gid).
pub fn process_groups(pid: u32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Detach a mount point (used to clear a dead FUSE mount left by a killed daemon).
pub fn umount_detach(path: &std::path::Path) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: valid C string.
    check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

/// Fork, returning the child's pid in the parent and 0 in the child.
/// Must be called while the process is single-threaded.
pub fn fork() -> io::Result<i32> {
    // SAFETY: called before any thread is started (see mount::daemonize).
    let pid = unsafe { libc::fork() };
    check(pid)
}

pub fn setsid() {
    // SAFETY: no memory involved; failure (already a leader) is harmless.
    unsafe {
        libc::setsid();
    }
}

pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid 2-element array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Point stdin/stdout/stderr at /dev/null (daemon mode).
pub fn redirect_stdio_to_null() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors.
        check(unsafe { libc::dup2(null.as_fd().as_raw_fd(), target) })?;
    }
    Ok(())
}

pub fn geteuid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::geteuid() }
}

pub fn getpid() -> u32 {
    // SAFETY: always succeeds.
    unsafe { libc::getpid() as u32 }
}

pub fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// Block SIGTERM, SIGINT and SIGHUP in this thread and every thread started
/// after it, so that one dedicated thread can wait for them with `wait_signal`.
pub fn block_term_signals() -> io::Result<()> {
    let set = term_sigset();
    // SAFETY: set is a valid, initialised signal set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn term_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigemptyset/sigaddset initialise the set in place.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP);
        set.assume_init()
    }
}

/// Wait for one of the blocked termination signals; returns its number.
pub fn wait_signal() -> i32 {
    let set = term_sigset();
    let mut sig: libc::c_int = 0;
    // SAFETY: valid set and out pointer.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
    sig
}

/// errno of statfs(path), if it fails. statfs always reaches the filesystem
/// (stat may be answered from the attribute cache), so a dead FUSE mount
/// reliably answers ENOTCONN here.
pub fn statfs_errno(path: &std::path::Path) -> Option<i32> {
    let c = cstr(path.as_os_str()).ok()?;
    let mut st = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid C string and out pointer.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if r < 0 {
        io::Error::last_os_error().raw_os_error()
    } else {
        None
    }
}

/// An all-zero `stat` (for replies that carry no real object).
pub fn zeroed_stat() -> Stat {
    // SAFETY: `stat` is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Start writeback of a range without waiting (so a later fsync has less to wait for).
pub fn start_writeback(fd: BorrowedFd<'_>, off: u64, len: u64) {
    // SAFETY: plain syscall on an open descriptor; failure only loses the hint.
    unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            off as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// Set times on an open (non-O_PATH) descriptor.
pub fn futimens(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let times = [timespec_of(atime), timespec_of(mtime)];
    // SAFETY: times points to 2 timespecs; a null path means the descriptor itself.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// Read all entries (without `.` and `..`) from an already open directory
/// descriptor, from its current position. Unlike `read_dir_all` this keeps
/// the caller's open flags (checkpoint capture lists with `O_NOATIME`, so
/// taking a checkpoint does not change the directories it records).
pub fn read_dir_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    // One buffer per thread: zeroing 64 KiB for every listing showed in
    // tree-walk profiles.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.is_empty() {
            buf.resize(64 * 1024, 0);
        }
        read_dir_into(fd, &mut buf)
    })
}

fn read_dir_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Vec<DirEntry>> {
    let mut out = Vec::new();
    loop {
        // SAFETY: buf is writable for its length; getdents64 fills whole records.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0usize;
        while off + 19 <= n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name...
            let rec = &buf[off..n as usize];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            if reclen < 19 || reclen > rec.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let name_bytes = &rec[19..reclen];
            let nlen = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            let name = &name_bytes[..nlen];
            if name != b"." && name != b".." {
                out.push(DirEntry {
                    ino,
                    dtype: rec[18],
                    name: name.to_vec(),
                });
            }
            off += reclen;
        }
    }
}

/// SO_PEERCRED of a connected Unix socket: (pid, uid, gid) of the peer as
/// they were when it connected (the kernel records them; the peer cannot lie).
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid out pointers; len holds cred's size.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// SO_PEERGROUPS (Linux >= 4.13): the supplementary groups of the peer of a
/// connected Unix socket at connect time (SO_PEERCRED only has the primary gid).
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: groups has room for len bytes; len is updated by the kernel.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: len now holds the size needed.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 65536 {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// shutdown(2) a socket descriptor. On a listening Unix socket this wakes a
/// thread blocked in accept(2) (it fails with EINVAL), which is how a server
/// thread is stopped without a self-connection.
pub fn shutdown_socket(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) }).map(drop)
}

/// The listening socket systemd passed as descriptor `fd` (socket activation,
/// `LISTEN_FDS`): checked to be a listening Unix stream socket and returned as
/// a close-on-exec duplicate that the caller owns; the inherited descriptor is
/// left open (nothing else owns it, so it is never closed twice).
pub fn inherited_unix_listener(fd: RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    // SAFETY: fcntl on any integer; fails with EBADF if it is not open.
    let dup = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: dup is a descriptor fcntl just created; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    let opt = |name: libc::c_int| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: v and len are valid out pointers of the sizes given.
        check(unsafe {
            libc::getsockopt(
                owned.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok(v)
    };
    let ok = opt(libc::SO_DOMAIN)? == libc::AF_UNIX
        && opt(libc::SO_TYPE)? == libc::SOCK_STREAM
        && opt(libc::SO_ACCEPTCONN)? == 1;
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a listening Unix stream socket"),
        ));
    }
    Ok(std::os::unix::net::UnixListener::from(owned))
}

/// `struct fuse_backing_map` of `FUSE_DEV_IOC_BACKING_OPEN`.
#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

// _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, u32): the generic
// ioctl encoding, the same on x86_64 and s390x.
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_e501;
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// Register `file` as a passthrough backing file on the FUSE connection
/// `dev`; returns the kernel's backing id.
pub fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<u32> {
    let map = BackingMap {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads `map`, which outlives the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN as _, &map) };
    check(r).map(|id| id as u32)
}

pub fn backing_close(dev: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    // SAFETY: the ioctl reads one u32, which outlives the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id) };
    check(r).map(|_| ())
}

/// Scheduling policies layerfs's own threads use (see `set_sched_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedPolicy {
    Other,
    /// Never preempts on wake-up: background writers.
    Batch,
    /// Runs only when nothing else wants the CPU.
    Idle,
}

/// Set the calling thread's scheduling policy (nice value unchanged).
pub fn set_sched_policy(p: SchedPolicy) -> io::Result<()> {
    let policy = match p {
        SchedPolicy::Other => libc::SCHED_OTHER,
        SchedPolicy::Batch => libc::SCHED_BATCH,
        SchedPolicy::Idle => libc::SCHED_IDLE,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    check(unsafe { libc::sched_setscheduler(0, policy, &param) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways (`*xattrat`/`fchmodat2`, and the procfs fallback of older
    /// kernels) give the same answers; neither follows a final symlink.
    #[test]
    fn xattr_and_chmod_calls_agree_with_their_fallbacks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("f"), b"x").expect("write");
        std::os::unix::fs::symlink("f", tmp.path().join("l")).expect("symlink");
        let c = CString::new(tmp.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: valid C string.
        let raw = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
        // SAFETY: fresh descriptor.
        let dir = unsafe { OwnedFd::from_raw_fd(check(raw).expect("open")) };
        let d = dir.as_fd();
        let (f, l) = (Some(OsStr::new("f")), Some(OsStr::new("l")));
        // Which fast paths this kernel has (qemu-user, for one, has neither).
        let _ = lgetxattr(d, f, b"user.t");
        let _ = chmodat(d, OsStr::new("f"), 0o644);
        let have = (
            XATTRAT.load(Ordering::Relaxed),
            FCHMODAT2.load(Ordering::Relaxed),
        );
        for fast in [true, false] {
            XATTRAT.store(fast && have.0, Ordering::Relaxed);
            FCHMODAT2.store(fast && have.1, Ordering::Relaxed);
            let v: &[u8] = if fast { b"fast" } else { b"slow" };
            lsetxattr(d, f, b"user.t", v, 0).expect("set on the file");
            assert_eq!(lgetxattr(d, f, b"user.t").expect("get"), v);
            assert!(llistxattr(d, f)
                .expect("list")
                .contains(&b"user.t".to_vec()));
            // The symlink itself has no such attribute (not followed).
            let e = lgetxattr(d, l, b"user.t").expect_err("symlink followed");
            assert_eq!(e.raw_os_error(), Some(libc::ENODATA));
            lsetxattr(d, None, b"user.d", v, 0).expect("set on the directory");
            assert_eq!(lgetxattr(d, None, b"user.d").expect("get dir"), v);
            lremovexattr(d, None, b"user.d").expect("remove dir");
            lremovexattr(d, f, b"user.t").expect("remove");
            let e = lgetxattr(d, f, b"user.t").expect_err("still there");
            assert_eq!(e.raw_os_error(), Some(libc::ENODATA));
            assert!(lgetxattr(d, Some(OsStr::new("a/b")), b"user.t").is_err());

            chmodat(d, OsStr::new("f"), 0o640).expect("chmodat");
            assert_eq!(
                fstatat(d, OsStr::new("f")).expect("stat").st_mode & 0o7777,
                0o640
            );
            let fd = openat(d, OsStr::new("f"), libc::O_PATH | libc::O_NOFOLLOW, 0).expect("open");
            chmod_fd(fd.as_fd(), 0o604).expect("chmod_fd");
            assert_eq!(
                fstatat(d, OsStr::new("f")).expect("stat").st_mode & 0o7777,
                0o604
            );
            // chmod of a symlink by name: refused, the target untouched.
            assert!(chmodat(d, OsStr::new("l"), 0o600).is_err());
            assert_eq!(
                fstatat(d, OsStr::new("f")).expect("stat").st_mode & 0o7777,
                0o604
            );
            // A fast path in use stays in use: real errors (ENODATA, a
            // refused chmod of a symlink) did not switch it off.
            assert_eq!(XATTRAT.load(Ordering::Relaxed), fast && have.0);
            assert_eq!(FCHMODAT2.load(Ordering::Relaxed), fast && have.1);
        }
        XATTRAT.store(have.0, Ordering::Relaxed);
        FCHMODAT2.store(have.1, Ordering::Relaxed);
    }
}
