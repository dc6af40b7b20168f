//! Differences between two checkpoints (root trees).
//!
//! Trees are content-addressed, so two directories with the same tree hash
//! are equal below them and are skipped without being read: the cost of a
//! diff grows with what differs, not with the size of the upper layer.

use std::io;

use super::objects::ObjectStore;
use super::tree::{Entry, Hash, Payload, Tree};
use crate::layers::join;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct Change {
    /// Relative to the upper root, no leading '/' ("etc/hosts").
    pub path: Vec<u8>,
    pub kind: ChangeKind,
    /// The entry in the old tree (None for Added).
    pub old: Option<Entry>,
    /// The entry in the new tree (None for Deleted).
    pub new: Option<Entry>,
}

/// Differences from root tree `a` (None = empty) to root tree `b`.
///
/// Sorted by path as byte strings (so parents come before their children);
/// for one path a Deleted comes before an Added. Equal subtrees (same tree
/// hash) are skipped without reading them. An added or deleted directory is
/// reported with every entry below it. A directory whose own metadata differs
/// is Modified (its children are compared separately). A change of kind
/// (file -> dir, whiteout -> device, ...) is Deleted old + Added new.
pub fn diff(store: &ObjectStore, a: Option<&Hash>, b: &Hash) -> io::Result<Vec<Change>> {
    let mut out = Vec::new();
    if a == Some(b) {
        return Ok(out);
    }
    let ta = match a {
        Some(h) => store.read_tree(h)?,
        None => Tree::default(),
    };
    let tb = store.read_tree(b)?;
    diff_trees(store, b"", &ta, &tb, &mut out)?;
    // Stable: keeps Deleted before Added for one path.
    out.sort_by(|x, y| x.path.cmp(&y.path));
    Ok(out)
}

/// Entry at `path` (relative, '/'-separated) in root tree `root`; None if
/// absent or if `path` names the root itself (which has no entry).
pub fn lookup(store: &ObjectStore, root: &Hash, path: &[u8]) -> io::Result<Option<Entry>> {
    let comps: Vec<&[u8]> = path
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .collect();
    let Some((last, dirs)) = comps.split_last() else {
        return Ok(None);
    };
    let mut tree = store.read_tree(root)?;
    for c in dirs {
        let h = match tree.get(c).map(|e| &e.payload) {
            Some(Payload::Dir(h)) => *h,
            _ => return Ok(None),
        };
        tree = store.read_tree(&h)?;
    }
    Ok(tree.get(last).cloned())
}

/// Short name of an entry's kind, for listings and logs.
pub fn kind_name(e: &Entry) -> &'static str {
    match e.fmt() {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFCHR if e.is_whiteout() => "whiteout",
        libc::S_IFCHR | libc::S_IFBLK => "device",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        _ => "unknown",
    }
}

/// Merge-join two name-sorted entry lists: each name once, with its entry on
/// either side (None where absent).
pub(crate) fn merge<'a>(
    a: &'a [Entry],
    b: &'a [Entry],
) -> Vec<(Option<&'a Entry>, Option<&'a Entry>)> {
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let ord = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                out.push((Some(&a[i]), None));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push((None, Some(&b[j])));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push((Some(&a[i]), Some(&b[j])));
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// Hash of a directory entry's tree.
pub(crate) fn dir_hash(e: &Entry) -> Option<&Hash> {
    match &e.payload {
        Payload::Dir(h) => Some(h),
        _ => None,
    }
}

/// Equal as a user sees it, apart from the payload: access times move on
/// every read, and hard-link ids are inode numbers that a restore renews;
/// whether an entry is linked is what counts.
fn same_meta(a: &Entry, b: &Entry) -> bool {
    a.mode == b.mode
        && a.uid == b.uid
        && a.gid == b.gid
        && a.mtime == b.mtime
        && a.size == b.size
        && a.rdev == b.rdev
        && (a.link != 0) == (b.link != 0)
        && a.xattrs == b.xattrs
}

fn diff_trees(
    store: &ObjectStore,
    prefix: &[u8],
    ta: &Tree,
    tb: &Tree,
    out: &mut Vec<Change>,
) -> io::Result<()> {
    for (ea, eb) in merge(&ta.entries, &tb.entries) {
        match (ea, eb) {
            (Some(a), None) => whole(store, prefix, a, ChangeKind::Deleted, out)?,
            (None, Some(b)) => whole(store, prefix, b, ChangeKind::Added, out)?,
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) if kind_name(a) != kind_name(b) => {
                whole(store, prefix, a, ChangeKind::Deleted, out)?;
                whole(store, prefix, b, ChangeKind::Added, out)?;
            }
            (Some(a), Some(b)) => {
                let path = join(prefix, &a.name);
                match (dir_hash(a), dir_hash(b)) {
                    (Some(ha), Some(hb)) => {
                        if !same_meta(a, b) {
                            out.push(modified(&path, a, b));
                        }
                        if ha != hb {
                            let sa = store.read_tree(ha)?;
                            let sb = store.read_tree(hb)?;
                            diff_trees(store, &path, &sa, &sb, out)?;
                        }
                    }
                    _ => {
                        if a.payload != b.payload || !same_meta(a, b) {
                            out.push(modified(&path, a, b));
                        }
                    }
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

fn modified(path: &[u8], a: &Entry, b: &Entry) -> Change {
    Change {
        path: path.to_vec(),
        kind: ChangeKind::Modified,
        old: Some(a.clone()),
        new: Some(b.clone()),
    }
}

/// One entry added or deleted, with everything below it.
fn whole(
    store: &ObjectStore,
    prefix: &[u8],
    e: &Entry,
    kind: ChangeKind,
    out: &mut Vec<Change>,
) -> io::Result<()> {
    let path = join(prefix, &e.name);
    let (old, new) = match kind {
        ChangeKind::Deleted => (Some(e.clone()), None),
        _ => (None, Some(e.clone())),
    };
    out.push(Change {
        path: path.clone(),
        kind,
        old,
        new,
    });
    if let Some(h) = dir_hash(e) {
        for child in store.read_tree(h)?.entries {
            whole(store, &path, &child, kind, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn store() -> (tempfile::TempDir, ObjectStore) {
        let d = tempfile::tempdir().unwrap();
        let fd = crate::sys::open_root(d.path()).unwrap();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        (d, s)
    }

    fn ent(name: &str, mode: u32, payload: Payload) -> Entry {
        Entry {
            name: name.into(),
            mode,
            uid: 0,
            gid: 0,
            atime: (10, 0),
            mtime: (20, 0),
            size: 0,
            rdev: 0,
            link: 0,
            xattrs: Vec::new(),
            payload,
        }
    }

    fn file(s: &ObjectStore, name: &str, data: &[u8]) -> Entry {
        let mut e = ent(
            name,
            libc::S_IFREG | 0o644,
            Payload::File(s.put_bytes(data).unwrap()),
        );
        e.size = data.len() as u64;
        e
    }

    fn dir(s: &ObjectStore, name: &str, mut entries: Vec<Entry>) -> Entry {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let h = s.write_tree(&Tree { entries }).unwrap();
        ent(name, libc::S_IFDIR | 0o755, Payload::Dir(h))
    }

    fn root(s: &ObjectStore, entries: Vec<Entry>) -> Hash {
        *dir_hash(&dir(s, "", entries)).unwrap()
    }

    fn summary(c: &[Change]) -> Vec<(String, ChangeKind, &'static str)> {
        c.iter()
            .map(|c| {
                let e = c.new.as_ref().or(c.old.as_ref()).unwrap();
                (
                    String::from_utf8(c.path.clone()).unwrap(),
                    c.kind,
                    kind_name(e),
                )
            })
            .collect()
    }

    #[test]
    fn known_change_set() {
        use ChangeKind::*;
        let (_d, s) = store();
        let link = ent("l", libc::S_IFLNK | 0o777, Payload::Symlink(b"a".to_vec()));
        let wh = ent("w", libc::S_IFCHR, Payload::None);
        let same = dir(&s, "same", vec![file(&s, "k", b"kept")]);
        let a = root(
            &s,
            vec![
                file(&s, "a", b"one"),
                dir(&s, "d", vec![file(&s, "x", b"x"), file(&s, "y", b"y")]),
                link.clone(),
                same.clone(),
                wh.clone(),
                dir(&s, "gone", vec![dir(&s, "sub", vec![file(&s, "f", b"f")])]),
            ],
        );
        let mut d2 = dir(&s, "d", vec![file(&s, "y", b"y"), file(&s, "z", b"z")]);
        d2.mode = libc::S_IFDIR | 0o700;
        let mut chardev = wh.clone();
        chardev
            .xattrs
            .push((crate::whiteout::XATTR_CHARDEV.to_vec(), b"y".to_vec()));
        let b = root(
            &s,
            vec![
                file(&s, "a", b"two"),
                d2,
                dir(&s, "l", vec![file(&s, "in", b"")]),
                dir(&s, "n", vec![file(&s, "1", b"1")]),
                same,
                chardev,
            ],
        );
        let got = diff(&s, Some(&a), &b).unwrap();
        let want = vec![
            ("a", Modified, "file"),
            ("d", Modified, "dir"),
            ("d/x", Deleted, "file"),
            ("d/z", Added, "file"),
            ("gone", Deleted, "dir"),
            ("gone/sub", Deleted, "dir"),
            ("gone/sub/f", Deleted, "file"),
            ("l", Deleted, "symlink"),
            ("l", Added, "dir"),
            ("l/in", Added, "file"),
            ("n", Added, "dir"),
            ("n/1", Added, "file"),
            ("w", Deleted, "whiteout"),
            ("w", Added, "device"),
        ];
        let want: Vec<_> = want
            .into_iter()
            .map(|(p, k, n)| (p.to_string(), k, n))
            .collect();
        assert_eq!(summary(&got), want);
        // Old and new entries are carried.
        assert_eq!(got[0].old.as_ref().unwrap().size, 3);
        assert!(got[3].old.is_none() && got[3].new.is_some());
        // The other way round: same paths, Added and Deleted swapped.
        let back = diff(&s, Some(&b), &a).unwrap();
        assert_eq!(back.len(), got.len());
        assert_eq!(summary(&back)[4], ("gone".into(), Added, "dir"));
        assert!(diff(&s, Some(&a), &a).unwrap().is_empty());
        // From nothing: everything added, parents first.
        let all = diff(&s, None, &a).unwrap();
        assert_eq!(all.len(), 11);
        assert!(all.iter().all(|c| c.kind == Added));
        assert_eq!(all[0].path, b"a");
        assert_eq!(all[1].path, b"d");
    }

    #[test]
    fn equal_subtrees_are_not_read() {
        let (d, s) = store();
        let shared = dir(&s, "big", vec![file(&s, "f", b"data")]);
        let a = root(&s, vec![shared.clone(), file(&s, "x", b"1")]);
        let b = root(&s, vec![shared.clone(), file(&s, "x", b"2")]);
        // Remove the shared subtree's object: a diff that read it would fail.
        let h = crate::store::objects::hex(dir_hash(&shared).unwrap());
        std::fs::remove_file(d.path().join("objects").join(&h[..2]).join(&h)).unwrap();
        let got = diff(&s, Some(&a), &b).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, b"x");
    }

    #[test]
    fn lookup_and_kind_names() {
        let (_d, s) = store();
        let r = root(
            &s,
            vec![dir(
                &s,
                "etc",
                vec![file(&s, "hosts", b"127.0.0.1 localhost\n")],
            )],
        );
        let e = lookup(&s, &r, b"etc/hosts").unwrap().unwrap();
        assert_eq!(e.name, b"hosts");
        assert_eq!(kind_name(&e), "file");
        assert_eq!(kind_name(&lookup(&s, &r, b"etc").unwrap().unwrap()), "dir");
        assert!(lookup(&s, &r, b"etc/nope").unwrap().is_none());
        assert!(lookup(&s, &r, b"etc/hosts/x").unwrap().is_none());
        assert!(lookup(&s, &r, b"").unwrap().is_none());
        let mut fifo = ent("p", libc::S_IFIFO | 0o644, Payload::None);
        assert_eq!(kind_name(&fifo), "fifo");
        fifo.mode = libc::S_IFSOCK | 0o644;
        assert_eq!(kind_name(&fifo), "socket");
        fifo.mode = libc::S_IFBLK | 0o644;
        assert_eq!(kind_name(&fifo), "device");
    }
}
