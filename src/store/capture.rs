//! Capture: build the tree objects describing the upper layer as it is now.
//!
//! A full capture walks the whole upper. An incremental one starts from the
//! root tree of an earlier capture (`base`) and a set of paths that may have
//! changed since: only the base trees along those paths are loaded, changed
//! and written back, bottom-up, so its cost follows the number of changed
//! paths and every untouched directory keeps its tree (and hash).
//!
//! Capturing must not change what it records: files and directories are
//! opened with `O_NOATIME` (reading them would otherwise move their atime),
//! and a symlink whose atime `readlink` moved gets it back.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use tracing::debug;

use super::objects::ObjectStore;
use super::tree::{Entry, Hash, Payload, Tree};
use crate::sys::{self, Stat};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// The object itself changed (data, metadata, created, removed); for a
    /// directory, its entries did not change except those listed separately.
    Shallow,
    /// Anything below may have changed (a directory moved here, for instance).
    Deep,
}

/// Counts of a tree's entries, recursively (the root directory itself is not
/// counted). Hard links count once per name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    /// Symlinks, devices, FIFOs, sockets, whiteouts.
    pub others: u64,
    /// Sum of the sizes of regular files.
    pub bytes: u64,
}

/// Change of `Totals` between two trees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TotalsDelta {
    pub files: i64,
    pub dirs: i64,
    pub others: i64,
    pub bytes: i64,
}

impl TotalsDelta {
    fn merge(&mut self, d: &TotalsDelta) {
        self.files += d.files;
        self.dirs += d.dirs;
        self.others += d.others;
        self.bytes += d.bytes;
    }
    fn add(&mut self, t: &Totals) {
        self.files += t.files as i64;
        self.dirs += t.dirs as i64;
        self.others += t.others as i64;
        self.bytes += t.bytes as i64;
    }
    fn sub(&mut self, t: &Totals) {
        self.files -= t.files as i64;
        self.dirs -= t.dirs as i64;
        self.others -= t.others as i64;
        self.bytes -= t.bytes as i64;
    }
}

impl Totals {
    fn add(&mut self, t: &Totals) {
        self.files += t.files;
        self.dirs += t.dirs;
        self.others += t.others;
        self.bytes += t.bytes;
    }

    /// These totals changed by `d` (saturating at zero).
    pub fn apply(&self, d: &TotalsDelta) -> Totals {
        let f = |a: u64, b: i64| (a as i64).saturating_add(b).max(0) as u64;
        Totals {
            files: f(self.files, d.files),
            dirs: f(self.dirs, d.dirs),
            others: f(self.others, d.others),
            bytes: f(self.bytes, d.bytes),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Totals of the whole resulting tree when `complete` (a full walk);
    /// zero for an incremental capture (see `delta`).
    pub files: u64,
    pub dirs: u64,
    pub others: u64,
    pub bytes: u64,
    /// File data objects this capture wrote (new content), and their size.
    pub stored_files: u64,
    pub stored_bytes: u64,
    /// True when the whole upper was walked.
    pub complete: bool,
    /// Incremental capture: the totals of the new tree minus those of `base`
    /// (computed from the changed parts only). Zero for a complete capture.
    pub delta: TotalsDelta,
}

impl CaptureStats {
    /// Totals of the resulting tree: exact for a complete capture; for an
    /// incremental one, `base` (the totals of the base tree) changed by `delta`.
    pub fn totals(&self, base: Option<Totals>) -> Option<Totals> {
        if self.complete {
            Some(Totals {
                files: self.files,
                dirs: self.dirs,
                others: self.others,
                bytes: self.bytes,
            })
        } else {
            base.map(|b| b.apply(&self.delta))
        }
    }
}

/// Totals of a stored tree, by reading every tree object below `root`
/// (for `checkpoint show`; a capture computes them without this).
pub fn totals(store: &ObjectStore, root: &Hash) -> io::Result<Totals> {
    let mut t = Totals::default();
    let mut stack = vec![*root];
    while let Some(h) = stack.pop() {
        for e in store.read_tree(&h)?.entries {
            t.add(&own_totals(&e));
            if let Payload::Dir(c) = e.payload {
                stack.push(c);
            }
        }
    }
    Ok(t)
}

/// What one entry counts for, without what is below it.
fn own_totals(e: &Entry) -> Totals {
    match e.fmt() {
        libc::S_IFREG => Totals {
            files: 1,
            bytes: e.size,
            ..Totals::default()
        },
        libc::S_IFDIR => Totals {
            dirs: 1,
            ..Totals::default()
        },
        _ => Totals {
            others: 1,
            ..Totals::default()
        },
    }
}

/// The dirty paths as a tree of path components.
#[derive(Default, Debug)]
struct Node {
    depth: Option<Depth>,
    children: BTreeMap<Vec<u8>, Node>,
}

fn build_trie(dirty: &BTreeMap<Vec<u8>, Depth>) -> io::Result<Node> {
    let mut root = Node::default();
    for (path, d) in dirty {
        let mut p = path.as_slice();
        while let Some(r) = p.strip_prefix(b"/") {
            p = r;
        }
        while let Some(r) = p.strip_suffix(b"/") {
            p = r;
        }
        let mut n = &mut root;
        if !p.is_empty() {
            for c in p.split(|b| *b == b'/') {
                if sys::check_name(OsStr::from_bytes(c)).is_err() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid dirty path {:?}", String::from_utf8_lossy(path)),
                    ));
                }
                n = n.children.entry(c.to_vec()).or_default();
            }
        }
        if n.depth != Some(Depth::Deep) {
            n.depth = Some(*d);
        }
    }
    Ok(root)
}

fn is_errno(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

fn gone(e: &io::Error) -> bool {
    is_errno(e, libc::ENOENT)
}

/// `openat` with `O_NOATIME`, without it when not allowed (not the owner
/// and no CAP_FOWNER).
fn open_noatime(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<OwnedFd> {
    match sys::openat(dir, name, flags | libc::O_NOATIME, 0) {
        Err(e) if is_errno(&e, libc::EPERM) => sys::openat(dir, name, flags, 0),
        r => r,
    }
}

/// All xattrs of `name` in `dir`, sorted by name.
fn read_xattrs(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match sys::llistxattr(dir, Some(name)) {
        Ok(n) => n,
        Err(e) if is_errno(&e, libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        match sys::lgetxattr(dir, Some(name), &n) {
            Ok(v) => out.push((n, v)),
            Err(e) if is_errno(&e, libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

fn fmt_of(st: &Stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

fn make_entry(name: &[u8], st: &Stat, xattrs: Vec<(Vec<u8>, Vec<u8>)>, payload: Payload) -> Entry {
    let fmt = fmt_of(st);
    Entry {
        name: name.to_vec(),
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        atime: (st.st_atime, st.st_atime_nsec as u32),
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        // A directory's size is the filesystem's bookkeeping (ext4 never
        // shrinks one), not content: recording it would make a restored
        // directory differ from its checkpoint forever.
        size: if fmt == libc::S_IFDIR {
            0
        } else {
            st.st_size as u64
        },
        rdev: st.st_rdev,
        link: if fmt == libc::S_IFREG && st.st_nlink > 1 {
            st.st_ino
        } else {
            0
        },
        xattrs,
        payload,
    }
}

/// Hashes of files by identity, size and times, from a capture made just
/// before, outside the writers' pause, so the capture inside the pause reads
/// only files that changed since. An entry is made only for a file whose
/// ctime is older than the moment it was read by more than the timestamp
/// granularity (a write in the same clock tick would not move ctime) and
/// that did not change while it was read.
#[derive(Default)]
pub struct HashCache {
    map: parking_lot::Mutex<HashMap<(u64, u64), (Stamp, Hash)>>,
}

/// Size, mtime and ctime of a file.
type Stamp = (i64, (i64, i64), (i64, i64));

/// Timestamps are taken from a coarse clock (a jiffy, up to 10 ms).
const CTIME_MARGIN_NS: i64 = 50_000_000;

fn stamp(st: &Stat) -> Stamp {
    (
        st.st_size,
        (st.st_mtime, st.st_mtime_nsec),
        (st.st_ctime, st.st_ctime_nsec),
    )
}

impl HashCache {
    fn get(&self, st: &Stat) -> Option<Hash> {
        let m = self.map.lock();
        let (s, h) = m.get(&(st.st_dev, st.st_ino))?;
        (*s == stamp(st)).then_some(*h)
    }

    fn put(&self, st: &Stat, after: &Stat, read_at_ns: i64, h: Hash) {
        let ctime_ns = st.st_ctime * 1_000_000_000 + st.st_ctime_nsec;
        if stamp(st) == stamp(after) && ctime_ns < read_at_ns - CTIME_MARGIN_NS {
            self.map
                .lock()
                .insert((st.st_dev, st.st_ino), (stamp(st), h));
        }
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

struct Cap<'a> {
    store: &'a ObjectStore,
    cache: Option<&'a HashCache>,
    /// Data of files with several names, so each is read once per capture.
    links: HashMap<(u64, u64), (Hash, u64)>,
    stats: CaptureStats,
}

impl Cap<'_> {
    /// Store the data of a regular file.
    fn file_data(&mut self, fd: BorrowedFd<'_>, st: &Stat) -> io::Result<Hash> {
        let key = (st.st_dev, st.st_ino);
        if st.st_nlink > 1 {
            if let Some((h, _)) = self.links.get(&key) {
                return Ok(*h);
            }
        }
        if let Some(h) = self.cache.and_then(|c| c.get(st)) {
            if self.store.contains(&h) {
                return Ok(h);
            }
        }
        let read_at = now_ns();
        let s = self.store.store_file(fd)?;
        if let Some(c) = self.cache {
            if let Ok(after) = sys::fstat(fd) {
                c.put(st, &after, read_at, s.hash);
            }
        }
        if s.new {
            self.stats.stored_files += 1;
            self.stats.stored_bytes += s.size;
        }
        if st.st_nlink > 1 {
            self.links.insert(key, (s.hash, s.size));
        }
        Ok(s.hash)
    }

    /// Entry for a non-directory `name` in `dir`, lstat'ed as `st`.
    /// `None` if it disappeared meanwhile.
    fn leaf(&mut self, dir: BorrowedFd<'_>, name: &[u8], st: &Stat) -> io::Result<Option<Entry>> {
        let n = OsStr::from_bytes(name);
        let (st, payload) = match fmt_of(st) {
            libc::S_IFREG => {
                // O_NONBLOCK: should the name have become a FIFO meanwhile,
                // the open must not hang (regular files ignore the flag).
                let fd = match open_noatime(
                    dir,
                    n,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                ) {
                    Ok(fd) => fd,
                    Err(e) if gone(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let fst = sys::fstat(fd.as_fd())?;
                if fmt_of(&fst) != libc::S_IFREG {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        format!(
                            "{:?} changed type during the capture",
                            String::from_utf8_lossy(name)
                        ),
                    ));
                }
                let h = self.file_data(fd.as_fd(), &fst)?;
                (fst, Payload::File(h))
            }
            libc::S_IFLNK => {
                let target = match sys::readlinkat(dir, n) {
                    Ok(t) => t,
                    Err(e) if gone(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
                restore_atime(dir, n, st);
                (*st, Payload::Symlink(target))
            }
            libc::S_IFDIR => {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            // Devices, FIFOs, sockets, whiteouts: metadata only.
            _ => (*st, Payload::None),
        };
        let xattrs = match read_xattrs(dir, n) {
            Ok(x) => x,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(make_entry(name, &st, xattrs, payload)))
    }

    /// Entry for `name` in `dir`, whatever it is, walking a directory whole.
    /// Adds what it counts to `tot`. `None` if there is no such name.
    fn capture_name(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        tot: &mut Totals,
    ) -> io::Result<Option<Entry>> {
        let n = OsStr::from_bytes(name);
        let st = match sys::fstatat(dir, n) {
            Ok(st) => st,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let e = if fmt_of(&st) == libc::S_IFDIR {
            let fd = match open_noatime(
                dir,
                n,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            ) {
                Ok(fd) => fd,
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let h = self.walk(fd.as_fd(), tot)?;
            let xattrs = match read_xattrs(dir, n) {
                Ok(x) => x,
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            make_entry(name, &st, xattrs, Payload::Dir(h))
        } else {
            match self.leaf(dir, name, &st)? {
                Some(e) => e,
                None => return Ok(None),
            }
        };
        tot.add(&own_totals(&e));
        Ok(Some(e))
    }

    /// Tree of the directory open (for reading) as `dir`, recursively.
    fn walk(&mut self, dir: BorrowedFd<'_>, tot: &mut Totals) -> io::Result<Hash> {
        let mut names: Vec<Vec<u8>> = sys::read_dir_fd(dir)?.into_iter().map(|d| d.name).collect();
        names.sort_unstable();
        let mut tree = Tree {
            entries: Vec::with_capacity(names.len()),
        };
        for name in names {
            if let Some(e) = self.capture_name(dir, &name, tot)? {
                tree.entries.push(e);
            }
        }
        self.store.write_tree(&tree)
    }

    /// What a base entry counted for, including everything below it.
    fn base_totals(&self, e: &Entry) -> io::Result<Totals> {
        let mut t = own_totals(e);
        if let Payload::Dir(h) = &e.payload {
            t.add(&totals(self.store, h)?);
        }
        Ok(t)
    }

    /// The base tree `base` of directory `dir`, updated for the dirty paths
    /// below `node`.
    fn update(
        &mut self,
        dir: BorrowedFd<'_>,
        base: &Hash,
        node: &Node,
        delta: &mut TotalsDelta,
    ) -> io::Result<Hash> {
        let mut tree = self.store.read_tree(base)?;
        for (name, child) in &node.children {
            let old = tree.remove(name);
            if let Some(e) = self.update_child(dir, name, child, old.as_ref(), delta)? {
                tree.upsert(e);
            }
        }
        self.store.write_tree(&tree)
    }

    fn update_child(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        child: &Node,
        old: Option<&Entry>,
        delta: &mut TotalsDelta,
    ) -> io::Result<Option<Entry>> {
        let n = OsStr::from_bytes(name);
        let st = match sys::fstatat(dir, n) {
            Ok(st) => Some(st),
            Err(e) if gone(&e) => None,
            Err(e) => return Err(e),
        };
        let base_dir = match old.map(|o| &o.payload) {
            Some(Payload::Dir(h)) if child.depth != Some(Depth::Deep) => Some(*h),
            _ => None,
        };
        if let (Some(st), Some(bh)) = (st.as_ref(), base_dir) {
            if fmt_of(st) == libc::S_IFDIR {
                // A directory of the base: only its metadata and the dirty
                // paths below it; the rest of its tree is kept.
                match sys::openat(
                    dir,
                    n,
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                ) {
                    Ok(fd) => {
                        let mut sub = TotalsDelta::default();
                        let h = self.update(fd.as_fd(), &bh, child, &mut sub)?;
                        match read_xattrs(dir, n) {
                            Ok(xattrs) => {
                                // The directory itself counts in both trees.
                                delta.merge(&sub);
                                return Ok(Some(make_entry(name, st, xattrs, Payload::Dir(h))));
                            }
                            // Vanished meanwhile: recount from what is there.
                            Err(e) if gone(&e) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.replace(dir, name, old, delta)
    }

    /// Forget the base entry and capture `name` anew (a whole walk for a directory).
    fn replace(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        old: Option<&Entry>,
        delta: &mut TotalsDelta,
    ) -> io::Result<Option<Entry>> {
        if let Some(o) = old {
            delta.sub(&self.base_totals(o)?);
        }
        let mut t = Totals::default();
        let e = self.capture_name(dir, name, &mut t)?;
        delta.add(&t);
        Ok(e)
    }
}

/// `readlink` moves a symlink's atime (relatime: the first read after a
/// change); put it back so a capture leaves what it records unchanged.
fn restore_atime(dir: BorrowedFd<'_>, name: &OsStr, before: &Stat) {
    let Ok(after) = sys::fstatat(dir, name) else {
        return;
    };
    if (after.st_atime, after.st_atime_nsec) == (before.st_atime, before.st_atime_nsec)
        || after.st_ino != before.st_ino
    {
        return;
    }
    if let Err(e) = sys::utimensat(
        dir,
        name,
        sys::TimeSpec::At(before.st_atime, before.st_atime_nsec),
        sys::TimeSpec::Omit,
    ) {
        debug!(?name, err = %e, "cannot restore a symlink's atime");
    }
}

/// Build the tree of the upper layer (`upper`: its root directory) and
/// return the root tree's hash.
///
/// With `base` (root tree of an earlier capture of this same upper), only
/// the `dirty` paths (relative to the upper root, "etc/x/y.conf"; "" is the
/// root) and their ancestors are looked at; with `base == None`, or the root
/// marked `Deep`, everything is walked. Callers must report every name of a
/// hard-linked file whose data or link count changed (a capture cannot find
/// a file's other names without a full walk).
///
/// The tree format has no entry for the upper root itself: its own metadata
/// is not recorded.
pub fn capture(
    store: &ObjectStore,
    upper: BorrowedFd<'_>,
    base: Option<&Hash>,
    dirty: &BTreeMap<Vec<u8>, Depth>,
) -> io::Result<(Hash, CaptureStats)> {
    capture_cached(store, upper, base, dirty, None)
}

/// `capture`, trusting (and filling) `cache` for files that did not change.
pub fn capture_cached(
    store: &ObjectStore,
    upper: BorrowedFd<'_>,
    base: Option<&Hash>,
    dirty: &BTreeMap<Vec<u8>, Depth>,
    cache: Option<&HashCache>,
) -> io::Result<(Hash, CaptureStats)> {
    let mut cap = Cap {
        store,
        cache,
        links: HashMap::new(),
        stats: CaptureStats::default(),
    };
    let trie = match base {
        Some(_) => Some(build_trie(dirty)?),
        None => None,
    };
    let incremental = match (base, &trie) {
        (Some(b), Some(t)) if t.depth != Some(Depth::Deep) => Some((b, t)),
        _ => None,
    };
    let root = if let Some((b, t)) = incremental {
        let mut delta = TotalsDelta::default();
        let h = cap.update(upper, b, t, &mut delta)?;
        cap.stats.delta = delta;
        debug!(paths = dirty.len(), ?delta, "incremental capture");
        h
    } else {
        let fd = open_noatime(
            upper,
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )?;
        let mut tot = Totals::default();
        let h = cap.walk(fd.as_fd(), &mut tot)?;
        cap.stats.files = tot.files;
        cap.stats.dirs = tot.dirs;
        cap.stats.others = tot.others;
        cap.stats.bytes = tot.bytes;
        cap.stats.complete = true;
        debug!(?tot, "full capture");
        h
    };
    if cap.stats.stored_files > 0 {
        debug!(
            files = cap.stats.stored_files,
            bytes = cap.stats.stored_bytes,
            "new file objects"
        );
    }
    Ok((root, cap.stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::Path;
    use tempfile::TempDir;

    struct Env {
        _state: TempDir,
        store: ObjectStore,
        up: TempDir,
        upfd: OwnedFd,
    }

    fn env() -> Env {
        let state = tempfile::tempdir().unwrap();
        let sfd = sys::open_root(state.path()).unwrap();
        let store = ObjectStore::open(sfd.as_fd()).unwrap();
        let up = tempfile::tempdir().unwrap();
        let upfd = sys::open_root(up.path()).unwrap();
        fixture(up.path());
        Env {
            _state: state,
            store,
            up,
            upfd,
        }
    }

    fn parent_fd(p: &Path) -> (OwnedFd, &OsStr) {
        (
            sys::open_root(p.parent().unwrap()).unwrap(),
            p.file_name().unwrap(),
        )
    }

    fn setx(p: &Path, name: &str, val: &[u8]) {
        let (fd, n) = parent_fd(p);
        sys::lsetxattr(fd.as_fd(), Some(n), name.as_bytes(), val, 0).unwrap();
    }

    fn mknod(p: &Path, mode: u32) {
        let (fd, n) = parent_fd(p);
        sys::mknodat(fd.as_fd(), n, mode, 0).unwrap();
    }

    fn set_atime(p: &Path, secs: i64) {
        let (fd, n) = parent_fd(p);
        sys::utimensat(
            fd.as_fd(),
            n,
            sys::TimeSpec::At(secs, 5),
            sys::TimeSpec::Omit,
        )
        .unwrap();
    }

    fn atime(p: &Path) -> (i64, i64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.atime(), m.atime_nsec())
    }

    fn fixture(r: &Path) {
        std::fs::write(r.join("f"), b"hello").unwrap();
        setx(&r.join("f"), "user.b", b"2");
        setx(&r.join("f"), "user.a", b"1");
        setx(
            &r.join("f"),
            "trusted.layerfs.origin",
            &[1, 0, 0, 0, 0, 0, 0, 0, 9],
        );
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/g"), b"gee").unwrap();
        std::fs::hard_link(r.join("d/g"), r.join("hl")).unwrap();
        std::fs::create_dir(r.join("d/sub")).unwrap();
        std::fs::write(r.join("d/sub/h"), b"aitch").unwrap();
        std::fs::create_dir(r.join("o")).unwrap();
        setx(&r.join("o"), "trusted.overlay.opaque", b"y");
        std::fs::write(r.join("o/in"), b"").unwrap();
        symlink("f", r.join("l")).unwrap();
        mknod(&r.join("p"), libc::S_IFIFO | 0o640);
        mknod(&r.join("w"), libc::S_IFCHR);
        std::fs::write(r.join("e"), b"").unwrap();
    }

    fn map(v: &[(&str, Depth)]) -> BTreeMap<Vec<u8>, Depth> {
        v.iter().map(|(p, d)| (p.as_bytes().to_vec(), *d)).collect()
    }

    /// Every entry by path, directories without their tree hash, so a
    /// mismatch shows where the trees differ.
    fn flatten(s: &ObjectStore, root: &Hash) -> BTreeMap<String, Entry> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(*root, String::new())];
        while let Some((h, p)) = stack.pop() {
            for mut e in s.read_tree(&h).unwrap().entries {
                let path = format!("{p}/{}", String::from_utf8_lossy(&e.name));
                if let Payload::Dir(c) = e.payload {
                    stack.push((c, path.clone()));
                    e.payload = Payload::Dir([0; 32]);
                }
                out.insert(path, e);
            }
        }
        out
    }

    fn full(e: &Env) -> (Hash, CaptureStats) {
        capture(&e.store, e.upfd.as_fd(), None, &BTreeMap::new()).unwrap()
    }

    #[test]
    fn hash_cache_never_hides_a_change() {
        let e = env();
        let f = e.up.path().join("conf");
        std::fs::write(&f, b"one").unwrap();
        // Older than the ctime margin, so the cache may keep it.
        std::thread::sleep(std::time::Duration::from_millis(80));
        let cache = HashCache::default();
        let cap = |c| {
            capture_cached(&e.store, e.upfd.as_fd(), None, &BTreeMap::new(), Some(c))
                .unwrap()
                .0
        };
        let h1 = cap(&cache);
        assert!(
            !cache.map.lock().is_empty(),
            "files older than the margin are cached"
        );
        assert_eq!(cap(&cache), h1, "unchanged: same tree from the cache");
        // Same size, rewritten at once: ctime moves, the cache must not answer.
        std::fs::write(&f, b"two").unwrap();
        let h2 = cap(&cache);
        assert_ne!(h2, h1);
        assert_eq!(h2, full(&e).0);
    }

    /// Incremental capture from `base` must give exactly the full capture.
    fn check(e: &Env, base: &Hash, base_tot: Totals, dirty: &[(&str, Depth)]) -> Hash {
        let (inc, si) = capture(&e.store, e.upfd.as_fd(), Some(base), &map(dirty)).unwrap();
        let (fh, sf) = full(e);
        assert_eq!(flatten(&e.store, &inc), flatten(&e.store, &fh));
        assert_eq!(inc, fh);
        assert!(!si.complete && sf.complete);
        assert_eq!(si.totals(Some(base_tot)), sf.totals(None));
        assert_eq!(Some(totals(&e.store, &fh).unwrap()), sf.totals(None));
        inc
    }

    fn base(e: &Env) -> (Hash, Totals) {
        let (h, s) = full(e);
        (h, s.totals(None).unwrap())
    }

    #[test]
    fn full_capture_content() {
        let e = env();
        let r = e.up.path();
        // Old atimes that reading would move (relatime): capture must keep them.
        for p in ["f", "d", "l", "d/sub"] {
            set_atime(&r.join(p), 1000);
        }
        let before: Vec<_> = ["f", "d", "l", "d/sub"]
            .iter()
            .map(|p| atime(&r.join(p)))
            .collect();
        let (h, st) = full(&e);
        let after: Vec<_> = ["f", "d", "l", "d/sub"]
            .iter()
            .map(|p| atime(&r.join(p)))
            .collect();
        assert_eq!(before, after);
        assert_eq!(
            (st.files, st.dirs, st.others, st.bytes),
            (6, 3, 3, 5 + 3 + 3 + 5)
        );
        assert_eq!(st.stored_files, 4); // hello, gee, aitch, ""
        let m = flatten(&e.store, &h);
        let names: Vec<_> = m.keys().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "/d", "/d/g", "/d/sub", "/d/sub/h", "/e", "/f", "/hl", "/l", "/o", "/o/in", "/p",
                "/w"
            ]
        );
        let f = &m["/f"];
        assert_eq!(f.payload, Payload::File(*blake3::hash(b"hello").as_bytes()));
        assert_eq!(f.size, 5);
        assert_eq!(f.link, 0);
        let xn: Vec<_> = f.xattrs.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(xn, [&b"trusted.layerfs.origin"[..], b"user.a", b"user.b"]);
        assert_eq!(f.atime, (1000, 5));
        assert_eq!(m["/d/g"].link, m["/hl"].link);
        assert_ne!(m["/d/g"].link, 0);
        assert_eq!(m["/d/g"].payload, m["/hl"].payload);
        assert_eq!(m["/l"].payload, Payload::Symlink(b"f".to_vec()));
        assert_eq!(m["/l"].atime, (1000, 5));
        assert_eq!(m["/p"].fmt(), libc::S_IFIFO);
        assert_eq!(m["/p"].mode & 0o7777, 0o640);
        assert!(m["/w"].is_whiteout());
        assert_eq!(m["/w"].payload, Payload::None);
        assert!(m["/o"]
            .xattrs
            .contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())));
        assert!(m["/d"].is_dir());
        // Same upper, same hash; nothing new stored.
        let (h2, st2) = full(&e);
        assert_eq!(h2, h);
        assert_eq!(st2.stored_files, 0);
        // Empty dirty set: base unchanged.
        let (h3, s3) = capture(&e.store, e.upfd.as_fd(), Some(&h), &BTreeMap::new()).unwrap();
        assert_eq!(h3, h);
        assert_eq!(s3.delta, TotalsDelta::default());
    }

    #[test]
    fn incremental_modify_delete_chmod() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::remove_file(r.join("d/sub/h")).unwrap();
        std::fs::write(r.join("f"), b"changed!").unwrap();
        std::fs::set_permissions(r.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(r.join("e"), b"").unwrap(); // rewritten, same content
        let h = check(
            &e,
            &b,
            bt,
            &[
                ("d/sub/h", Depth::Shallow),
                ("f", Depth::Shallow),
                ("e", Depth::Shallow),
            ],
        );
        // Untouched directories keep their trees.
        let old = e.store.read_tree(&b).unwrap();
        let new = e.store.read_tree(&h).unwrap();
        assert_eq!(old.get(b"o"), new.get(b"o"));
        assert_ne!(old.get(b"d"), new.get(b"d"));
    }

    #[test]
    fn incremental_add_in_new_dirs() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::create_dir_all(r.join("n/m")).unwrap();
        std::fs::write(r.join("n/m/x"), b"x").unwrap();
        // Not reported, but inside a directory that is new to the base: walked.
        std::fs::write(r.join("n/m/y"), b"y").unwrap();
        std::fs::write(r.join("d/sub/new"), b"new").unwrap();
        check(
            &e,
            &b,
            bt,
            &[("n/m/x", Depth::Shallow), ("d/sub/new", Depth::Shallow)],
        );
    }

    #[test]
    fn incremental_shallow_dir_metadata() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::set_permissions(r.join("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
        setx(&r.join("d"), "trusted.overlay.impure", b"y");
        set_atime(&r.join("o"), 77);
        check(&e, &b, bt, &[("d", Depth::Shallow), ("o", Depth::Shallow)]);
    }

    #[test]
    fn incremental_dir_rename_deep() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::create_dir(r.join("dst")).unwrap();
        std::fs::rename(r.join("d"), r.join("dst/moved")).unwrap();
        std::fs::write(r.join("dst/moved/sub/h"), b"rewritten").unwrap();
        check(
            &e,
            &b,
            bt,
            &[("dst/moved", Depth::Deep), ("d", Depth::Deep)],
        );
    }

    #[test]
    fn incremental_rename_within_base_dir_deep() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::rename(r.join("d/sub"), r.join("o/sub2")).unwrap();
        check(
            &e,
            &b,
            bt,
            &[("o/sub2", Depth::Deep), ("d/sub", Depth::Deep)],
        );
    }

    #[test]
    fn incremental_type_changes_and_whiteouts() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        // A directory replaced by a file; only a path below it is reported.
        std::fs::remove_dir_all(r.join("d/sub")).unwrap();
        std::fs::write(r.join("d/sub"), b"now a file").unwrap();
        // A file replaced by a whiteout, a whiteout by a directory.
        std::fs::remove_file(r.join("f")).unwrap();
        mknod(&r.join("f"), libc::S_IFCHR);
        std::fs::remove_file(r.join("w")).unwrap();
        std::fs::create_dir(r.join("w")).unwrap();
        std::fs::write(r.join("w/inside"), b"i").unwrap();
        // A directory replaced by a symlink.
        std::fs::remove_dir_all(r.join("o")).unwrap();
        symlink("/elsewhere", r.join("o")).unwrap();
        check(
            &e,
            &b,
            bt,
            &[
                ("d/sub/h", Depth::Shallow),
                ("f", Depth::Shallow),
                ("w", Depth::Shallow),
                ("o", Depth::Shallow),
            ],
        );
    }

    #[test]
    fn incremental_delete_subtree_and_hard_links() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::remove_dir_all(r.join("d")).unwrap(); // hl's link count drops to 1
        std::fs::hard_link(r.join("f"), r.join("o/f2")).unwrap();
        check(
            &e,
            &b,
            bt,
            &[
                ("d", Depth::Shallow),
                ("hl", Depth::Shallow),
                ("f", Depth::Shallow),
                ("o/f2", Depth::Shallow),
                ("never/existed", Depth::Shallow),
            ],
        );
    }

    #[test]
    fn incremental_root_deep_and_path_forms() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        std::fs::write(r.join("top"), b"t").unwrap();
        std::fs::remove_file(r.join("e")).unwrap();
        let (h, s) = capture(
            &e.store,
            e.upfd.as_fd(),
            Some(&b),
            &map(&[("", Depth::Deep)]),
        )
        .unwrap();
        assert!(s.complete);
        assert_eq!(h, full(&e).0);
        // Leading/trailing slashes are tolerated; '..' is refused.
        check(
            &e,
            &b,
            bt,
            &[("/top/", Depth::Shallow), ("e", Depth::Shallow)],
        );
        let err = capture(
            &e.store,
            e.upfd.as_fd(),
            Some(&b),
            &map(&[("d/../x", Depth::Shallow)]),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    /// An incremental capture reads only the trees along dirty paths: remove
    /// every other tree object from the store and it still succeeds.
    #[test]
    fn incremental_reads_only_dirty_paths() {
        let e = env();
        let r = e.up.path();
        let (b, bt) = base(&e);
        let root = e.store.read_tree(&b).unwrap();
        let Payload::Dir(d) = root.get(b"d").unwrap().payload else {
            panic!()
        };
        let Payload::Dir(o) = root.get(b"o").unwrap().payload else {
            panic!()
        };
        let Payload::Dir(sub) = e.store.read_tree(&d).unwrap().get(b"sub").unwrap().payload else {
            panic!()
        };
        e.store.remove(&o).unwrap();
        e.store.remove(&sub).unwrap();
        std::fs::write(r.join("d/g"), b"G").unwrap();
        let (h, _) = capture(
            &e.store,
            e.upfd.as_fd(),
            Some(&b),
            &map(&[("d/g", Depth::Shallow), ("hl", Depth::Shallow)]),
        )
        .unwrap();
        let t = e.store.read_tree(&h).unwrap();
        assert_eq!(t.get(b"o"), root.get(b"o"));
        // A full capture writes the removed trees again, and agrees.
        check(
            &e,
            &b,
            bt,
            &[("d/g", Depth::Shallow), ("hl", Depth::Shallow)],
        );
        assert!(e.store.contains(&o) && e.store.contains(&sub));
    }

    /// Not run by default: the cost of an incremental capture in a large upper.
    /// `LAYERFS_BENCH_FILES=100000 cargo test --release -p layerfs --lib bench_incremental -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_incremental() {
        let n: usize = std::env::var("LAYERFS_BENCH_FILES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let state = tempfile::tempdir().unwrap();
        let sfd = sys::open_root(state.path()).unwrap();
        let store = ObjectStore::open(sfd.as_fd()).unwrap();
        let up = tempfile::tempdir().unwrap();
        let upfd = sys::open_root(up.path()).unwrap();
        let t0 = std::time::Instant::now();
        let per_dir = 100;
        for i in 0..n {
            let d = up
                .path()
                .join(format!("a{}/b{}", i / (per_dir * 50), i / per_dir));
            if i % per_dir == 0 {
                std::fs::create_dir_all(&d).unwrap();
            }
            std::fs::write(
                d.join(format!("f{i}")),
                format!("file {i}").repeat(1 + i % 512),
            )
            .unwrap();
        }
        eprintln!("created {n} files in {:?}", t0.elapsed());
        let t0 = std::time::Instant::now();
        let (b, s) = capture(&store, upfd.as_fd(), None, &BTreeMap::new()).unwrap();
        eprintln!("full capture: {:?} {s:?}", t0.elapsed());
        let mut dirty = BTreeMap::new();
        for k in 0..1000 {
            let i = (k * 7919) % n;
            let rel = format!("a{}/b{}/f{i}", i / (per_dir * 50), i / per_dir);
            std::fs::write(up.path().join(&rel), format!("changed {k}").repeat(100)).unwrap();
            dirty.insert(rel.into_bytes(), Depth::Shallow);
        }
        let t0 = std::time::Instant::now();
        let (h, s) = capture(&store, upfd.as_fd(), Some(&b), &dirty).unwrap();
        let el = t0.elapsed();
        eprintln!("incremental capture of 1000 changed files: {el:?} {s:?}");
        let (f, _) = capture(&store, upfd.as_fd(), None, &BTreeMap::new()).unwrap();
        assert_eq!(h, f);
    }
}
