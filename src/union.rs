//! The union: lookup across layers and the state every operation shares.
//!
//! `Union` owns the layers and the inode table. Each FUSE operation in
//! `fs.rs` is a thin adapter over a method here or in `copyup`, `namespace`
//! and `dirmerge`; all of them return `io::Result` so they can be reused by
//! the checkpoint and control code without a FUSE request.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::inode::{make_ino, InodeTable, LowerRef, Node, NodeState, ROOT_INO};
use crate::layers::{join, split_last, FdCache, Layers};
use crate::sys::{self, Stat};
use crate::whiteout;

/// Who is asking: the caller's credentials from the FUSE request.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What a lookup found for one name.
#[derive(Debug, Clone)]
pub struct Probe {
    pub ino: u64,
    pub fmt: u32,
    /// Attributes of the topmost object, with `st_ino` already the union's.
    pub st: Stat,
    pub upper: bool,
    pub lower: Option<LowerRef>,
    pub lower_dirs: Vec<LowerRef>,
    pub impure: bool,
}

/// Where an object lives right now: a directory descriptor and a name in it.
pub struct Loc {
    pub dir: Arc<OwnedFd>,
    pub name: OsString,
}

const LOCK_STRIPES: usize = 64;

pub struct Union {
    pub layers: Layers,
    pub inodes: InodeTable,
    upper_dirs: FdCache<u64>,
    locks: Vec<Mutex<()>>,
    tmp_counter: AtomicU64,
    read_only: bool,
    /// Copy-ups are not fsynced (the `volatile` option).
    pub volatile: bool,
    pub listings: crate::dirmerge::Listings,
    pub prefetch: crate::prefetch::Prefetch,
    /// Held shared by every FUSE request that reads or changes the union,
    /// exclusively by checkpoint capture and rollback: they see (and make)
    /// a state no request is halfway through.
    pub gate: parking_lot::RwLock<()>,
}

pub fn fmt_of(st: &Stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

pub fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn not_found(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

impl Union {
    pub fn new(layers: Layers, read_only: bool, volatile: bool) -> io::Result<Union> {
        let nl = layers.nlowers();
        let root_upper = layers.upper_root().is_some();
        let u = Union {
            layers,
            inodes: InodeTable::new(),
            upper_dirs: FdCache::new(256),
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            tmp_counter: AtomicU64::new(0),
            read_only,
            volatile,
            listings: Default::default(),
            prefetch: Default::default(),
            gate: parking_lot::RwLock::new(()),
        };
        let impure = match u.layers.upper_root() {
            Some(r) => whiteout::read_dir_marks(r, None)?.impure,
            None => false,
        };
        u.inodes.insert_root(NodeState {
            parent: ROOT_INO,
            name: OsString::new(),
            aliases: vec![],
            upper: root_upper,
            lower: None,
            lower_dirs: (1..=nl as u8)
                .map(|layer| LowerRef {
                    layer,
                    path: Vec::new(),
                })
                .collect(),
            impure,
            unlinked: false,
        });
        Ok(u)
    }

    pub fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    pub fn node(&self, ino: u64) -> io::Result<Arc<Node>> {
        self.inodes.get(ino).ok_or_else(|| errno(libc::ENOENT))
    }

    /// Per-object lock (striped) serialising copy-up of one object.
    pub fn lock_ino(&self, ino: u64) -> MutexGuard<'_, ()> {
        self.locks[(ino as usize).wrapping_mul(31) % LOCK_STRIPES].lock()
    }

    /// A fresh name for a scratch object in workdir.
    pub fn tmp_name(&self) -> OsString {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!("#lf{:x}-{:x}", sys::getpid(), n))
    }

    /// The upper directory of a directory node (which must have one).
    pub fn upper_dir_fd(&self, node: &Node) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.upper_dirs.get(&node.ino) {
            return Ok(fd);
        }
        let (parent, name, upper) = {
            let st = node.state.read();
            (st.parent, st.name.clone(), st.upper)
        };
        if !upper {
            return Err(errno(libc::ENOENT));
        }
        let fd = if node.ino == ROOT_INO {
            let root = self.layers.upper_root().ok_or_else(|| errno(libc::EROFS))?;
            Arc::new(sys::openat(
                root,
                OsStr::new("."),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )?)
        } else {
            let pnode = self.node(parent)?;
            let pfd = self.upper_dir_fd(&pnode)?;
            Arc::new(sys::openat(
                pfd.as_fd(),
                &name,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?)
        };
        self.upper_dirs.insert(node.ino, fd.clone());
        Ok(fd)
    }

    pub fn forget_upper_dir(&self, ino: u64) {
        self.upper_dirs.remove(&ino);
    }

    /// Directory descriptor + name of the topmost object of `node`.
    pub fn loc(&self, node: &Node) -> io::Result<Loc> {
        let st = node.state.read().clone();
        if st.unlinked {
            return Err(errno(libc::ENOENT));
        }
        if node.is_dir() {
            let dir = if st.upper {
                self.upper_dir_fd(node)?
            } else {
                let l = st.lower_dirs.first().ok_or_else(|| errno(libc::ENOENT))?;
                self.layers.lower_dir(l.layer, &l.path)?
            };
            return Ok(Loc {
                dir,
                name: OsString::from("."),
            });
        }
        if st.upper {
            let p = self.node(st.parent)?;
            Ok(Loc {
                dir: self.upper_dir_fd(&p)?,
                name: st.name,
            })
        } else {
            let l = st.lower.ok_or_else(|| errno(libc::ENOENT))?;
            let (pp, name) = split_last(&l.path);
            Ok(Loc {
                dir: self.layers.lower_dir(l.layer, pp)?,
                name: OsStr::from_bytes(name).to_os_string(),
            })
        }
    }

    /// Current attributes of a node, with the union's inode number.
    pub fn stat_node(&self, node: &Node) -> io::Result<Stat> {
        let loc = self.loc(node)?;
        let mut st = sys::fstatat(loc.dir.as_fd(), &loc.name)?;
        st.st_ino = node.ino;
        Ok(st)
    }

    /// Look `name` up in directory `parent` across all layers.
    pub fn probe(&self, dir: &Node, parent: &NodeState, name: &OsStr) -> io::Result<Option<Probe>> {
        let mut upper_st: Option<Stat> = None;
        let mut marks = whiteout::DirMarks::default();
        let mut origin = None;
        if parent.upper {
            let pfd = self.upper_dir_fd(dir)?;
            match sys::fstatat(pfd.as_fd(), name) {
                Ok(st) => {
                    if whiteout::is_whiteout(pfd.as_fd(), name, &st) {
                        return Ok(None);
                    }
                    if fmt_of(&st) == libc::S_IFDIR {
                        marks = whiteout::read_dir_marks(pfd.as_fd(), Some(name))?;
                    } else {
                        if parent.impure {
                            origin = whiteout::read_origin(pfd.as_fd(), name);
                        }
                        let mut st = st;
                        st.st_ino = origin.unwrap_or_else(|| make_ino(0, st.st_ino));
                        return Ok(Some(Probe {
                            ino: st.st_ino,
                            fmt: fmt_of(&st),
                            st,
                            upper: true,
                            lower: None,
                            lower_dirs: vec![],
                            impure: false,
                        }));
                    }
                    upper_st = Some(st);
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }

        // Candidate lower paths, topmost first.
        let nb = name.as_bytes();
        let candidates: Vec<LowerRef> = if upper_st.is_some() && marks.opaque {
            vec![]
        } else if let Some(r) = &marks.redirect {
            if r.starts_with(b"/") {
                match whiteout::resolve_redirect(r, b"") {
                    Some(p) => (1..=self.layers.nlowers() as u8)
                        .map(|layer| LowerRef {
                            layer,
                            path: p.clone(),
                        })
                        .collect(),
                    None => vec![],
                }
            } else {
                parent
                    .lower_dirs
                    .iter()
                    .filter_map(|l| {
                        whiteout::resolve_redirect(r, &l.path).map(|path| LowerRef {
                            layer: l.layer,
                            path,
                        })
                    })
                    .collect()
            }
        } else {
            parent
                .lower_dirs
                .iter()
                .map(|l| LowerRef {
                    layer: l.layer,
                    path: join(&l.path, nb),
                })
                .collect()
        };

        let mut lower_dirs = Vec::new();
        let mut first_lower_st: Option<Stat> = None;
        let mut lower_obj: Option<(LowerRef, Stat)> = None;
        let last = candidates.len().saturating_sub(1);
        for (i, c) in candidates.into_iter().enumerate() {
            let (pp, base) = split_last(&c.path);
            let dfd = match self.layers.lower_dir(c.layer, pp) {
                Ok(f) => f,
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(e),
            };
            let st = match sys::fstatat(dfd.as_fd(), OsStr::from_bytes(base)) {
                Ok(st) => st,
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(e),
            };
            if whiteout::is_whiteout(dfd.as_fd(), OsStr::from_bytes(base), &st) {
                break;
            }
            if fmt_of(&st) != libc::S_IFDIR {
                if upper_st.is_none() && lower_dirs.is_empty() {
                    lower_obj = Some((c, st));
                }
                break;
            }
            if first_lower_st.is_none() {
                first_lower_st = Some(st);
            }
            // Opaqueness only matters if there is a layer below to hide.
            let opaque = i < last
                && whiteout::read_dir_marks(dfd.as_fd(), Some(OsStr::from_bytes(base)))
                    .map(|m| m.opaque)
                    .unwrap_or(false);
            lower_dirs.push(c);
            if opaque {
                break;
            }
        }

        if let Some(mut st) = upper_st {
            // Upper directory, possibly merged with lower ones.
            let ino = match (&first_lower_st, lower_dirs.first()) {
                (Some(l), Some(r)) => make_ino(r.layer, l.st_ino),
                _ => make_ino(0, st.st_ino),
            };
            st.st_ino = ino;
            return Ok(Some(Probe {
                ino,
                fmt: libc::S_IFDIR,
                st,
                upper: true,
                lower: None,
                lower_dirs,
                impure: marks.impure,
            }));
        }
        if let Some((l, mut st)) = lower_obj {
            st.st_ino = make_ino(l.layer, st.st_ino);
            return Ok(Some(Probe {
                ino: st.st_ino,
                fmt: fmt_of(&st),
                st,
                upper: false,
                lower: Some(l),
                lower_dirs: vec![],
                impure: false,
            }));
        }
        if let (Some(mut st), Some(first)) = (first_lower_st, lower_dirs.first()) {
            st.st_ino = make_ino(first.layer, st.st_ino);
            return Ok(Some(Probe {
                ino: st.st_ino,
                fmt: libc::S_IFDIR,
                st,
                upper: false,
                lower: None,
                lower_dirs,
                impure: false,
            }));
        }
        Ok(None)
    }

    /// Does anything (not a whiteout) exist at `name` below the upper, in the
    /// lower directories of `parent`? Then removing the upper object must leave a whiteout.
    pub fn lower_has(&self, parent: &NodeState, name: &OsStr) -> io::Result<bool> {
        for l in &parent.lower_dirs {
            let dfd = match self.layers.lower_dir(l.layer, &l.path) {
                Ok(f) => f,
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(e),
            };
            match sys::fstatat(dfd.as_fd(), name) {
                Ok(st) => return Ok(!whiteout::is_whiteout(dfd.as_fd(), name, &st)),
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Probe `name` in directory node `dir`.
    pub fn probe_in(&self, dir: &Node, name: &OsStr) -> io::Result<Option<Probe>> {
        let st = dir.state.read().clone();
        self.probe(dir, &st, name)
    }

    /// Look up `name` in `parent` and count a kernel reference on the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> io::Result<(Arc<Node>, Stat)> {
        self.lookup_probe(parent, name).map(|(n, st, _)| (n, st))
    }

    /// `lookup`, also returning what the probe found at this very name.
    pub fn lookup_probe(&self, parent: u64, name: &OsStr) -> io::Result<(Arc<Node>, Stat, Probe)> {
        sys::check_name(name)?;
        let pnode = self.node(parent)?;
        if !pnode.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let p = self
            .probe_in(&pnode, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let node = self.inodes.lookup_or_insert(
            p.ino,
            p.fmt,
            NodeState {
                parent,
                name: name.to_os_string(),
                aliases: vec![],
                upper: p.upper,
                lower: p.lower.clone(),
                lower_dirs: p.lower_dirs.clone(),
                impure: p.impure,
                unlinked: false,
            },
        );
        // The table's node may know more (copied up through another name).
        let st = if node.state.read().upper && !p.upper {
            self.stat_node(&node)?
        } else {
            p.st
        };
        Ok((node, st, p))
    }

    /// A directory's entries changed through layerfs: the next reader gets
    /// a fresh listing (the kernel drops its own cached listing itself).
    pub fn dir_changed(&self, dir: &Node) {
        self.listings.invalidate(dir.ino);
    }

    /// Union path of `ino` (without the leading '/'); None once unlinked.
    pub fn path_of(&self, ino: u64) -> Option<Vec<u8>> {
        if ino == ROOT_INO {
            return Some(Vec::new());
        }
        let gen = self.inodes.names_gen();
        let (parent, name) = {
            let n = self.inodes.get(ino)?;
            let st = n.state.read();
            if st.unlinked {
                return None;
            }
            (st.parent, st.name.clone())
        };
        let mut p = self.dir_path(parent, gen)?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        Some(p)
    }

    /// Union path of `name` in directory `parent`.
    pub fn path_in(&self, parent: u64, name: &OsStr) -> Option<Vec<u8>> {
        let mut p = self.dir_path(parent, self.inodes.names_gen())?;
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        Some(p)
    }

    /// Path of directory `dir`, from this thread's small cache when no name
    /// changed since (`gen`, read before the walk): every journaled change
    /// needs its parent's path, and changes come in runs per directory.
    fn dir_path(&self, dir: u64, gen: u64) -> Option<Vec<u8>> {
        if let Some(p) = DIR_PATHS.with(|c| c.borrow().get(gen, dir)) {
            return Some(p);
        }
        let p = self.walk_path(dir)?;
        DIR_PATHS.with(|c| c.borrow_mut().put(gen, dir, &p));
        Some(p)
    }

    /// Path of `ino` by walking up the parents.
    fn walk_path(&self, ino: u64) -> Option<Vec<u8>> {
        // Built leaf to root with every byte reversed, then reversed once:
        // one allocation, however deep.
        let mut out = Vec::with_capacity(64);
        let mut cur = ino;
        // Bounded: a cycle would be a bug, never a hang.
        for _ in 0..4096 {
            if cur == ROOT_INO {
                out.reverse();
                return Some(out);
            }
            let n = self.inodes.get(cur)?;
            let st = n.state.read();
            if st.unlinked {
                return None;
            }
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend(st.name.as_bytes().iter().rev());
            cur = st.parent;
        }
        None
    }

    /// The upper changed underneath the union (rollback, restore) at
    /// `changed` (union paths, parents first): drop cached descriptors and
    /// listings, re-probe every known node at or below a changed path, and
    /// return what the kernel must forget: (parent, name) entries and inodes.
    /// Called with the gate held exclusively.
    pub fn revalidate(&self, changed: &[Vec<u8>]) -> Revalidated {
        use crate::journal::under;
        self.upper_dirs.clear();
        let mut out = Revalidated::default();
        let mut nodes: Vec<(Vec<u8>, Arc<Node>)> = self
            .inodes
            .all()
            .into_iter()
            .filter_map(|n| self.path_of(n.ino).map(|p| (p, n)))
            .collect();
        // Parents before children: a child's probe reads its parent's state.
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut by_path: std::collections::HashMap<Vec<u8>, u64> = Default::default();
        for (p, n) in &nodes {
            by_path.insert(p.clone(), n.ino);
            let hit = changed.iter().any(|c| under(p, c) || under(c, p));
            if !hit {
                continue;
            }
            self.listings.invalidate(n.ino);
            out.inodes.push(n.ino);
            if n.ino == ROOT_INO {
                if let Some(r) = self.layers.upper_root() {
                    if let Ok(m) = whiteout::read_dir_marks(r, None) {
                        n.state.write().impure = m.impure;
                    }
                }
                continue;
            }
            let (parent, name) = {
                let st = n.state.read();
                (st.parent, st.name.clone())
            };
            let fresh = self
                .node(parent)
                .ok()
                .and_then(|pn| self.probe_in(&pn, &name).ok().flatten());
            let mut st = n.state.write();
            match fresh {
                Some(p) if p.ino == n.ino && p.fmt == n.fmt => {
                    st.upper = p.upper;
                    st.lower = p.lower;
                    st.lower_dirs = p.lower_dirs;
                    st.impure = p.impure;
                }
                // Gone, or another object now: the kernel looks the name up afresh.
                _ => st.unlinked = true,
            }
        }
        for c in changed {
            let (pp, name) = crate::layers::split_last(c);
            if let Some(pino) = by_path.get(pp) {
                out.entries
                    .push((*pino, OsStr::from_bytes(name).to_os_string()));
            }
        }
        // Nodes went stale above: paths cached before are not to be trusted.
        self.inodes.names_changed();
        out
    }
}

/// Kernel cache entries to invalidate after `Union::revalidate`.
#[derive(Debug, Default)]
pub struct Revalidated {
    pub entries: Vec<(u64, OsString)>,
    pub inodes: Vec<u64>,
}

/// A few directory paths per thread, valid for one namespace generation.
struct DirPaths {
    slots: [(u64, u64, Vec<u8>); 4],
    next: usize,
}

impl DirPaths {
    fn get(&self, gen: u64, dir: u64) -> Option<Vec<u8>> {
        self.slots
            .iter()
            .find(|(g, d, _)| *g == gen && *d == dir && *d != 0)
            .map(|(_, _, p)| p.clone())
    }

    fn put(&mut self, gen: u64, dir: u64, path: &[u8]) {
        let slot = &mut self.slots[self.next];
        slot.0 = gen;
        slot.1 = dir;
        slot.2.clear();
        slot.2.extend_from_slice(path);
        self.next = (self.next + 1) % self.slots.len();
    }
}

thread_local! {
    static DIR_PATHS: std::cell::RefCell<DirPaths> = std::cell::RefCell::new(DirPaths {
        slots: Default::default(),
        next: 0,
    });
}
