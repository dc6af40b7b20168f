//! The inode table: union objects the kernel knows about, keyed by their
//! stable inode number (which is also the FUSE node id).
//!
//! Inode numbers are derived, never allocated, so they are the same after a
//! remount: `layer << 56 | st_ino` of the object that defines the identity:
//! - directories: the topmost lower directory of the merge, else the upper one;
//! - other objects: the upper object, unless it was copied up, in which case
//!   its `trusted.layerfs.origin` keeps the number it had before copy-up;
//!   lower-only objects: the topmost lower one.
//!   Layer 0 is the upper; the union root is always 1.

use std::collections::HashMap;
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tracing::warn;

pub const ROOT_INO: u64 = 1;
const LAYER_SHIFT: u32 = 56;
const SHARDS: usize = 64;

/// Union inode number of object `st_ino` in `layer` (0 = upper).
pub fn make_ino(layer: u8, real: u64) -> u64 {
    if real >> LAYER_SHIFT != 0 {
        // Filesystems with 64-bit inode numbers: fold the high bits in. Unique
        // in practice; logged because uniqueness is then no longer guaranteed.
        warn!(
            layer,
            real, "inode number exceeds 56 bits; folding (uniqueness not guaranteed)"
        );
        let folded = (real ^ (real >> LAYER_SHIFT)) & ((1 << LAYER_SHIFT) - 1);
        return (u64::from(layer) << LAYER_SHIFT) | folded;
    }
    (u64::from(layer) << LAYER_SHIFT) | real
}

/// An object in a lower layer: layer number (1 = topmost lower) and path from the layer root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LowerRef {
    pub layer: u8,
    pub path: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct NodeState {
    /// Parent and name in the union (the first known name, for hard links).
    pub parent: u64,
    pub name: OsString,
    /// Other names of the same object (hard links) that the kernel looked up.
    pub aliases: Vec<(u64, OsString)>,
    /// The object exists in the upper layer under (parent, name).
    pub upper: bool,
    /// Non-directories: the lower object (data source until copied up).
    pub lower: Option<LowerRef>,
    /// Directories: the lower directories merged below the upper, topmost first.
    pub lower_dirs: Vec<LowerRef>,
    /// Directories: the upper directory holds entries with foreign inode numbers.
    pub impure: bool,
    /// Removed from the union (kept while the kernel still references it).
    pub unlinked: bool,
}

pub struct Node {
    pub ino: u64,
    /// `S_IFMT` bits of the object.
    pub fmt: u32,
    lookups: AtomicU64,
    pub state: RwLock<NodeState>,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }

    pub fn snapshot(&self) -> NodeState {
        self.state.read().clone()
    }
}

/// Sharded map so lookups in different directories do not contend on one lock.
pub struct InodeTable {
    shards: Vec<Mutex<HashMap<u64, Arc<Node>>>>,
    /// Bumped after any known directory changes its name or parent, becomes
    /// unlinked, or leaves the table (its number may then name another
    /// object): directory paths cached before are stale (see
    /// `Union::dir_path`). Files do not bump it: no path goes through a file.
    names_gen: AtomicU64,
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl InodeTable {
    pub fn new() -> Self {
        InodeTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            names_gen: AtomicU64::new(0),
        }
    }

    pub fn names_gen(&self) -> u64 {
        self.names_gen.load(Ordering::Acquire)
    }

    /// A node's place in the namespace changed (call after the change).
    pub fn names_changed(&self) {
        self.names_gen.fetch_add(1, Ordering::AcqRel);
    }

    fn shard(&self, ino: u64) -> &Mutex<HashMap<u64, Arc<Node>>> {
        // Low bits of inode numbers are well spread; mix in the layer bits.
        let h = (ino ^ (ino >> LAYER_SHIFT)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        self.shard(ino).lock().get(&ino).cloned()
    }

    /// Insert the root (never forgotten).
    pub fn insert_root(&self, state: NodeState) {
        let node = Arc::new(Node {
            ino: ROOT_INO,
            fmt: libc::S_IFDIR,
            lookups: AtomicU64::new(1),
            state: RwLock::new(state),
        });
        self.shard(ROOT_INO).lock().insert(ROOT_INO, node);
    }

    /// Find or create the node for `ino` and count one kernel lookup.
    /// An existing node keeps its state (the table is the authority while it
    /// lives) but learns `state.parent/name` as an alias; a node of another
    /// type under the same number (a reused inode) is replaced.
    pub fn lookup_or_insert(&self, ino: u64, fmt: u32, state: NodeState) -> Arc<Node> {
        let mut shard = self.shard(ino).lock();
        if let Some(n) = shard.get(&ino) {
            if n.fmt == fmt {
                n.lookups.fetch_add(1, Ordering::Relaxed);
                let mut st = n.state.write();
                if st.unlinked {
                    // A stale node for a number the upper reused: start over.
                    *st = state;
                    drop(st);
                    if fmt == libc::S_IFDIR {
                        self.names_changed();
                    }
                    return n.clone();
                } else if (st.parent, &st.name) != (state.parent, &state.name)
                    && !st
                        .aliases
                        .iter()
                        .any(|(p, nm)| *p == state.parent && *nm == state.name)
                {
                    st.aliases.push((state.parent, state.name));
                }
                drop(st);
                return n.clone();
            }
        }
        // A node of another type under this number: the upper reused an inode
        // number the kernel still holds. The kernel will FORGET its old inode
        // under the same node id with its own count, so the count carries over.
        let (carried, was_dir) = shard
            .get(&ino)
            .map(|n| (n.lookups.load(Ordering::Relaxed), n.fmt == libc::S_IFDIR))
            .unwrap_or((0, false));
        let node = Arc::new(Node {
            ino,
            fmt,
            lookups: AtomicU64::new(carried + 1),
            state: RwLock::new(state),
        });
        shard.insert(ino, node.clone());
        drop(shard);
        if was_dir {
            self.names_changed();
        }
        node
    }

    /// Every node the kernel currently knows.
    pub fn all(&self) -> Vec<Arc<Node>> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Drop `n` kernel references; the node goes when none are left.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut shard = self.shard(ino).lock();
        if let Some(node) = shard.get(&ino) {
            let prev = node.lookups.fetch_sub(
                n.min(node.lookups.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            if prev <= n {
                let dir = node.fmt == libc::S_IFDIR;
                shard.remove(&ino);
                drop(shard);
                if dir {
                    self.names_changed();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(parent: u64, name: &str) -> NodeState {
        NodeState {
            parent,
            name: name.into(),
            aliases: vec![],
            upper: false,
            lower: None,
            lower_dirs: vec![],
            impure: false,
            unlinked: false,
        }
    }

    #[test]
    fn ino_layout() {
        assert_eq!(make_ino(0, 42), 42);
        assert_eq!(make_ino(2, 42), (2 << 56) | 42);
        assert_ne!(make_ino(1, 42), make_ino(2, 42));
    }

    #[test]
    fn lookups_and_forget() {
        let t = InodeTable::new();
        let a = t.lookup_or_insert(10, libc::S_IFREG, st(1, "a"));
        let b = t.lookup_or_insert(10, libc::S_IFREG, st(1, "b"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.snapshot().aliases.len(), 1);
        t.forget(10, 1);
        assert!(t.get(10).is_some());
        t.forget(10, 1);
        assert!(t.get(10).is_none());
    }

    #[test]
    fn reused_number_keeps_the_kernels_count() {
        let t = InodeTable::new();
        // A file the kernel looked up twice, then the number comes back as a symlink.
        t.lookup_or_insert(7, libc::S_IFREG, st(1, "placeholder"));
        t.lookup_or_insert(7, libc::S_IFREG, st(1, "placeholder"));
        let l = t.lookup_or_insert(7, libc::S_IFLNK, st(1, "link"));
        assert_eq!(l.fmt, libc::S_IFLNK);
        // The late FORGET of the old inode must not drop the new one.
        t.forget(7, 2);
        assert!(t.get(7).is_some_and(|n| n.fmt == libc::S_IFLNK));
        t.forget(7, 1);
        assert!(t.get(7).is_none());
    }
}
