//! Merged directory listings: upper entries, then each lower directory in
//! order, hiding whiteouts and names already seen, stopping at opaque
//! directories. Inode numbers are the same ones `lookup` gives (readdir and
//! stat agree): derived from the entry's own layer, and probed the way lookup
//! does only where the cheap rule could be wrong (directories in a merged
//! parent, files in an impure one).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
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

enum Kind {
    Object(u32),
    Whiteout,
    /// Removed between getdents and stat.
    Gone,
}

/// What a directory entry is; only character devices need a stat (and a
/// 0/0 one an xattr check) to tell a whiteout from a device.
fn classify(dfd: BorrowedFd<'_>, dtype: u8, name: &OsStr) -> Kind {
    match dtype_fmt(dtype) {
        Some(f) if f != libc::S_IFCHR => Kind::Object(f),
        _ => match sys::fstatat(dfd, name) {
            Ok(s) if whiteout::is_whiteout(dfd, name, &s) => Kind::Whiteout,
            Ok(s) => Kind::Object(fmt_of(&s)),
            Err(_) => Kind::Gone,
        },
    }
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
            let fmt = match classify(dfd.as_fd(), e.dtype, &name) {
                Kind::Object(f) => f,
                Kind::Whiteout => {
                    seen.insert(name);
                    continue;
                }
                Kind::Gone => continue,
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
        let t0 = std::time::Instant::now();
        let entries = sys::read_dir_all(dfd.as_fd())?;
        let subdirs = entries.iter().filter(|e| e.dtype == libc::DT_DIR);
        u.prefetch.listed(
            &dfd,
            t0.elapsed(),
            subdirs.map(|e| OsStr::from_bytes(&e.name)),
        );
        for e in entries {
            let name = OsStr::from_bytes(&e.name);
            if seen.contains(name) {
                continue;
            }
            let name = name.to_os_string();
            let fmt = match classify(dfd.as_fd(), e.dtype, &name) {
                Kind::Object(f) => f,
                Kind::Whiteout => {
                    seen.insert(name);
                    continue;
                }
                Kind::Gone => continue,
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

/// Listing snapshots, so that directory offsets stay valid while entries are
/// added or removed (telldir/seekdir, a reader in the middle of a listing).
///
/// layerfs answers no OPENDIR (the kernel then never sends OPENDIR or
/// RELEASEDIR and caches listings itself: two round trips less per directory
/// walked), so there is no per-open handle to hold a snapshot. Instead each
/// offset names its snapshot: `snapshot << 32 | index + 1`. A change to a
/// directory starts a new snapshot for new readers; readers of an older one
/// keep it while it is among the most recent `KEEP` snapshots.
pub struct Listings {
    inner: parking_lot::Mutex<ListingsInner>,
}

#[derive(Default)]
struct ListingsInner {
    current: std::collections::HashMap<u64, u32>,
    snaps: std::collections::HashMap<(u64, u32), std::sync::Arc<Vec<DirEnt>>>,
    order: std::collections::VecDeque<(u64, u32)>,
    next: u32,
}

const KEEP: usize = 512;

pub fn offset_of(snapshot: u32, index: usize) -> u64 {
    (u64::from(snapshot) << 32) | (index as u64 + 1)
}

impl Default for Listings {
    fn default() -> Self {
        Listings {
            inner: parking_lot::Mutex::new(ListingsInner {
                next: 1,
                ..Default::default()
            }),
        }
    }
}

impl Listings {
    /// The snapshot an offset continues (or the current one, for offset 0 or
    /// a snapshot already dropped), with the index to continue from.
    pub fn get(
        &self,
        dir: u64,
        offset: u64,
        build: impl FnOnce() -> io::Result<Vec<DirEnt>>,
    ) -> io::Result<(u32, std::sync::Arc<Vec<DirEnt>>, usize)> {
        let snap = (offset >> 32) as u32;
        let index = (offset & 0xffff_ffff) as usize;
        {
            let g = self.inner.lock();
            if offset != 0 {
                if let Some(s) = g.snaps.get(&(dir, snap)) {
                    return Ok((snap, s.clone(), index));
                }
            }
            if let Some(id) = g.current.get(&dir) {
                if let Some(s) = g.snaps.get(&(dir, *id)) {
                    return Ok((*id, s.clone(), index));
                }
            }
        }
        // Built outside the lock: listings of big directories take a while.
        let entries = std::sync::Arc::new(build()?);
        let mut g = self.inner.lock();
        let id = g.next;
        g.next = g.next.wrapping_add(1).max(1);
        g.current.insert(dir, id);
        g.snaps.insert((dir, id), entries.clone());
        g.order.push_back((dir, id));
        while g.order.len() > KEEP {
            if let Some(old) = g.order.pop_front() {
                g.snaps.remove(&old);
                if g.current.get(&old.0) == Some(&old.1) {
                    g.current.remove(&old.0);
                }
            }
        }
        Ok((id, entries, index))
    }

    /// `dir` changed: new readers get a new snapshot.
    pub fn invalidate(&self, dir: u64) {
        self.inner.lock().current.remove(&dir);
    }
}
