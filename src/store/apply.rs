//! Applying a stored tree onto the upper layer: rollback, restore, roll forward.
//!
//! Only what differs between `current` (what the upper was known to hold) and
//! `target` is visited; subtrees with equal hashes are never read.
//!
//! Every new object (with everything below it, for a new directory) is built
//! in `workdir/work` under a scratch name, complete with data, owner, xattrs,
//! mode and times, then renamed into place: a crash leaves the old object or
//! the new one, never a half-built one. A directory that stays a directory is
//! updated in place, its times last because changing its children moves them.
//!
//! Idempotence: each visited path is made equal to the target by looking at
//! what the upper actually holds there (absent, directory, other), not at what
//! `current` says, so a second run after a crash finishes the job. Where the
//! state of a directory is unknown (no `current`, or the directory was not one
//! in `current`), its real listing is read and compared with the target.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{debug, warn};

use super::diff::{dir_hash, merge};
use super::objects::ObjectStore;
use super::tree::{Entry, Hash, Payload, Tree};
use crate::copyup::copy_data;
use crate::layers::{join, remove_tree};
use crate::sys::{self, Stat, TimeSpec};

#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// fsync every new object before it is renamed into place, and the
    /// upper's filesystem at the end.
    pub sync: bool,
}

/// Make the upper layer (`upper`: directory descriptor of the upper root)
/// equal to root tree `target`.
///
/// `current`: a root tree the upper was known to equal (captured just before);
/// only paths where it differs from `target` are touched. None: nothing is
/// known, every directory's real listing is compared with the target and every
/// non-directory is rebuilt.
/// `only`: restrict to these paths (relative, no leading '/') and what is below
/// them; missing ancestor directories are created from the target's entries.
/// `work`: a directory on the upper's filesystem (the overlay's workdir/work).
///
/// Returns the paths changed, sorted (parents before children). A removed or
/// replaced directory is listed alone (its former contents were below it); a
/// new directory is listed with everything created below it.
///
/// Idempotent: after a crash, running it again with the same arguments
/// finishes the job. The root directory's own metadata is not in a tree and
/// is left alone.
pub fn apply(
    store: &ObjectStore,
    upper: BorrowedFd<'_>,
    work: BorrowedFd<'_>,
    current: Option<&Hash>,
    target: &Hash,
    only: Option<&[Vec<u8>]>,
    opts: &ApplyOptions,
) -> io::Result<Vec<Vec<u8>>> {
    let root = Arc::new(open_dir(upper, OsStr::new("."))?);
    let work = Arc::new(open_dir(work, OsStr::new("."))?);
    let mut cx = Applier {
        store,
        work,
        sync: opts.sync,
        links: HashMap::new(),
        changed: Vec::new(),
    };
    if current != Some(target) {
        let tgt = store.read_tree(target)?;
        let cur = current.map(|h| store.read_tree(h)).transpose()?;
        match only.map(normalize_only).transpose()? {
            None | Some(None) => cx.sync_dir(&root, b"", cur.as_ref(), &tgt)?,
            Some(Some(paths)) => {
                for p in paths {
                    cx.sync_path(&root, &p, cur.as_ref(), &tgt)?;
                }
            }
        }
    }
    if opts.sync {
        sys::syncfs(root.as_fd())?;
    }
    let mut changed = cx.changed;
    changed.sort();
    changed.dedup();
    debug!(changed = changed.len(), "apply done");
    Ok(changed)
}

/// What `current` says about one name.
#[derive(Clone, Copy)]
enum Cur<'a> {
    Known(Option<&'a Entry>),
    Unknown,
}

struct Applier<'a> {
    store: &'a ObjectStore,
    work: Arc<OwnedFd>,
    sync: bool,
    /// First object materialised in this run for each hard-link group: its
    /// directory (descriptors follow renames), its name and its entry.
    links: HashMap<u64, (Arc<OwnedFd>, Vec<u8>, Entry)>,
    changed: Vec<Vec<u8>>,
}

/// Error with the path it happened at (added once, at the innermost level).
#[derive(Debug)]
struct AtPath {
    path: String,
    err: io::Error,
}

impl fmt::Display for AtPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "apply '{}': {}", self.path, self.err)
    }
}

impl std::error::Error for AtPath {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

fn at_path(path: &[u8], e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|r| r.is::<AtPath>()) {
        return e;
    }
    io::Error::new(
        e.kind(),
        AtPath {
            path: String::from_utf8_lossy(path).into_owned(),
            err: e,
        },
    )
}

fn is_errno(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

fn stat_opt(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Stat>> {
    match sys::fstatat(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn st_is_dir(st: &Stat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFDIR
}

fn tmp_name() -> Vec<u8> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("#lfapply{:x}-{:x}", sys::getpid(), n).into_bytes()
}

/// `only` as sorted component lists without duplicates or paths below another
/// one; None if one of them is the root (= everything).
fn normalize_only(paths: &[Vec<u8>]) -> io::Result<Option<Vec<Vec<Vec<u8>>>>> {
    let mut out: Vec<Vec<Vec<u8>>> = Vec::new();
    for p in paths {
        let comps: Vec<Vec<u8>> = p
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .map(|c| c.to_vec())
            .collect();
        for c in &comps {
            sys::check_name(OsStr::from_bytes(c))?;
        }
        if comps.is_empty() {
            return Ok(None);
        }
        out.push(comps);
    }
    out.sort();
    out.dedup();
    // Sorted component lists put a path right after its ancestors.
    let mut kept: Vec<Vec<Vec<u8>>> = Vec::new();
    for p in out {
        if kept.iter().any(|k| p.starts_with(k)) {
            continue;
        }
        kept.push(p);
    }
    Ok(Some(kept))
}

/// Equal but for the name: two entries of one hard-link group that agree.
fn same_object(a: &Entry, b: &Entry) -> bool {
    a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.atime == b.atime
        && a.mtime == b.mtime
        && a.size == b.size
        && a.rdev == b.rdev
        && a.xattrs == b.xattrs
        && a.payload == b.payload
}

impl Applier<'_> {
    /// Bring the children of directory `dir` (at `path`) to `tgt`. `cur`: its
    /// tree in `current`, or None if unknown (then the real listing is used).
    fn sync_dir(
        &mut self,
        dir: &Arc<OwnedFd>,
        path: &[u8],
        cur: Option<&Tree>,
        tgt: &Tree,
    ) -> io::Result<()> {
        match cur {
            Some(c) => {
                for (ce, te) in merge(&c.entries, &tgt.entries) {
                    if ce == te {
                        continue;
                    }
                    let name = match (ce, te) {
                        (_, Some(e)) | (Some(e), None) => &e.name,
                        (None, None) => continue,
                    };
                    self.sync_entry(dir, path, name, Cur::Known(ce), te)?;
                }
            }
            None => {
                let mut names: Vec<Vec<u8>> = sys::read_dir_all(dir.as_fd())
                    .map_err(|e| at_path(path, e))?
                    .into_iter()
                    .map(|d| d.name)
                    .collect();
                names.extend(tgt.entries.iter().map(|e| e.name.clone()));
                names.sort();
                names.dedup();
                for name in names {
                    self.sync_entry(dir, path, &name, Cur::Unknown, tgt.get(&name))?;
                }
            }
        }
        Ok(())
    }

    /// Make `name` in `dir` equal to `tgt` (None: absent), whatever it is now.
    fn sync_entry(
        &mut self,
        dir: &Arc<OwnedFd>,
        parent: &[u8],
        name: &[u8],
        cur: Cur<'_>,
        tgt: Option<&Entry>,
    ) -> io::Result<()> {
        let path = join(parent, name);
        self.sync_entry_inner(dir, &path, name, cur, tgt)
            .map_err(|e| at_path(&path, e))
    }

    fn sync_entry_inner(
        &mut self,
        dir: &Arc<OwnedFd>,
        path: &[u8],
        name: &[u8],
        cur: Cur<'_>,
        tgt: Option<&Entry>,
    ) -> io::Result<()> {
        fault_point()?;
        let oname = OsStr::from_bytes(name);
        let actual = stat_opt(dir.as_fd(), oname)?;
        let Some(t) = tgt else {
            if let Some(st) = actual {
                self.remove(dir.as_fd(), oname, &st)?;
                debug!(path = %String::from_utf8_lossy(path), "removed");
                self.changed.push(path.to_vec());
            }
            return Ok(());
        };
        match (dir_hash(t), actual) {
            (Some(th), Some(st)) if st_is_dir(&st) => {
                // A directory that stays one: children first, then its own
                // metadata (times last: child changes move them).
                let sub = Arc::new(open_dir(dir.as_fd(), oname)?);
                self.changed.push(path.to_vec());
                let sub_cur = match cur {
                    Cur::Known(Some(c)) => dir_hash(c),
                    _ => None,
                };
                if sub_cur != Some(th) {
                    let tt = self.store.read_tree(th)?;
                    let ct = sub_cur.map(|h| self.store.read_tree(h)).transpose()?;
                    self.sync_dir(&sub, path, ct.as_ref(), &tt)?;
                }
                set_meta(dir.as_fd(), oname, t)?;
            }
            _ => self.place_new(dir, oname, path, t, actual.as_ref())?,
        }
        Ok(())
    }

    /// Remove an object from the upper: a directory disappears at once (moved
    /// into work, then emptied there).
    fn remove(&mut self, dir: BorrowedFd<'_>, name: &OsStr, st: &Stat) -> io::Result<()> {
        if !st_is_dir(st) {
            return match sys::unlinkat(dir, name, false) {
                Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
                r => r,
            };
        }
        let tmp = tmp_name();
        let tmp = OsStr::from_bytes(&tmp);
        sys::renameat2(dir, name, self.work.as_fd(), tmp, sys::RENAME_NOREPLACE)?;
        fault_point()?;
        remove_tree(self.work.as_fd(), tmp)
    }

    /// Build `t` (with its subtree) in work, then rename it over whatever
    /// `name` in `dir` is now (`actual`).
    fn place_new(
        &mut self,
        dir: &Arc<OwnedFd>,
        name: &OsStr,
        path: &[u8],
        t: &Entry,
        actual: Option<&Stat>,
    ) -> io::Result<()> {
        let work = self.work.clone();
        let tmp = tmp_name();
        let tmp = OsStr::from_bytes(&tmp);
        let placed = self
            .build(&work, tmp, path, t, false)
            .and_then(|()| put_in_place(work.as_fd(), tmp, dir.as_fd(), name, t, actual));
        if let Err(e) = placed {
            if let Err(e2) = remove_tree(work.as_fd(), tmp) {
                if !is_errno(&e2, libc::ENOENT) {
                    warn!(err = %e2, "cannot remove a scratch object from workdir");
                }
            }
            return Err(e);
        }
        if t.is_dir() {
            // A directory moved to another parent may get its times touched
            // by some filesystems: set them again.
            set_times(dir.as_fd(), name, t)?;
        } else if t.link != 0 {
            self.links
                .entry(t.link)
                .or_insert_with(|| (dir.clone(), name.as_bytes().to_vec(), t.clone()));
        }
        debug!(path = %String::from_utf8_lossy(path), "placed");
        Ok(())
    }

    /// Create `t` as `name` in `dir` (a scratch place), with everything below
    /// it. `register`: record it as its hard-link group's first member here
    /// (not for scratch names, which are renamed afterwards).
    fn build(
        &mut self,
        dir: &Arc<OwnedFd>,
        name: &OsStr,
        path: &[u8],
        t: &Entry,
        register: bool,
    ) -> io::Result<()> {
        fault_point()?;
        let d = dir.as_fd();
        self.changed.push(path.to_vec());
        if t.link != 0 && !t.is_dir() {
            if let Some((ld, ln, le)) = self.links.get(&t.link) {
                if same_object(le, t) {
                    match sys::linkat(ld.as_fd(), OsStr::from_bytes(ln), d, name) {
                        Ok(()) => return Ok(()),
                        // The first member went away or has too many links: copy.
                        Err(e) if is_errno(&e, libc::ENOENT) || is_errno(&e, libc::EMLINK) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        match &t.payload {
            Payload::File(h) => {
                let f = sys::openat(
                    d,
                    name,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW,
                    0o600,
                )?;
                let src = self.store.open_object(h)?;
                let size = sys::fstat(src.as_fd())?.st_size as u64;
                if size != t.size {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("data object holds {size} bytes, the tree says {}", t.size),
                    ));
                }
                if size > 0 {
                    copy_data(src.as_fd(), f.as_fd(), size, self.sync)?;
                }
                set_meta(d, name, t)?;
                if self.sync {
                    sys::fsync(f.as_fd(), false)?;
                }
            }
            Payload::Dir(h) => {
                sys::mkdirat(d, name, 0o700)?;
                let sub = Arc::new(open_dir(d, name)?);
                let tree = self.store.read_tree(h)?;
                for child in &tree.entries {
                    let cpath = join(path, &child.name);
                    self.build(&sub, OsStr::from_bytes(&child.name), &cpath, child, true)
                        .map_err(|e| at_path(&cpath, e))?;
                }
                // After the children: a default ACL set earlier would be
                // inherited by them, and their creation moves the times.
                set_meta(d, name, t)?;
                if self.sync {
                    let fd = sys::openat(
                        d,
                        name,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )?;
                    sys::fsync(fd.as_fd(), false)?;
                }
            }
            Payload::Symlink(target) => {
                sys::symlinkat(OsStr::from_bytes(target), d, name)?;
                set_meta(d, name, t)?;
            }
            Payload::None => {
                // Devices, FIFOs, sockets, whiteouts (0/0 char devices).
                sys::mknodat(d, name, t.fmt() | 0o600, t.rdev)?;
                set_meta(d, name, t)?;
            }
        }
        if register && t.link != 0 && !t.is_dir() {
            self.links
                .entry(t.link)
                .or_insert_with(|| (dir.clone(), name.as_bytes().to_vec(), t.clone()));
        }
        Ok(())
    }

    /// `only` mode: bring one path (and what is below it) to the target,
    /// creating its missing ancestor directories from the target's entries.
    fn sync_path(
        &mut self,
        root: &Arc<OwnedFd>,
        comps: &[Vec<u8>],
        cur_root: Option<&Tree>,
        tgt_root: &Tree,
    ) -> io::Result<()> {
        let mut created: Vec<(Arc<OwnedFd>, Vec<u8>, Entry)> = Vec::new();
        let r = self.sync_path_inner(root, comps, cur_root, tgt_root, &mut created);
        // Times of created ancestors last, deepest first: creating their
        // children moved them. Also after a failure, as far as they exist.
        for (pdir, name, t) in created.iter().rev() {
            let s = set_times(pdir.as_fd(), OsStr::from_bytes(name), t);
            if r.is_ok() {
                s?;
            }
        }
        r
    }

    fn sync_path_inner(
        &mut self,
        root: &Arc<OwnedFd>,
        comps: &[Vec<u8>],
        cur_root: Option<&Tree>,
        tgt_root: &Tree,
        created: &mut Vec<(Arc<OwnedFd>, Vec<u8>, Entry)>,
    ) -> io::Result<()> {
        let Some((last, ancestors)) = comps.split_last() else {
            return Ok(());
        };
        // The target's entries along the path; shorter if the target does
        // not hold the path (then it is only removed from the upper, and no
        // ancestor is created for it).
        let mut tents: Vec<Entry> = Vec::with_capacity(comps.len());
        let mut level: Option<Tree> = None;
        for comp in comps {
            let Some(e) = level.as_ref().unwrap_or(tgt_root).get(comp).cloned() else {
                break;
            };
            let next = dir_hash(&e).copied();
            tents.push(e);
            if tents.len() == comps.len() {
                break;
            }
            match next {
                Some(h) => level = Some(self.store.read_tree(&h)?),
                None => break,
            }
        }
        let in_target = tents.len() == comps.len();

        let mut dir = root.clone();
        let mut path: Vec<u8> = Vec::new();
        // The directory's tree in `current`; None: unknown.
        let mut cur: Option<Tree> = cur_root.cloned();
        for (i, comp) in ancestors.iter().enumerate() {
            let oname = OsStr::from_bytes(comp);
            let here = join(&path, comp);
            let actual = stat_opt(dir.as_fd(), oname).map_err(|e| at_path(&here, e))?;
            let real_dir = actual.as_ref().is_some_and(st_is_dir);
            if !real_dir {
                if !in_target {
                    // Nothing of the path in the upper, none in the target.
                    return Ok(());
                }
                self.place_empty_dir(&dir, oname, &here, &tents[i], actual.as_ref())
                    .map_err(|e| at_path(&here, e))?;
                created.push((dir.clone(), comp.clone(), tents[i].clone()));
            }
            let cur_sub = match cur.as_ref().and_then(|c| c.get(comp)) {
                Some(c) if real_dir => dir_hash(c).copied(),
                _ => None,
            };
            cur = cur_sub.map(|h| self.store.read_tree(&h)).transpose()?;
            dir = Arc::new(open_dir(dir.as_fd(), oname).map_err(|e| at_path(&here, e))?);
            path = here;
        }
        let te = if in_target { tents.last() } else { None };
        let ce = match &cur {
            Some(c) => Cur::Known(c.get(last)),
            None => Cur::Unknown,
        };
        if let Cur::Known(c) = ce {
            if c == te {
                // The upper already holds the target here.
                return Ok(());
            }
        }
        self.sync_entry(&dir, &path, last, ce, te)
    }

    /// A missing ancestor for `only`: the target's directory without its
    /// children, built in work and renamed over whatever is there.
    fn place_empty_dir(
        &mut self,
        dir: &Arc<OwnedFd>,
        name: &OsStr,
        path: &[u8],
        t: &Entry,
        actual: Option<&Stat>,
    ) -> io::Result<()> {
        let work = self.work.clone();
        let tmp = tmp_name();
        let tmp = OsStr::from_bytes(&tmp);
        let placed = sys::mkdirat(work.as_fd(), tmp, 0o700)
            .and_then(|()| set_meta(work.as_fd(), tmp, t))
            .and_then(|()| put_in_place(work.as_fd(), tmp, dir.as_fd(), name, t, actual));
        if let Err(e) = placed {
            let _ = remove_tree(work.as_fd(), tmp);
            return Err(e);
        }
        self.changed.push(path.to_vec());
        Ok(())
    }
}

/// Rename the finished object `work/tmp` to `name` in `dir`. Over a
/// non-directory with a non-directory, a plain rename replaces it atomically;
/// a directory replacing a non-directory or the reverse is exchanged with it,
/// and the old object, now in work, is removed.
fn put_in_place(
    work: BorrowedFd<'_>,
    tmp: &OsStr,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    t: &Entry,
    actual: Option<&Stat>,
) -> io::Result<()> {
    let Some(st) = actual else {
        return sys::renameat2(work, tmp, dir, name, sys::RENAME_NOREPLACE);
    };
    if !st_is_dir(st) && !t.is_dir() {
        return sys::renameat2(work, tmp, dir, name, 0);
    }
    match sys::renameat2(work, tmp, dir, name, sys::RENAME_EXCHANGE) {
        Ok(()) => {}
        Err(e) if is_errno(&e, libc::EINVAL) || is_errno(&e, libc::ENOSYS) => {
            // No exchange on this filesystem: move the old object aside first.
            let old = tmp_name();
            let old = OsStr::from_bytes(&old);
            sys::renameat2(dir, name, work, old, sys::RENAME_NOREPLACE)?;
            sys::renameat2(work, tmp, dir, name, sys::RENAME_NOREPLACE)?;
            return remove_tree(work, old);
        }
        Err(e) => return Err(e),
    }
    // `tmp` now names the old object.
    fault_point()?;
    remove_tree(work, tmp)
}

#[cfg(test)]
thread_local! {
    /// Tests: the Nth fault point from now fails (0: none), as if the
    /// process had been killed there.
    static FAIL_AT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A place where a crash is simulated by the tests; nothing otherwise.
fn fault_point() -> io::Result<()> {
    #[cfg(test)]
    {
        let n = FAIL_AT.with(|c| c.get());
        if n > 0 {
            FAIL_AT.with(|c| c.set(n - 1));
            if n == 1 {
                return Err(io::Error::other("injected fault"));
            }
        }
    }
    Ok(())
}

/// Owner, xattrs, mode, times of `name` in `dir`, in that order: chown clears
/// setuid bits and security.capability; setting an ACL moves mode bits.
fn set_meta(dir: BorrowedFd<'_>, name: &OsStr, t: &Entry) -> io::Result<()> {
    sys::fchownat(dir, name, t.uid, t.gid)?;
    fault_point()?;
    set_xattrs(dir, name, &t.xattrs)?;
    fault_point()?;
    if t.fmt() != libc::S_IFLNK {
        let fd = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        sys::chmod_fd(fd.as_fd(), t.mode & 0o7777)?;
    }
    set_times(dir, name, t)
}

fn set_times(dir: BorrowedFd<'_>, name: &OsStr, t: &Entry) -> io::Result<()> {
    sys::utimensat(
        dir,
        name,
        TimeSpec::At(t.atime.0, i64::from(t.atime.1)),
        TimeSpec::At(t.mtime.0, i64::from(t.mtime.1)),
    )
}

/// Make the xattrs of `name` exactly `want`: set every listed one, remove the
/// others (also those a new object inherited, such as default ACLs).
fn set_xattrs(dir: BorrowedFd<'_>, name: &OsStr, want: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let have = match sys::llistxattr(dir, Some(name)) {
        Ok(h) => h,
        Err(e) if is_errno(&e, libc::ENOTSUP) && want.is_empty() => return Ok(()),
        Err(e) if is_errno(&e, libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e),
    };
    for n in have {
        if want.iter().any(|(w, _)| *w == n) {
            continue;
        }
        match sys::lremovexattr(dir, Some(name), &n) {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::ENODATA) => {}
            Err(e) if lsm_refused(&n, &e) => {
                warn!(attr = %String::from_utf8_lossy(&n), err = %e, "xattr not removed");
            }
            Err(e) => return Err(e),
        }
    }
    for (n, v) in want {
        match sys::lsetxattr(dir, Some(name), n, v, 0) {
            Ok(()) => {}
            Err(e) if lsm_refused(n, &e) => {
                warn!(attr = %String::from_utf8_lossy(n), err = %e, "xattr not restored");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// security.* labels may be refused by an LSM on the upper; the data is still
/// right, so keep going and say so (as copy-up does).
fn lsm_refused(attr: &[u8], e: &io::Error) -> bool {
    attr.starts_with(b"security.")
        && matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOTSUP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_normalized() {
        let n = normalize_only(&[
            b"a/b".to_vec(),
            b"/a/b/c".to_vec(),
            b"a/b".to_vec(),
            b"x//y/".to_vec(),
            b"a/bc".to_vec(),
        ])
        .unwrap()
        .unwrap();
        let v = |s: &[&str]| s.iter().map(|c| c.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(n, vec![v(&["a", "b"]), v(&["a", "bc"]), v(&["x", "y"])]);
        assert!(normalize_only(&[b"a/../b".to_vec()]).is_err());
        assert!(normalize_only(&[b"a".to_vec(), b"/".to_vec()])
            .unwrap()
            .is_none());
    }
}
