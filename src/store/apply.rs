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
use crate::layers::{join, remove_tree, split_last};
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
        root: root.clone(),
        links: HashMap::new(),
        building: None,
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
        // syncfs needs a real descriptor, not an O_PATH one.
        let fd = sys::openat(
            root.as_fd(),
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        sys::syncfs(fd.as_fd())?;
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
    root: Arc<OwnedFd>,
    /// First object materialised in this run for each hard-link group: its
    /// final path and its entry. A path, not a descriptor: a restore with
    /// many groups must not run out of descriptors.
    links: HashMap<u64, (Vec<u8>, Entry)>,
    /// The object being built in work: its final path and its scratch name
    /// (link sources below it are found there until it is renamed).
    building: Option<(Vec<u8>, Vec<u8>)>,
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
        let tmp_buf = tmp_name();
        let tmp = OsStr::from_bytes(&tmp_buf);
        self.building = Some((path.to_vec(), tmp_buf.clone()));
        let placed = self
            .build(work.as_fd(), tmp, path, t)
            .and_then(|()| put_in_place(work.as_fd(), tmp, dir.as_fd(), name, t, actual));
        self.building = None;
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
        }
        debug!(path = %String::from_utf8_lossy(path), "placed");
        Ok(())
    }

    /// Create `t` (final path `path`) as `name` in `d`, a scratch place,
    /// with everything below it.
    fn build(&mut self, d: BorrowedFd<'_>, name: &OsStr, path: &[u8], t: &Entry) -> io::Result<()> {
        fault_point()?;
        self.changed.push(path.to_vec());
        if self.link_to_group(d, name, t)? {
            return Ok(());
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
                let sub = open_dir(d, name)?;
                let tree = self.store.read_tree(h)?;
                for child in &tree.entries {
                    let cpath = join(path, &child.name);
                    self.build(sub.as_fd(), OsStr::from_bytes(&child.name), &cpath, child)
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
        if t.link != 0 && !t.is_dir() {
            self.links
                .entry(t.link)
                .or_insert_with(|| (path.to_vec(), t.clone()));
        }
        Ok(())
    }

    /// Make `name` in `d` a hard link to the member of `t`'s link group
    /// built earlier in this run, if any and if the tree agrees it is the
    /// same file. False: build a copy.
    fn link_to_group(&self, d: BorrowedFd<'_>, name: &OsStr, t: &Entry) -> io::Result<bool> {
        if t.link == 0 || t.is_dir() {
            return Ok(false);
        }
        let Some((lp, le)) = self.links.get(&t.link) else {
            return Ok(false);
        };
        if !same_object(le, t) {
            return Ok(false);
        }
        // The first member went away or has too many links: a copy then.
        let fallback = |e: &io::Error| {
            is_errno(e, libc::ENOENT) || is_errno(e, libc::ENOTDIR) || is_errno(e, libc::EMLINK)
        };
        let (ld, ln) = match self.link_source(lp) {
            Ok(s) => s,
            Err(e) if fallback(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        match sys::linkat(ld.as_fd(), OsStr::from_bytes(&ln), d, name) {
            Ok(()) => Ok(true),
            Err(e) if fallback(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Where the object built for final path `path` is now: its directory
    /// and name, below the object under construction in work or in the upper.
    fn link_source(&self, path: &[u8]) -> io::Result<(OwnedFd, Vec<u8>)> {
        let (mut dir, rest) = match &self.building {
            Some((top, tmp)) if path == top.as_slice() => {
                return Ok((open_dir(self.work.as_fd(), OsStr::new("."))?, tmp.clone()));
            }
            Some((top, tmp)) if path.starts_with(top) && path.get(top.len()) == Some(&b'/') => (
                open_dir(self.work.as_fd(), OsStr::from_bytes(tmp))?,
                &path[top.len() + 1..],
            ),
            _ => (open_dir(self.root.as_fd(), OsStr::new("."))?, path),
        };
        let (parent, name) = split_last(rest);
        for c in parent.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            dir = open_dir(dir.as_fd(), OsStr::from_bytes(c))?;
        }
        Ok((dir, name.to_vec()))
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
        // Below an ancestor created for this path (now or by an earlier run).
        let mut fresh = false;
        for (i, comp) in ancestors.iter().enumerate() {
            let oname = OsStr::from_bytes(comp);
            let here = join(&path, comp);
            let actual = stat_opt(dir.as_fd(), oname).map_err(|e| at_path(&here, e))?;
            let real_dir = actual.as_ref().is_some_and(st_is_dir);
            let cur_entry = cur.as_ref().map(|c| c.get(comp));
            // A directory here now but not in `current`: an interrupted
            // earlier run created it (and whatever is below it on the path),
            // so its times are still to be set.
            fresh |= real_dir
                && in_target
                && matches!(cur_entry, Some(c) if !c.is_some_and(|c| c.is_dir()));
            if real_dir && fresh {
                created.push((dir.clone(), comp.clone(), tents[i].clone()));
            }
            if !real_dir {
                if !in_target {
                    // Nothing of the path in the upper, none in the target.
                    return Ok(());
                }
                self.place_empty_dir(&dir, oname, &here, &tents[i], actual.as_ref())
                    .map_err(|e| at_path(&here, e))?;
                created.push((dir.clone(), comp.clone(), tents[i].clone()));
                fresh = true;
            }
            let cur_sub = match cur_entry.flatten() {
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
    use crate::store::capture::capture;
    use crate::store::diff::{diff, kind_name, lookup, ChangeKind};
    use std::collections::BTreeMap;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

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

    /// An upper, its workdir/work and an object store, all on one filesystem.
    struct Fx {
        dir: tempfile::TempDir,
        upper: OwnedFd,
        work: OwnedFd,
        store: ObjectStore,
    }

    impl Fx {
        fn new() -> Fx {
            let dir = tempfile::tempdir().unwrap();
            for d in ["upper", "workdir", "workdir/work", "state"] {
                std::fs::create_dir(dir.path().join(d)).unwrap();
            }
            let upper = sys::open_root(&dir.path().join("upper")).unwrap();
            let work = sys::open_root(&dir.path().join("workdir/work")).unwrap();
            let state = sys::open_root(&dir.path().join("state")).unwrap();
            let store = ObjectStore::open(state.as_fd()).unwrap();
            Fx {
                dir,
                upper,
                work,
                store,
            }
        }

        fn p(&self, rel: &str) -> PathBuf {
            self.dir.path().join("upper").join(rel)
        }

        /// Parent directory descriptor and last component of `rel`.
        fn at(&self, rel: &str) -> (OwnedFd, PathBuf) {
            let p = self.p(rel);
            let fd = sys::open_root(p.parent().unwrap()).unwrap();
            (fd, PathBuf::from(p.file_name().unwrap()))
        }

        fn capture(&self) -> Hash {
            capture(&self.store, self.upper.as_fd(), None, &BTreeMap::new())
                .unwrap()
                .0
        }

        fn try_apply(
            &self,
            cur: Option<&Hash>,
            tgt: &Hash,
            only: Option<&[&str]>,
        ) -> io::Result<Vec<Vec<u8>>> {
            let only: Option<Vec<Vec<u8>>> =
                only.map(|o| o.iter().map(|s| s.as_bytes().to_vec()).collect());
            apply(
                &self.store,
                self.upper.as_fd(),
                self.work.as_fd(),
                cur,
                tgt,
                only.as_deref(),
                &ApplyOptions { sync: true },
            )
        }

        fn apply(&self, cur: Option<&Hash>, tgt: &Hash, only: Option<&[&str]>) -> Vec<String> {
            let changed = self.try_apply(cur, tgt, only).unwrap();
            assert!(self.work_is_empty(), "scratch objects left in work");
            let mut sorted = changed.clone();
            sorted.sort();
            assert_eq!(changed, sorted);
            changed
                .into_iter()
                .map(|p| String::from_utf8(p).unwrap())
                .collect()
        }

        fn work_is_empty(&self) -> bool {
            sys::read_dir_all(self.work.as_fd()).unwrap().is_empty()
        }

        fn write(&self, rel: &str, data: &[u8]) {
            std::fs::write(self.p(rel), data).unwrap();
        }
        fn mkdir(&self, rel: &str) {
            std::fs::create_dir(self.p(rel)).unwrap();
        }
        fn symlink(&self, target: &str, rel: &str) {
            symlink(target, self.p(rel)).unwrap();
        }
        fn link(&self, old: &str, new: &str) {
            std::fs::hard_link(self.p(old), self.p(new)).unwrap();
        }
        fn rm(&self, rel: &str) {
            let p = self.p(rel);
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                std::fs::remove_dir_all(p).unwrap();
            } else {
                std::fs::remove_file(p).unwrap();
            }
        }
        fn chmod(&self, rel: &str, mode: u32) {
            std::fs::set_permissions(self.p(rel), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        fn chown(&self, rel: &str, uid: u32, gid: u32) {
            let (fd, n) = self.at(rel);
            sys::fchownat(fd.as_fd(), n.as_os_str(), uid, gid).unwrap();
        }
        fn mknod(&self, rel: &str, mode: u32, rdev: u64) {
            let (fd, n) = self.at(rel);
            sys::mknodat(fd.as_fd(), n.as_os_str(), mode, rdev).unwrap();
        }
        fn setx(&self, rel: &str, name: &[u8], val: &[u8]) {
            let (fd, n) = self.at(rel);
            sys::lsetxattr(fd.as_fd(), Some(n.as_os_str()), name, val, 0).unwrap();
        }
        fn rmx(&self, rel: &str, name: &[u8]) {
            let (fd, n) = self.at(rel);
            sys::lremovexattr(fd.as_fd(), Some(n.as_os_str()), name).unwrap();
        }
        fn utime(&self, rel: &str, a: (i64, i64), m: (i64, i64)) {
            let (fd, n) = self.at(rel);
            sys::utimensat(
                fd.as_fd(),
                n.as_os_str(),
                TimeSpec::At(a.0, a.1),
                TimeSpec::At(m.0, m.1),
            )
            .unwrap();
        }
        fn ino(&self, rel: &str) -> u64 {
            std::fs::symlink_metadata(self.p(rel)).unwrap().ino()
        }

        /// Panic with the differences unless the upper's capture is `want`.
        fn assert_upper_is(&self, want: &Hash, what: &str) {
            let got = self.capture();
            if got != *want {
                panic!("{what}: upper differs:\n{}", self.describe(want, &got));
            }
        }

        fn describe(&self, want: &Hash, got: &Hash) -> String {
            let mut s = String::new();
            for c in diff(&self.store, Some(want), got).unwrap() {
                s += &format!(
                    "  {:?} {} ({})\n    want {:?}\n    got  {:?}\n",
                    c.kind,
                    String::from_utf8_lossy(&c.path),
                    kind_name(c.new.as_ref().or(c.old.as_ref()).unwrap()),
                    c.old,
                    c.new
                );
            }
            s
        }

        /// The tree with hard-link groups renumbered in walk order: equal
        /// for two uppers with the same files linked the same way, whatever
        /// their inode numbers.
        fn canon(&self, h: &Hash) -> Hash {
            fn walk(s: &ObjectStore, h: &Hash, map: &mut HashMap<u64, u64>) -> Hash {
                let mut t = s.read_tree(h).unwrap();
                for e in &mut t.entries {
                    if e.link != 0 {
                        let n = map.len() as u64 + 1;
                        e.link = *map.entry(e.link).or_insert(n);
                    }
                    if let Payload::Dir(sub) = &e.payload {
                        e.payload = Payload::Dir(walk(s, sub, map));
                    }
                }
                s.write_tree(&t).unwrap()
            }
            walk(&self.store, h, &mut HashMap::new())
        }
    }

    const ACL_USER_OBJ: u16 = 0x01;
    const ACL_USER: u16 = 0x02;
    const ACL_GROUP_OBJ: u16 = 0x04;
    const ACL_MASK: u16 = 0x10;
    const ACL_OTHER: u16 = 0x20;

    /// A POSIX ACL as the kernel stores it in system.posix_acl_* (little-endian).
    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    /// State A: every kind of object the upper can hold.
    fn build_a(fx: &Fx) {
        fx.write("f1", b"hello");
        fx.setx("f1", b"user.a", b"1");
        let big = std::fs::File::create(fx.p("big")).unwrap();
        big.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&big, b"tail", 1 << 20).unwrap();
        drop(big);
        fx.write("suid", b"#!/bin/sh\n");
        fx.chown("suid", 1000, 1000);
        fx.chmod("suid", 0o4755);
        fx.mkdir("d");
        fx.write("d/x", b"x");
        fx.mkdir("d/sub");
        fx.write("d/sub/y", b"y");
        fx.mkdir("d/sub/deep");
        fx.write("d/sub/deep/z", b"z");
        fx.symlink("d/x", "l");
        fx.chown("l", 1000, 1001);
        fx.mknod("p", libc::S_IFIFO | 0o640, 0);
        fx.mknod("wh", libc::S_IFCHR, 0);
        fx.mknod("cdev", libc::S_IFCHR | 0o600, 0);
        fx.setx("cdev", crate::whiteout::XATTR_CHARDEV, b"y");
        fx.mknod("blk", libc::S_IFBLK | 0o660, sys::makedev(7, 3));
        fx.mknod("sock", libc::S_IFSOCK | 0o600, 0);
        fx.mkdir("o");
        fx.setx("o", crate::whiteout::XATTR_OPAQUE, b"y");
        fx.write("o/inner", b"i");
        fx.mkdir("r");
        fx.setx("r", crate::whiteout::XATTR_REDIRECT, b"/lower/r");
        fx.write("h1", b"linked");
        fx.link("h1", "d/h2");
        fx.mkdir("acl");
        fx.mkdir("acl/sub");
        let def = acl(&[
            (ACL_USER_OBJ, 7, u32::MAX),
            (ACL_USER, 5, 1000),
            (ACL_GROUP_OBJ, 5, u32::MAX),
            (ACL_MASK, 5, u32::MAX),
            (ACL_OTHER, 0, u32::MAX),
        ]);
        fx.setx("acl", b"system.posix_acl_default", &def);
        fx.write("acl/f", b"inherits the default ACL");
        fx.write("aclf", b"a");
        fx.setx(
            "aclf",
            b"system.posix_acl_access",
            &acl(&[
                (ACL_USER_OBJ, 6, u32::MAX),
                (ACL_USER, 4, 1000),
                (ACL_GROUP_OBJ, 4, u32::MAX),
                (ACL_MASK, 4, u32::MAX),
                (ACL_OTHER, 4, u32::MAX),
            ]),
        );
        fx.mkdir("empty");
        fx.chmod("empty", 0o1777);
        fx.write("times", b"t");
        fx.utime("times", (1000, 5), (2000, 7));
        fx.utime("d/sub", (3000, 1), (4000, 2));
    }

    /// From A to B: modify, delete, add, chmod/chown, kind changes, xattrs.
    fn mutate_to_b(fx: &Fx) {
        fx.write("f1", b"changed content");
        fx.chmod("f1", 0o600);
        fx.rmx("f1", b"user.a");
        fx.setx("f1", b"user.c", b"3");
        fx.rm("d/sub");
        fx.write("n1", b"new");
        fx.mkdir("nd");
        fx.write("nd/a", b"a");
        fx.mkdir("nd/b");
        fx.symlink("x", "nd/b/c");
        fx.rm("big");
        fx.mkdir("big");
        fx.write("big/inner", b"in");
        fx.rm("o");
        fx.write("o", b"now a file");
        fx.setx("d", b"user.b", b"2");
        fx.rmx("r", crate::whiteout::XATTR_REDIRECT);
        fx.setx("r", crate::whiteout::XATTR_OPAQUE, b"y");
        fx.rm("l");
        fx.symlink("elsewhere", "l");
        fx.rm("wh");
        fx.mknod("d/wh2", libc::S_IFCHR, 0);
        fx.chown("suid", 0, 0);
        fx.rm("p");
        fx.write("p", b"a fifo became a file");
        fx.rm("acl/sub");
        fx.rmx("aclf", b"system.posix_acl_access");
        fx.chmod("aclf", 0o644);
        fx.rmx("cdev", crate::whiteout::XATTR_CHARDEV);
        fx.rm("blk");
        fx.mkdir("blk");
        fx.chmod("empty", 0o700);
        fx.utime("times", (5000, 0), (6000, 0));
    }

    fn setup() -> (Fx, Hash, Hash) {
        let fx = Fx::new();
        build_a(&fx);
        let a = fx.capture();
        mutate_to_b(&fx);
        let b = fx.capture();
        assert_ne!(a, b);
        (fx, a, b)
    }

    #[test]
    fn rollback_and_roll_forward_are_exact() {
        let (fx, a, b) = setup();
        let h1 = fx.ino("h1");
        let changed = fx.apply(Some(&b), &a, None);
        fx.assert_upper_is(&a, "rollback to A");
        for p in [
            "f1",
            "d",
            "d/sub",
            "d/sub/deep/z",
            "nd",
            "big",
            "o",
            "wh",
            "d/wh2",
        ] {
            assert!(changed.iter().any(|c| c == p), "{p} not reported");
        }
        // Untouched objects are not rewritten: the hard-link pair keeps its inode.
        assert!(!changed.iter().any(|c| c == "h1" || c == "d/h2"));
        assert_eq!(fx.ino("h1"), h1);
        assert_eq!(fx.ino("d/h2"), h1);
        // The rebuilt directory under a default ACL did not keep what it inherited.
        let sub = lookup(&fx.store, &a, b"acl/sub").unwrap().unwrap();
        assert!(sub.xattrs.is_empty());
        let m = std::fs::metadata(fx.p("suid")).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o4755, 1000));

        let changed = fx.apply(Some(&a), &b, None);
        fx.assert_upper_is(&b, "roll forward to B");
        assert!(changed.iter().any(|c| c == "nd/b/c"));
        // And back again, without fsync this time.
        apply(
            &fx.store,
            fx.upper.as_fd(),
            fx.work.as_fd(),
            Some(&b),
            &a,
            None,
            &ApplyOptions { sync: false },
        )
        .unwrap();
        fx.assert_upper_is(&a, "second rollback");
    }

    #[test]
    fn apply_is_idempotent() {
        let (fx, a, b) = setup();
        fx.apply(Some(&b), &a, None);
        // Run again with the same arguments, as after a crash at the very end.
        fx.apply(Some(&b), &a, None);
        fx.assert_upper_is(&a, "second run");
        // Equal trees: nothing to do, nothing reported.
        assert!(fx.apply(Some(&a), &a, None).is_empty());
        fx.assert_upper_is(&a, "no-op");
    }

    #[test]
    fn half_done_then_full() {
        let (fx, a, b) = setup();
        // A crash after part of the work: these paths are already at A.
        fx.apply(Some(&b), &a, Some(&["d", "big", "o/inner", "nd"]));
        fx.apply(Some(&b), &a, None);
        fx.assert_upper_is(&a, "after a partial run");
    }

    #[test]
    fn crash_at_every_step_then_rerun() {
        let mut n = 1;
        loop {
            let (fx, a, b) = setup();
            FAIL_AT.with(|c| c.set(n));
            let r = fx.try_apply(Some(&b), &a, None);
            FAIL_AT.with(|c| c.set(0));
            match r {
                Ok(_) => {
                    fx.assert_upper_is(&a, "run without a fault");
                    break;
                }
                Err(e) => assert!(e.to_string().contains("injected fault"), "{e}"),
            }
            // The next mount cleans workdir/work; then the caller runs it again.
            for e in sys::read_dir_all(fx.work.as_fd()).unwrap() {
                remove_tree(fx.work.as_fd(), OsStr::from_bytes(&e.name)).unwrap();
            }
            fx.apply(Some(&b), &a, None);
            fx.assert_upper_is(&a, &format!("re-run after a fault at point {n}"));
            n += 1;
        }
        eprintln!("{n} fault points");
        assert!(n > 40, "only {n} fault points were reached");
    }

    #[test]
    fn unknown_current_compares_with_the_upper() {
        let (fx, a, b) = setup();
        // Nothing known: every directory is listed, extra names go.
        fx.apply(None, &a, None);
        // Everything was rebuilt, so the hard-link pair has a new inode:
        // equal up to link numbering, and still one file.
        assert_eq!(fx.canon(&fx.capture()), fx.canon(&a));
        assert_eq!(fx.ino("h1"), fx.ino("d/h2"));
        fx.apply(None, &b, None);
        assert_eq!(fx.canon(&fx.capture()), fx.canon(&b));
    }

    #[test]
    fn hard_links_rebuilt_together() {
        let fx = Fx::new();
        fx.mkdir("d");
        fx.write("g1", b"group");
        fx.link("g1", "d/g2");
        fx.link("g1", "d/g3");
        fx.write("solo", b"s");
        // A group inside a directory that the rollback builds in work.
        fx.mkdir("hd");
        fx.mkdir("hd/in");
        fx.write("hd/a", b"in a new dir");
        fx.link("hd/a", "hd/in/b");
        fx.link("hd/a", "top");
        let a = fx.capture();
        // Break the group: g1 replaced by a new file, d/g3 removed.
        fx.write("new", b"other");
        std::fs::rename(fx.p("new"), fx.p("g1")).unwrap();
        fx.rm("d/g3");
        fx.link("solo", "d/solo2");
        fx.rm("hd");
        fx.rm("top");
        let b = fx.capture();
        fx.apply(Some(&b), &a, None);
        assert_eq!(fx.ino("g1"), fx.ino("d/g2"));
        assert_eq!(fx.ino("g1"), fx.ino("d/g3"));
        assert_ne!(fx.ino("g1"), fx.ino("solo"));
        assert_eq!(fx.ino("hd/a"), fx.ino("hd/in/b"));
        assert_eq!(fx.ino("hd/a"), fx.ino("top"));
        assert_eq!(std::fs::metadata(fx.p("g1")).unwrap().nlink(), 3);
        assert!(!fx.p("d/solo2").exists());
        // Link numbers are inode numbers: equal once renumbered.
        let got = fx.capture();
        assert_eq!(fx.canon(&got), fx.canon(&a), "{}", fx.describe(&a, &got));
        // (Read only now: reading moves the atime, relatime.)
        assert_eq!(std::fs::read(fx.p("d/g3")).unwrap(), b"group");
        fx.apply(Some(&got), &b, None);
        assert_eq!(fx.canon(&fx.capture()), fx.canon(&b));
        assert_eq!(fx.ino("solo"), fx.ino("d/solo2"));
    }

    #[test]
    fn restore_one_file() {
        let (fx, a, b) = setup();
        let changed = fx.apply(Some(&b), &a, Some(&["f1"]));
        assert_eq!(changed, vec!["f1"]);
        let after = fx.capture();
        assert_eq!(
            lookup(&fx.store, &after, b"f1").unwrap(),
            lookup(&fx.store, &a, b"f1").unwrap()
        );
        let rest: Vec<_> = diff(&fx.store, Some(&b), &after).unwrap();
        assert_eq!(rest.len(), 1, "{}", fx.describe(&b, &after));
        assert_eq!(rest[0].path, b"f1");
        assert_eq!(std::fs::read(fx.p("f1")).unwrap(), b"hello");
    }

    #[test]
    fn restore_one_subtree() {
        let (fx, a, b) = setup();
        let changed = fx.apply(Some(&b), &a, Some(&["d"]));
        assert!(changed.iter().all(|c| c.starts_with('d')));
        let after = fx.capture();
        assert_eq!(
            lookup(&fx.store, &after, b"d").unwrap(),
            lookup(&fx.store, &a, b"d").unwrap()
        );
        for c in diff(&fx.store, Some(&b), &after).unwrap() {
            assert!(c.path == b"d" || c.path.starts_with(b"d/"), "{c:?}");
        }
        // Nothing known about the upper: same result.
        let (fx, a, _) = setup();
        fx.apply(None, &a, Some(&["d"]));
        let after = fx.capture();
        assert_eq!(
            lookup(&fx.store, &after, b"d/sub").unwrap(),
            lookup(&fx.store, &a, b"d/sub").unwrap()
        );
        assert!(!fx.p("d/wh2").exists());
    }

    #[test]
    fn restore_creates_missing_ancestors() {
        let (fx, a, b) = setup();
        let changed = fx.apply(Some(&b), &a, Some(&ANCESTOR_PATHS));
        assert_eq!(
            changed,
            vec!["d/sub", "d/sub/deep", "d/sub/deep/z", "o", "o/inner"]
        );
        check_ancestors_restored(&fx, &a, &b);
    }

    const ANCESTOR_PATHS: [&str; 2] = ["d/sub/deep/z", "o/inner"];

    fn check_ancestors_restored(fx: &Fx, a: &Hash, b: &Hash) {
        let (a, b) = (*a, *b);
        let after = fx.capture();
        for p in ["d/sub/deep/z", "o/inner"] {
            assert_eq!(
                lookup(&fx.store, &after, p.as_bytes()).unwrap(),
                lookup(&fx.store, &a, p.as_bytes()).unwrap()
            );
        }
        // Created ancestors carry the target's metadata (times, opaque
        // xattr...), but only the restored path below them.
        for p in ["d/sub", "d/sub/deep", "o"] {
            let mut got = lookup(&fx.store, &after, p.as_bytes()).unwrap().unwrap();
            let want = lookup(&fx.store, &a, p.as_bytes()).unwrap().unwrap();
            got.payload = want.payload.clone();
            got.size = want.size;
            assert_eq!(got, want, "{p}");
        }
        assert!(!fx.p("d/sub/y").exists());
        assert_eq!(
            kind_name(&lookup(&fx.store, &after, b"o").unwrap().unwrap()),
            "dir"
        );
        // Everything else is still B.
        for c in diff(&fx.store, Some(&b), &after).unwrap() {
            let p = String::from_utf8(c.path.clone()).unwrap();
            assert!(
                p == "d" || p.starts_with("d/sub") || p == "o" || p.starts_with("o/"),
                "{p} changed"
            );
            if p == "d" {
                assert_eq!(c.kind, ChangeKind::Modified);
            }
        }
    }

    #[test]
    fn restore_with_ancestors_after_a_crash_at_every_step() {
        let mut n = 1;
        loop {
            let (fx, a, b) = setup();
            FAIL_AT.with(|c| c.set(n));
            let r = fx.try_apply(Some(&b), &a, Some(&ANCESTOR_PATHS));
            FAIL_AT.with(|c| c.set(0));
            if r.is_ok() {
                check_ancestors_restored(&fx, &a, &b);
                break;
            }
            fx.apply(Some(&b), &a, Some(&ANCESTOR_PATHS));
            check_ancestors_restored(&fx, &a, &b);
            n += 1;
        }
        assert!(n > 10, "only {n} fault points were reached");
    }

    #[test]
    fn restore_of_a_path_absent_from_the_target_removes_it() {
        let (fx, a, b) = setup();
        let changed = fx.apply(Some(&b), &a, Some(&["n1", "nd/b/c", "missing/x"]));
        assert_eq!(changed, vec!["n1", "nd/b/c"]);
        assert!(!fx.p("n1").exists());
        assert!(fx.p("nd/b").is_dir());
        assert!(fx.p("nd/b/c").symlink_metadata().is_err());
        assert!(!fx.p("missing").exists());
        // Paths equal in both trees are left alone.
        assert!(fx.apply(Some(&b), &a, Some(&["h1", "d/x"])).is_empty());
    }

    #[test]
    fn no_path_string_escapes_the_upper() {
        // A symlink in the upper pointing outside must never be followed.
        let fx = Fx::new();
        let outside = fx.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        fx.mkdir("d");
        fx.write("d/f", b"inside");
        let a = fx.capture();
        fx.rm("d");
        fx.symlink(outside.to_str().unwrap(), "d");
        let b = fx.capture();
        fx.apply(Some(&b), &a, Some(&["d/f"]));
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert!(fx.p("d").symlink_metadata().unwrap().is_dir());
        assert_eq!(std::fs::read(fx.p("d/f")).unwrap(), b"inside");
    }
}
