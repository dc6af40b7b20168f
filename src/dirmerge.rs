//! Merged directory listings: upper entries, then each lower directory in
//! order, hiding whiteouts and names already seen, stopping at opaque
//! directories. Inode numbers are the same ones `lookup` gives (readdir and
//! stat agree): derived from the entry's own layer, and probed the way lookup
//! does only where the cheap rule could be wrong (directories in a merged
//! parent, files in an impure one).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use crate::inode::{make_ino, Node};
use crate::sys;
use crate::union::{fmt_of, Union};
use crate::whiteout;

#[derive(Debug, Clone)]
pub struct DirEnt {
    pub name: OsString,
    pub ino: u64,
    /// `S_IFMT` bits.
    pub fmt: u32,
}

fn dtype_fmt(d: u8) -> Option<u32> {
    Some(match d {
        libc::DT_REG => libc::S_IFREG,
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_CHR => libc::S_IFCHR,
        libc::DT_BLK => libc::S_IFBLK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        _ => return None,
    })
}

/// List the union directory `node` (without "." and "..").
pub fn list(u: &Union, node: &Node) -> io::Result<Vec<DirEnt>> {
    let st = node.state.read().clone();
    let mut out = Vec::new();
    let mut seen: HashSet<OsString> = HashSet::new();
    let merged = !st.lower_dirs.is_empty();
    let pure = !merged && !st.impure;

    if st.upper {
        let dfd = u.upper_dir_fd(node)?;
        for e in sys::read_dir_all(dfd.as_fd())? {
            let name = OsStr::from_bytes(&e.name).to_os_string();
            let fmt = match dtype_fmt(e.dtype) {
                Some(f) if f != libc::S_IFCHR => f,
                _ => match sys::fstatat(dfd.as_fd(), &name) {
                    Ok(s) if whiteout::is_whiteout(dfd.as_fd(), &name, &s) => {
                        seen.insert(name);
                        continue;
                    }
                    Ok(s) => fmt_of(&s),
                    Err(_) => continue, // raced with removal
                },
            };
            let ino = if pure || (fmt != libc::S_IFDIR && !st.impure) {
                make_ino(0, e.ino)
            } else {
                // Directories may take a lower number or carry a redirect;
                // files in impure directories may carry an origin.
                match u.probe(node, &st, &name) {
                    Ok(Some(p)) => p.ino,
                    _ => make_ino(0, e.ino),
                }
            };
            seen.insert(name.clone());
            out.push(DirEnt { name, ino, fmt });
        }
    }

    for l in &st.lower_dirs {
        let dfd = match u.layers.lower_dir(l.layer, &l.path) {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                continue
            }
            Err(e) => return Err(e),
        };
        for e in sys::read_dir_all(dfd.as_fd())? {
            let name = OsStr::from_bytes(&e.name);
            if seen.contains(name) {
                continue;
            }
            let name = name.to_os_string();
            let fmt = match dtype_fmt(e.dtype) {
                Some(f) if f != libc::S_IFCHR => f,
                _ => match sys::fstatat(dfd.as_fd(), &name) {
                    Ok(s) if whiteout::is_whiteout(dfd.as_fd(), &name, &s) => {
                        seen.insert(name);
                        continue;
                    }
                    Ok(s) => fmt_of(&s),
                    Err(_) => continue,
                },
            };
            seen.insert(name.clone());
            out.push(DirEnt {
                name,
                ino: make_ino(l.layer, e.ino),
                fmt,
            });
        }
    }
    Ok(out)
}

/// Is the union directory empty (ignoring whiteouts)?
pub fn is_empty(u: &Union, node: &Node) -> io::Result<bool> {
    Ok(list(u, node)?.is_empty())
}
