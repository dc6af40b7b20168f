//! The on-disk format of the upper layer: kernel overlayfs's own, so an upper
//! written by layerfs mounts with kernel overlayfs and the other way round.
//!
//! - whiteout: a character device 0/0
//! - opaque directory: `trusted.overlay.opaque = "y"`
//! - renamed directory: `trusted.overlay.redirect = "/abs/lower/path"`
//! - `trusted.overlay.impure = "y"` on an upper directory holding entries
//!   whose inode numbers come from elsewhere (copied-up files, moved directories)
//!
//! layerfs adds one private attribute, `trusted.layerfs.origin`, holding the
//! inode number a copied-up file had in the union before copy-up, so `st_ino`
//! stays stable for the file's life. Format (versioned, big-endian):
//! `[version = 1][u64 inode number, big-endian]`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;

use crate::sys;

pub const XATTR_OPAQUE: &[u8] = b"trusted.overlay.opaque";
pub const XATTR_REDIRECT: &[u8] = b"trusted.overlay.redirect";
pub const XATTR_IMPURE: &[u8] = b"trusted.overlay.impure";
pub const XATTR_ORIGIN: &[u8] = b"trusted.layerfs.origin";

const ORIGIN_VERSION: u8 = 1;

/// Private attributes hidden from users of the union.
pub fn is_private_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"trusted.layerfs.")
}

/// Marks a real character device 0/0 (which would otherwise read as a
/// whiteout). Kernel overlayfs cannot show such a device at all and treats
/// it as a whiteout; layerfs keeps it as the device the user created.
pub const XATTR_CHARDEV: &[u8] = b"trusted.layerfs.chardev";

/// Is `name` in `dir` (with stat `st`) a whiteout? One getxattr, only for 0/0 devices.
pub fn is_whiteout(dir: BorrowedFd<'_>, name: &OsStr, st: &sys::Stat) -> bool {
    looks_like_whiteout(st) && sys::lgetxattr(dir, Some(name), XATTR_CHARDEV).is_err()
}

pub fn looks_like_whiteout(st: &sys::Stat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == 0
}

pub fn mark_chardev(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    sys::lsetxattr(dir, Some(name), XATTR_CHARDEV, b"y", 0)
}

pub fn make_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    sys::mknodat(dir, name, libc::S_IFCHR, sys::makedev(0, 0))
}

fn is_yes(v: &[u8]) -> bool {
    v == b"y"
}

/// The overlay attributes of one upper directory, read with as few calls as
/// possible (one listxattr; a getxattr only for what is present).
#[derive(Debug, Default, Clone)]
pub struct DirMarks {
    pub opaque: bool,
    pub impure: bool,
    /// Absolute lower path this directory was renamed from, if any (without the leading '/').
    pub redirect: Option<Vec<u8>>,
}

pub fn read_dir_marks(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<DirMarks> {
    let mut m = DirMarks::default();
    let names = match sys::llistxattr(dir, name) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(m),
        Err(e) => return Err(e),
    };
    for n in names {
        if !n.starts_with(b"trusted.overlay.") {
            continue;
        }
        let get = || sys::lgetxattr(dir, name, &n).unwrap_or_default();
        match n.as_slice() {
            XATTR_OPAQUE => m.opaque = is_yes(&get()),
            XATTR_IMPURE => m.impure = is_yes(&get()),
            XATTR_REDIRECT => m.redirect = Some(get()),
            _ => {}
        }
    }
    Ok(m)
}

/// Resolve a redirect value to a lower path relative to the layer roots.
/// Absolute values ("/a/b") are taken from the root; relative ones name a
/// sibling in `parent_lower` (the kernel writes both forms).
/// Components `.`/`..`/empty are refused: a redirect never leaves a layer.
pub fn resolve_redirect(value: &[u8], parent_lower: &[u8]) -> Option<Vec<u8>> {
    let (base, rest): (Vec<u8>, &[u8]) = if let Some(abs) = value.strip_prefix(b"/") {
        (Vec::new(), abs)
    } else {
        (parent_lower.to_vec(), value)
    };
    let mut out = base;
    for comp in rest.split(|b| *b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return None;
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(comp);
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

pub fn set_opaque(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<()> {
    sys::lsetxattr(dir, name, XATTR_OPAQUE, b"y", 0)
}

pub fn set_impure(dir: BorrowedFd<'_>) -> io::Result<()> {
    sys::lsetxattr(dir, None, XATTR_IMPURE, b"y", 0)
}

/// Write an absolute redirect (the form kernel overlayfs accepts from any parent).
pub fn set_redirect(
    dir: BorrowedFd<'_>,
    name: Option<&OsStr>,
    lower_path: &[u8],
) -> io::Result<()> {
    let mut v = Vec::with_capacity(lower_path.len() + 1);
    v.push(b'/');
    v.extend_from_slice(lower_path);
    sys::lsetxattr(dir, name, XATTR_REDIRECT, &v, 0)
}

pub fn encode_origin(ino: u64) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0] = ORIGIN_VERSION;
    b[1..].copy_from_slice(&ino.to_be_bytes());
    b
}

pub fn decode_origin(v: &[u8]) -> Option<u64> {
    if v.len() == 9 && v[0] == ORIGIN_VERSION {
        Some(u64::from_be_bytes(v[1..].try_into().ok()?))
    } else {
        None
    }
}

pub fn read_origin(dir: BorrowedFd<'_>, name: &OsStr) -> Option<u64> {
    sys::lgetxattr(dir, Some(name), XATTR_ORIGIN)
        .ok()
        .and_then(|v| decode_origin(&v))
}

pub fn set_origin(dir: BorrowedFd<'_>, name: &OsStr, ino: u64) -> io::Result<()> {
    sys::lsetxattr(dir, Some(name), XATTR_ORIGIN, &encode_origin(ino), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_known_answer() {
        // Big-endian regardless of host: this must read the same on s390x.
        assert_eq!(
            encode_origin(0x0102_0304_0506_0708),
            [1, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(decode_origin(&[1, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(decode_origin(&[2, 0, 0, 0, 0, 0, 0, 1, 0]), None);
        assert_eq!(decode_origin(&[1, 0]), None);
    }

    #[test]
    fn redirects_stay_inside() {
        assert_eq!(resolve_redirect(b"/a/b", b"x"), Some(b"a/b".to_vec()));
        assert_eq!(resolve_redirect(b"c", b"x/y"), Some(b"x/y/c".to_vec()));
        assert_eq!(resolve_redirect(b"c", b""), Some(b"c".to_vec()));
        assert_eq!(resolve_redirect(b"/a/../../etc", b""), None);
        assert_eq!(resolve_redirect(b"..", b"x"), None);
        assert_eq!(resolve_redirect(b"/", b""), None);
    }
}
