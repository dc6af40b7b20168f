//! Content-addressed object store: every object (file data or an encoded
//! tree) is named by the blake3 hash of its bytes.
//!
//! Layout inside the state directory (on the overlay partition, so file data
//! can be reflinked from the upper when the filesystem allows it):
//! ```text
//! objects/ab/abcdef...   (64 lowercase hex digits; fan-out by the first byte)
//! tmp/                   (objects being written; emptied at open)
//! ```
//! An object is written under a scratch name in `tmp/`, then renamed to its
//! name, so a name only ever appears with whole content (once synced: the
//! caller calls `sync()` once per checkpoint instead of an fsync per object).
//! Objects are immutable: mode 0400, owner root.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing::{info, warn};

use super::tree::{Hash, Payload, Tree};
use crate::sys;

const OBJECTS_DIR: &str = "objects";
const TMP_DIR: &str = "tmp";
/// Files up to this size are read into memory, hashed and written in one
/// pass; larger ones are hashed first and copied only if new.
const SMALL_FILE: u64 = 1 << 20;
const BUF_MAX: usize = 1 << 20;

pub fn hex(h: &Hash) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in h {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

/// 64 hex digits (either case) to a hash.
pub fn parse_hex(s: &str) -> Option<Hash> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut h = [0u8; 32];
    for (i, o) in h.iter_mut().enumerate() {
        *o = (nib(b[2 * i])? << 4) | nib(b[2 * i + 1])?;
    }
    Some(h)
}

fn missing(h: &Hash) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("object {} is missing", hex(h)),
    )
}

fn corrupt(h: &Hash) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "object {} is corrupt: its content does not match its hash",
            hex(h)
        ),
    )
}

fn is_errno(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

/// Result of storing a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub hash: Hash,
    pub size: u64,
    /// False when an object with this content already existed (nothing written).
    pub new: bool,
}

pub struct ObjectStore {
    /// `objects/`, opened for reading (syncfs needs a real descriptor).
    objects: OwnedFd,
    tmp: OwnedFd,
    /// Fan-out directories, opened (and created) on first use; never removed,
    /// so a cached descriptor stays valid.
    fanout: Vec<OnceLock<OwnedFd>>,
    seq: AtomicU64,
    /// Cleared once FICLONE is found unsupported by the store's filesystem.
    reflink: AtomicBool,
}

fn open_dir_in(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    match sys::mkdirat(dir, OsStr::new(name), 0o700) {
        Ok(()) => {}
        Err(e) if is_errno(&e, libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    sys::openat(
        dir,
        OsStr::new(name),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

fn write_all_at(fd: BorrowedFd<'_>, mut data: &[u8], mut off: u64) -> io::Result<()> {
    while !data.is_empty() {
        let n = sys::pwrite(fd, data, off)?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        data = &data[n..];
        off += n as u64;
    }
    Ok(())
}

fn is_reg(st: &sys::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

/// blake3 of the first `size` bytes of `fd` (fewer if it is shorter), reading
/// only data extents: holes are hashed as the zeros they read as. Returns the
/// hash and the number of bytes hashed.
fn hash_fd(fd: BorrowedFd<'_>, size: u64) -> io::Result<(Hash, u64)> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; (size as usize).clamp(4096, BUF_MAX)];
    let mut off = 0u64;
    let hash_zeros = |hasher: &mut blake3::Hasher, mut n: u64| {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            hasher.update(&ZEROS[..k]);
            n -= k as u64;
        }
    };
    'outer: while off < size {
        let data = match sys::lseek(fd, off as i64, libc::SEEK_DATA) {
            Ok(d) => (d as u64).min(size),
            Err(e) if is_errno(&e, libc::ENXIO) => size, // only a hole is left
            Err(_) => off,                               // no SEEK_DATA: all data
        };
        hash_zeros(&mut hasher, data - off);
        off = data;
        if off >= size {
            break;
        }
        let hole = sys::lseek(fd, off as i64, libc::SEEK_HOLE)
            .map(|h| h as u64)
            .unwrap_or(size)
            .min(size);
        let end = if hole > off { hole } else { size };
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let n = sys::pread(fd, &mut buf[..want], off)?;
            if n == 0 {
                break 'outer; // shrank under us: hash what is there
            }
            hasher.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok((*hasher.finalize().as_bytes(), off))
}

impl ObjectStore {
    /// Open or create `objects/` and `tmp/` inside the state directory
    /// `state`, and empty `tmp/` (leftovers of interrupted writes). One
    /// `ObjectStore` per state directory at a time: opening empties `tmp/`.
    pub fn open(state: BorrowedFd<'_>) -> io::Result<ObjectStore> {
        let objects = open_dir_in(state, OBJECTS_DIR)?;
        let tmp = open_dir_in(state, TMP_DIR)?;
        let mut removed = 0u64;
        for e in sys::read_dir_all(tmp.as_fd())? {
            let n = OsStr::from_bytes(&e.name);
            match crate::layers::remove_tree(tmp.as_fd(), n) {
                Ok(()) => removed += 1,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    warn!(name = ?n, %err, "cannot remove leftover in the object store's tmp/");
                    return Err(err);
                }
            }
        }
        if removed > 0 {
            info!(
                removed,
                "removed leftovers of interrupted object writes from tmp/"
            );
        }
        Ok(ObjectStore {
            objects,
            tmp,
            fanout: (0..256).map(|_| OnceLock::new()).collect(),
            seq: AtomicU64::new(0),
            reflink: AtomicBool::new(true),
        })
    }

    /// The fan-out directory for objects starting with byte `b`; `None` if it
    /// does not exist and `create` is false.
    fn dir(&self, b: u8, create: bool) -> io::Result<Option<BorrowedFd<'_>>> {
        let cell = &self.fanout[b as usize];
        if let Some(fd) = cell.get() {
            return Ok(Some(fd.as_fd()));
        }
        let name = format!("{b:02x}");
        let open = || {
            sys::openat(
                self.objects.as_fd(),
                OsStr::new(&name),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
        };
        let fd = match open() {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                match sys::mkdirat(self.objects.as_fd(), OsStr::new(&name), 0o700) {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) => return Err(e),
                }
                open()?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Another thread may have won the race; either descriptor is fine.
        let _ = cell.set(fd);
        Ok(cell.get().map(|f| f.as_fd()))
    }

    /// Size of the stored object, if present.
    fn existing_size(&self, h: &Hash) -> io::Result<Option<u64>> {
        let Some(dir) = self.dir(h[0], false)? else {
            return Ok(None);
        };
        match sys::fstatat(dir, OsStr::new(&hex(h))) {
            Ok(st) if is_reg(&st) => Ok(Some(st.st_size as u64)),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("object {} is not a regular file", hex(h)),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A new empty file in `tmp/`, open for writing.
    fn create_tmp(&self) -> io::Result<(String, OwnedFd)> {
        loop {
            let name = format!(
                "{}.{}",
                sys::getpid(),
                self.seq.fetch_add(1, Ordering::Relaxed)
            );
            match sys::openat(
                self.tmp.as_fd(),
                OsStr::new(&name),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
                0o400,
            ) {
                Ok(fd) => return Ok((name, fd)),
                Err(e) if is_errno(&e, libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn drop_tmp(&self, name: &str) {
        if let Err(e) = sys::unlinkat(self.tmp.as_fd(), OsStr::new(name), false) {
            warn!(name, err = %e, "cannot remove a scratch object in tmp/");
        }
    }

    /// Give the scratch file its final attributes and rename it to its name.
    /// Returns false if an identical object was already there.
    fn publish(&self, tmp: &str, fd: BorrowedFd<'_>, h: &Hash, size: u64) -> io::Result<bool> {
        sys::fchmod(fd, 0o400)?;
        if sys::geteuid() == 0 {
            // A setgid state directory would otherwise pass its group on.
            sys::fchown(fd, 0, 0)?;
        }
        let dir = self.dir(h[0], true)?.ok_or_else(|| missing(h))?;
        let name = hex(h);
        match sys::renameat2(
            self.tmp.as_fd(),
            OsStr::new(tmp),
            dir,
            OsStr::new(&name),
            sys::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::EEXIST) => {
                if self.existing_size(h)? == Some(size) {
                    // Stored concurrently by someone else.
                    self.drop_tmp(tmp);
                    Ok(false)
                } else {
                    // A truncated leftover (crash before sync): replace it.
                    warn!(object = %name, "replacing an object of the wrong size");
                    sys::renameat2(self.tmp.as_fd(), OsStr::new(tmp), dir, OsStr::new(&name), 0)?;
                    Ok(true)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Write `data` as a new object unless present. `h` is its hash.
    fn put_hashed(&self, data: &[u8], h: &Hash) -> io::Result<bool> {
        if self.existing_size(h)? == Some(data.len() as u64) {
            return Ok(false);
        }
        let (tmp, fd) = self.create_tmp()?;
        let r = write_all_at(fd.as_fd(), data, 0)
            .and_then(|()| self.publish(&tmp, fd.as_fd(), h, data.len() as u64));
        if r.is_err() {
            self.drop_tmp(&tmp);
        }
        r
    }

    pub fn put_bytes(&self, data: &[u8]) -> io::Result<Hash> {
        let h = *blake3::hash(data).as_bytes();
        self.put_hashed(data, &h)?;
        Ok(h)
    }

    /// Hash and store the data of `src` (a regular file open for reading).
    /// Nothing is written when the object already exists. Not fsynced.
    pub fn put_file(&self, src: BorrowedFd<'_>) -> io::Result<(Hash, u64)> {
        let s = self.store_file(src)?;
        Ok((s.hash, s.size))
    }

    /// `put_file`, also saying whether a new object was written.
    pub fn store_file(&self, src: BorrowedFd<'_>) -> io::Result<Stored> {
        let st0 = sys::fstat(src)?;
        if !is_reg(&st0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.reflink.load(Ordering::Relaxed) {
            if let Some(s) = self.store_by_clone(src)? {
                return Ok(s);
            }
        }
        let size = st0.st_size as u64;
        if size <= SMALL_FILE {
            // One read: the object is exactly the bytes hashed.
            let mut data = vec![0u8; size as usize + 1];
            let mut n = 0;
            while n < data.len() {
                let k = sys::pread(src, &mut data[n..], n as u64)?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n <= size as usize {
                data.truncate(n);
                let h = *blake3::hash(&data).as_bytes();
                let new = self.put_hashed(&data, &h)?;
                return Ok(Stored {
                    hash: h,
                    size: n as u64,
                    new,
                });
            }
            // Grew past the small limit while we looked: take the large path.
        }
        self.store_large(src, &st0)
    }

    /// Reflink `src` into a scratch file and hash the clone. `None` when the
    /// filesystems cannot clone (then the caller copies).
    fn store_by_clone(&self, src: BorrowedFd<'_>) -> io::Result<Option<Stored>> {
        let (tmp, fd) = self.create_tmp()?;
        if let Err(e) = sys::ficlone(fd.as_fd(), src) {
            self.drop_tmp(&tmp);
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS) => {
                    // The store's filesystem has no reflinks: stop trying.
                    self.reflink.store(false, Ordering::Relaxed);
                    Ok(None)
                }
                // Other filesystem, or a file the clone refuses (swap, ...).
                Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ETXTBSY) => Ok(None),
                _ => Err(e),
            };
        }
        let r = (|| {
            let size = sys::fstat(fd.as_fd())?.st_size as u64;
            let (h, size) = hash_fd(fd.as_fd(), size)?;
            if self.existing_size(&h)? == Some(size) {
                self.drop_tmp(&tmp);
                return Ok(Stored {
                    hash: h,
                    size,
                    new: false,
                });
            }
            let new = self.publish(&tmp, fd.as_fd(), &h, size)?;
            Ok(Stored { hash: h, size, new })
        })();
        if r.is_err() {
            let _ = sys::unlinkat(self.tmp.as_fd(), OsStr::new(&tmp), false);
        }
        r.map(Some)
    }

    /// Hash the source first (most files of a full capture are already
    /// stored); copy only a new one, sparse-aware, by copy_file_range.
    fn store_large(&self, src: BorrowedFd<'_>, st0: &sys::Stat) -> io::Result<Stored> {
        let (mut h, mut size) = hash_fd(src, st0.st_size as u64)?;
        if self.existing_size(&h)? == Some(size) {
            return Ok(Stored {
                hash: h,
                size,
                new: false,
            });
        }
        let (tmp, fd) = self.create_tmp()?;
        let r = (|| {
            crate::copyup::copy_data(src, fd.as_fd(), size, false)?;
            let st1 = sys::fstat(src)?;
            let changed = st1.st_size != st0.st_size
                || (st1.st_mtime, st1.st_mtime_nsec) != (st0.st_mtime, st0.st_mtime_nsec)
                || (st1.st_ctime, st1.st_ctime_nsec) != (st0.st_ctime, st0.st_ctime_nsec);
            if changed {
                // Written to while we copied: name the object after what we have.
                let len = sys::fstat(fd.as_fd())?.st_size as u64;
                (h, size) = hash_fd(fd.as_fd(), len)?;
                if self.existing_size(&h)? == Some(size) {
                    self.drop_tmp(&tmp);
                    return Ok(false);
                }
            }
            self.publish(&tmp, fd.as_fd(), &h, size)
        })();
        match r {
            Ok(new) => Ok(Stored { hash: h, size, new }),
            Err(e) => {
                let _ = sys::unlinkat(self.tmp.as_fd(), OsStr::new(&tmp), false);
                Err(e)
            }
        }
    }

    /// Open an object for reading (`O_RDONLY|O_NOFOLLOW`).
    pub fn open_object(&self, h: &Hash) -> io::Result<OwnedFd> {
        let dir = self.dir(h[0], false)?.ok_or_else(|| missing(h))?;
        match sys::openat(
            dir,
            OsStr::new(&hex(h)),
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        ) {
            Ok(fd) => Ok(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing(h)),
            Err(e) => Err(e),
        }
    }

    /// The whole object, checked against its hash.
    pub fn get(&self, h: &Hash) -> io::Result<Vec<u8>> {
        let mut f = std::fs::File::from(self.open_object(h)?);
        let mut data = Vec::new();
        f.read_to_end(&mut data)?;
        if blake3::hash(&data).as_bytes() != h {
            return Err(corrupt(h));
        }
        Ok(data)
    }

    pub fn contains(&self, h: &Hash) -> bool {
        matches!(self.existing_size(h), Ok(Some(_)))
    }

    pub fn read_tree(&self, h: &Hash) -> io::Result<Tree> {
        let data = self.get(h)?;
        Tree::decode(&data)
            .map_err(|e| io::Error::new(e.kind(), format!("tree object {}: {e}", hex(h))))
    }

    pub fn write_tree(&self, t: &Tree) -> io::Result<Hash> {
        self.put_bytes(&t.encode())
    }

    /// Flush everything written to the store's filesystem (syncfs).
    pub fn sync(&self) -> io::Result<()> {
        sys::syncfs(self.objects.as_fd())
    }

    /// Re-hash the stored bytes: false when they do not match the name.
    pub fn verify(&self, h: &Hash) -> io::Result<bool> {
        let fd = self.open_object(h)?;
        let size = sys::fstat(fd.as_fd())?.st_size as u64;
        let (got, _) = hash_fd(fd.as_fd(), size)?;
        Ok(&got == h)
    }

    /// Every object's hash and `stat` (names that are not objects are skipped).
    fn scan(&self, mut f: impl FnMut(Hash, &sys::Stat)) -> io::Result<()> {
        for d in sys::read_dir_all(self.objects.as_fd())? {
            let Some(name) = std::str::from_utf8(&d.name).ok() else {
                continue;
            };
            let Some(b) = (name.len() == 2)
                .then(|| u8::from_str_radix(name, 16).ok())
                .flatten()
            else {
                continue;
            };
            if name != format!("{b:02x}") {
                continue;
            }
            let Some(dir) = self.dir(b, false)? else {
                continue;
            };
            for e in sys::read_dir_all(dir)? {
                let Some(s) = std::str::from_utf8(&e.name).ok() else {
                    continue;
                };
                let Some(h) = parse_hex(s) else { continue };
                if h[0] != b || hex(&h) != s {
                    continue;
                }
                match sys::fstatat(dir, OsStr::new(s)) {
                    Ok(st) => f(h, &st),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    pub fn list(&self) -> io::Result<Vec<Hash>> {
        let mut v = Vec::new();
        self.scan(|h, _| v.push(h))?;
        Ok(v)
    }

    pub fn remove(&self, h: &Hash) -> io::Result<()> {
        let dir = self.dir(h[0], false)?.ok_or_else(|| missing(h))?;
        match sys::unlinkat(dir, OsStr::new(&hex(h)), false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing(h)),
            r => r,
        }
    }

    pub fn size(&self, h: &Hash) -> io::Result<u64> {
        self.existing_size(h)?.ok_or_else(|| missing(h))
    }

    /// Space the objects take on disk (`st_blocks * 512`; reflinked extents
    /// shared with the upper are counted in full).
    pub fn total_bytes(&self) -> io::Result<u64> {
        let mut t = 0u64;
        self.scan(|_, st| t += st.st_blocks as u64 * 512)?;
        Ok(t)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjKind {
    Tree,
    File,
}

/// Every object reachable from the root trees `roots`: hash -> (kind, the
/// first path it was seen at, "/etc/x"; "/" for a root). A tree that is
/// missing or corrupt is reported as (hash, path, error) and not descended.
#[allow(clippy::type_complexity)]
pub fn reachable(
    store: &ObjectStore,
    roots: &[Hash],
) -> (
    HashMap<Hash, (ObjKind, String)>,
    Vec<(Hash, String, String)>,
) {
    let mut seen: HashMap<Hash, (ObjKind, String)> = HashMap::new();
    let mut bad = Vec::new();
    let mut stack: Vec<(Hash, String)> = Vec::new();
    for r in roots {
        if !seen.contains_key(r) {
            seen.insert(*r, (ObjKind::Tree, "/".to_string()));
            stack.push((*r, String::new()));
        }
    }
    while let Some((h, path)) = stack.pop() {
        let tree = match store.read_tree(&h) {
            Ok(t) => t,
            Err(e) => {
                let p = if path.is_empty() {
                    "/".to_string()
                } else {
                    path
                };
                bad.push((h, p, e.to_string()));
                continue;
            }
        };
        for e in &tree.entries {
            let (kind, ch) = match &e.payload {
                Payload::File(c) => (ObjKind::File, c),
                Payload::Dir(c) => (ObjKind::Tree, c),
                _ => continue,
            };
            if seen.contains_key(ch) {
                continue;
            }
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            if kind == ObjKind::Tree {
                stack.push((*ch, p.clone()));
            }
            seen.insert(*ch, (kind, p));
        }
    }
    (seen, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn state() -> (tempfile::TempDir, OwnedFd) {
        let d = tempfile::tempdir().unwrap();
        let fd = sys::open_root(d.path()).unwrap();
        (d, fd)
    }

    fn obj_path(d: &tempfile::TempDir, h: &Hash) -> std::path::PathBuf {
        let x = hex(h);
        d.path().join("objects").join(&x[..2]).join(&x)
    }

    fn count_objects(d: &tempfile::TempDir) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(d.path().join("objects")).unwrap() {
            n += std::fs::read_dir(e.unwrap().path()).unwrap().count();
        }
        n
    }

    #[test]
    fn hex_roundtrip() {
        let mut h = [0u8; 32];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 37) as u8;
        }
        let s = hex(&h);
        assert_eq!(s.len(), 64);
        assert_eq!(&s[..4], "0025");
        assert_eq!(parse_hex(&s), Some(h));
        assert_eq!(parse_hex(&s.to_uppercase()), Some(h));
        assert_eq!(parse_hex(&s[1..]), None);
        assert_eq!(parse_hex(&format!("g{}", &s[1..])), None);
    }

    #[test]
    fn bytes_roundtrip_dedup_and_attributes() {
        let (d, fd) = state();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let h = s.put_bytes(b"hello").unwrap();
        assert_eq!(&h, blake3::hash(b"hello").as_bytes());
        assert_eq!(s.put_bytes(b"hello").unwrap(), h);
        let h2 = s.put_bytes(b"").unwrap();
        assert_eq!(count_objects(&d), 2);
        assert_eq!(s.get(&h).unwrap(), b"hello");
        assert_eq!(s.get(&h2).unwrap(), b"");
        assert!(s.contains(&h));
        assert_eq!(s.size(&h).unwrap(), 5);
        let md = std::fs::symlink_metadata(obj_path(&d, &h)).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o400);
        let mut l = s.list().unwrap();
        l.sort();
        let mut want = vec![h, h2];
        want.sort();
        assert_eq!(l, want);
        assert!(s.total_bytes().unwrap() > 0);
        s.sync().unwrap();
        s.remove(&h).unwrap();
        assert!(!s.contains(&h));
        assert_eq!(s.get(&h).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(s.remove(&h).unwrap_err().kind(), io::ErrorKind::NotFound);
        let missing = [9u8; 32];
        assert_eq!(
            s.open_object(&missing).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(!s.contains(&missing));
        // Nothing left behind in tmp/.
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    fn put_path(s: &ObjectStore, p: &std::path::Path) -> Stored {
        let f = std::fs::File::open(p).unwrap();
        s.store_file(f.as_fd()).unwrap()
    }

    #[test]
    fn files_small_large_sparse_dedup() {
        let (d, fd) = state();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let src = tempfile::tempdir().unwrap();
        let small = src.path().join("small");
        std::fs::write(&small, b"some data").unwrap();
        let st = put_path(&s, &small);
        assert!(st.new);
        assert_eq!(st.size, 9);
        assert_eq!(st.hash, *blake3::hash(b"some data").as_bytes());
        let again = put_path(&s, &small);
        assert!(!again.new);
        assert_eq!(again.hash, st.hash);
        // Same content under another name: still one object.
        let copy = src.path().join("copy");
        std::fs::write(&copy, b"some data").unwrap();
        assert_eq!(put_path(&s, &copy).hash, st.hash);
        assert_eq!(count_objects(&d), 1);

        // Large and sparse: data, a hole, data, a trailing hole.
        let big = src.path().join("big");
        let mut want = vec![0u8; 5 << 20];
        for (i, b) in want[..3 << 20].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        want[4 << 20] = 7;
        {
            let f = std::fs::File::create(&big).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_all_at(&want[..3 << 20], 0).unwrap();
            f.write_all_at(&want[4 << 20..(4 << 20) + 1], 4 << 20)
                .unwrap();
            f.set_len(5 << 20).unwrap();
        }
        let b = put_path(&s, &big);
        assert!(b.new);
        assert_eq!(b.size, 5 << 20);
        assert_eq!(b.hash, *blake3::hash(&want).as_bytes());
        assert_eq!(s.get(&b.hash).unwrap(), want);
        assert!(s.verify(&b.hash).unwrap());
        // Holes stay holes (1 MiB + the trailing 1 MiB - 1 are never allocated).
        let md = std::fs::symlink_metadata(obj_path(&d, &b.hash)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            md.blocks() * 512 < (4 << 20) + (64 << 10),
            "{}",
            md.blocks()
        );
        assert!(!put_path(&s, &big).new);
        assert_eq!(count_objects(&d), 2);
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn corruption_is_detected() {
        let (d, fd) = state();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let h = s.put_bytes(b"precious bytes").unwrap();
        assert!(s.verify(&h).unwrap());
        let p = obj_path(&d, &h);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b[3] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(!s.verify(&h).unwrap());
        let e = s.get(&h).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(&hex(&h)), "{e}");
        assert!(s.read_tree(&h).is_err());
    }

    #[test]
    fn tmp_leftovers_removed_at_open() {
        let (d, fd) = state();
        drop(ObjectStore::open(fd.as_fd()).unwrap());
        std::fs::write(d.path().join("tmp/123.4"), b"half").unwrap();
        std::fs::create_dir_all(d.path().join("tmp/x/y")).unwrap();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn truncated_object_is_replaced() {
        let (d, fd) = state();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let h = s.put_bytes(b"0123456789").unwrap();
        let p = obj_path(&d, &h);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, b"").unwrap(); // what a crash before sync can leave
        assert_eq!(s.put_bytes(b"0123456789").unwrap(), h);
        assert_eq!(s.get(&h).unwrap(), b"0123456789");
    }

    #[test]
    fn trees_and_reachable() {
        use crate::store::tree::Entry;
        let (_d, fd) = state();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let f1 = s.put_bytes(b"one").unwrap();
        let f2 = s.put_bytes(b"two").unwrap();
        let ent = |name: &str, mode: u32, payload: Payload| Entry {
            name: name.into(),
            mode,
            uid: 0,
            gid: 0,
            atime: (0, 0),
            mtime: (0, 0),
            size: 0,
            rdev: 0,
            link: 0,
            xattrs: vec![],
            payload,
        };
        let mut sub = Tree::default();
        sub.upsert(ent("x", libc::S_IFREG | 0o644, Payload::File(f2)));
        sub.upsert(ent(
            "l",
            libc::S_IFLNK | 0o777,
            Payload::Symlink(b"x".to_vec()),
        ));
        let sh = s.write_tree(&sub).unwrap();
        assert_eq!(s.read_tree(&sh).unwrap(), sub);
        let gone = [5u8; 32];
        let mut root = Tree::default();
        root.upsert(ent("a", libc::S_IFREG | 0o644, Payload::File(f1)));
        root.upsert(ent("etc", libc::S_IFDIR | 0o755, Payload::Dir(sh)));
        root.upsert(ent("lost", libc::S_IFDIR | 0o755, Payload::Dir(gone)));
        let rh = s.write_tree(&root).unwrap();
        let (m, bad) = reachable(&s, &[rh, rh]);
        assert_eq!(m.len(), 5);
        assert_eq!(m[&rh], (ObjKind::Tree, "/".to_string()));
        assert_eq!(m[&sh], (ObjKind::Tree, "/etc".to_string()));
        assert_eq!(m[&f2], (ObjKind::File, "/etc/x".to_string()));
        assert_eq!(m[&f1], (ObjKind::File, "/a".to_string()));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, gone);
        assert_eq!(bad[0].1, "/lost");
        assert!(bad[0].2.contains(&hex(&gone)), "{}", bad[0].2);
    }

    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn enospc_leaves_no_partial_object() {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(d.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("cannot mount a small tmpfs (not root?): ENOSPC test skipped");
            return;
        }
        let _u = Unmount(d.path().to_path_buf());
        let fd = sys::open_root(d.path()).unwrap();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let e = s.put_bytes(&vec![1u8; 1 << 20]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        let src = tempfile::tempdir().unwrap();
        for (name, len) in [("small", 512 << 10), ("large", 3 << 20)] {
            let p = src.path().join(name);
            std::fs::write(&p, vec![2u8; len]).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let e = s.put_file(f.as_fd()).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{name}: {e}");
        }
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert!(s.list().unwrap().is_empty());
        // Still usable for what fits.
        let h = s.put_bytes(b"small").unwrap();
        assert_eq!(s.get(&h).unwrap(), b"small");
    }

    /// Not run by default: needs a directory on a filesystem with reflinks
    /// (XFS, btrfs), e.g. `LAYERFS_REFLINK_DIR=/mnt/xfs cargo test --release
    /// -p layerfs --lib reflink -- --ignored`.
    #[test]
    #[ignore]
    fn reflink_store() {
        let Ok(dir) = std::env::var("LAYERFS_REFLINK_DIR") else {
            panic!("set LAYERFS_REFLINK_DIR");
        };
        let d = tempfile::tempdir_in(&dir).unwrap();
        std::fs::create_dir(d.path().join("state")).unwrap();
        let fd = sys::open_root(&d.path().join("state")).unwrap();
        let s = ObjectStore::open(fd.as_fd()).unwrap();
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
        let p = d.path().join("src");
        std::fs::write(&p, &data).unwrap();
        std::fs::File::open(&p).unwrap().sync_all().unwrap(); // allocate it now
        let free = |path: &std::path::Path| {
            sys::fstatvfs(sys::open_root(path).unwrap().as_fd())
                .map(|v| v.f_bfree * v.f_frsize)
                .unwrap()
        };
        let before = free(d.path());
        let st = put_path(&s, &p);
        s.sync().unwrap();
        assert!(s.reflink.load(Ordering::Relaxed), "FICLONE was not used");
        assert!(st.new);
        assert_eq!(st.hash, *blake3::hash(&data).as_bytes());
        assert_eq!(s.get(&st.hash).unwrap(), data);
        // Shared extents: storing 3 MiB took (almost) no space.
        assert!(
            before.saturating_sub(free(d.path())) < (1 << 20),
            "{} {}",
            before,
            free(d.path())
        );
        assert!(!put_path(&s, &p).new);
        assert_eq!(
            std::fs::read_dir(d.path().join("state/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}
