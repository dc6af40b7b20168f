//! Tree objects: one directory of the upper layer as stored in a checkpoint.
//!
//! A checkpoint is the hash of the root tree; each directory entry carries
//! its metadata and, for files and directories, the hash of its content
//! (a data object or another tree). Trees are content-addressed like data,
//! so an unchanged directory is shared by every checkpoint that holds it and
//! a diff skips it by comparing one hash.
//!
//! Encoding (all integers big-endian, so s390x and x86 write the same bytes):
//! ```text
//! tree   := "LFTR" version:u8(=1) count:u32 entry*      (entries sorted by name bytes)
//! entry  := name_len:u16 name kind:u8 mode:u32 uid:u32 gid:u32
//!           atime_s:i64 atime_ns:u32 mtime_s:i64 mtime_ns:u32
//!           size:u64 rdev:u64 link:u64
//!           xattr_count:u16 (name_len:u16 name value_len:u32 value)*   (sorted by name)
//!           payload
//! payload:= file: hash[32] | dir: hash[32] | symlink: target_len:u16 target | other: nothing
//! ```
//! `kind` is `mode >> 12` (S_IFMT). `link` groups hard links: entries of one
//! checkpoint with the same non-zero `link` are one file (0 = not linked).
//! Whiteouts (0/0 character devices) and the overlay's `trusted.*` xattrs
//! (opaque, redirect, origin) are ordinary entries and attributes here: a
//! tree is the upper layer exactly, in kernel overlayfs's format.

use std::io;

pub type Hash = [u8; 32];

pub const TREE_MAGIC: &[u8; 4] = b"LFTR";
pub const TREE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Regular file: hash of its data object.
    File(Hash),
    /// Directory: hash of its tree object.
    Dir(Hash),
    Symlink(Vec<u8>),
    /// Devices, FIFOs, sockets, whiteouts: everything is in the metadata.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub size: u64,
    pub rdev: u64,
    pub link: u64,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub payload: Payload,
}

impl Entry {
    pub fn fmt(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.fmt() == libc::S_IFDIR
    }
    /// A kernel-overlayfs whiteout (0/0 character device, not marked as a real device).
    pub fn is_whiteout(&self) -> bool {
        self.fmt() == libc::S_IFCHR
            && self.rdev == 0
            && !self
                .xattrs
                .iter()
                .any(|(n, _)| n.as_slice() == crate::whiteout::XATTR_CHARDEV)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// Sorted by name bytes, names unique.
    pub entries: Vec<Entry>,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt tree object: {what}"),
    )
}

struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(bad("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().map_err(|_| bad("u16"))?,
        ))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| bad("u32"))?,
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| bad("u64"))?,
        ))
    }
    fn hash(&mut self) -> io::Result<Hash> {
        self.take(32)?.try_into().map_err(|_| bad("hash"))
    }
}

impl Tree {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(16 + self.entries.len() * 96);
        o.extend_from_slice(TREE_MAGIC);
        o.push(TREE_VERSION);
        o.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for e in &self.entries {
            o.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
            o.extend_from_slice(&e.name);
            o.push((e.mode >> 12) as u8);
            o.extend_from_slice(&e.mode.to_be_bytes());
            o.extend_from_slice(&e.uid.to_be_bytes());
            o.extend_from_slice(&e.gid.to_be_bytes());
            o.extend_from_slice(&e.atime.0.to_be_bytes());
            o.extend_from_slice(&e.atime.1.to_be_bytes());
            o.extend_from_slice(&e.mtime.0.to_be_bytes());
            o.extend_from_slice(&e.mtime.1.to_be_bytes());
            o.extend_from_slice(&e.size.to_be_bytes());
            o.extend_from_slice(&e.rdev.to_be_bytes());
            o.extend_from_slice(&e.link.to_be_bytes());
            o.extend_from_slice(&(e.xattrs.len() as u16).to_be_bytes());
            for (n, v) in &e.xattrs {
                o.extend_from_slice(&(n.len() as u16).to_be_bytes());
                o.extend_from_slice(n);
                o.extend_from_slice(&(v.len() as u32).to_be_bytes());
                o.extend_from_slice(v);
            }
            match &e.payload {
                Payload::File(h) | Payload::Dir(h) => o.extend_from_slice(h),
                Payload::Symlink(t) => {
                    o.extend_from_slice(&(t.len() as u16).to_be_bytes());
                    o.extend_from_slice(t);
                }
                Payload::None => {}
            }
        }
        o
    }

    /// Decode, refusing anything malformed (a tree may come from a damaged
    /// disk or a backup archive): bad magic, unknown version, truncation,
    /// names that are not single path components, unsorted or duplicate names.
    pub fn decode(b: &[u8]) -> io::Result<Tree> {
        let mut r = Rd { b };
        if r.take(4)? != TREE_MAGIC {
            return Err(bad("bad magic"));
        }
        let v = r.u8()?;
        if v != TREE_VERSION {
            return Err(bad(&format!("unknown version {v}")));
        }
        let n = r.u32()? as usize;
        let mut entries: Vec<Entry> = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let nl = r.u16()? as usize;
            let name = r.take(nl)?.to_vec();
            if name.is_empty()
                || name.len() > 255
                || name == b"."
                || name == b".."
                || name.contains(&b'/')
                || name.contains(&0)
            {
                return Err(bad("invalid entry name"));
            }
            if let Some(prev) = entries.last() {
                if prev.name >= name {
                    return Err(bad("entries not sorted"));
                }
            }
            let kind = r.u8()?;
            let mode = r.u32()?;
            if u32::from(kind) != mode >> 12 {
                return Err(bad("kind and mode disagree"));
            }
            let uid = r.u32()?;
            let gid = r.u32()?;
            let atime = (r.u64()? as i64, r.u32()?);
            let mtime = (r.u64()? as i64, r.u32()?);
            let size = r.u64()?;
            let rdev = r.u64()?;
            let link = r.u64()?;
            let nx = r.u16()? as usize;
            let mut xattrs = Vec::with_capacity(nx);
            for _ in 0..nx {
                let l = r.u16()? as usize;
                let xn = r.take(l)?.to_vec();
                let l = r.u32()? as usize;
                let xv = r.take(l)?.to_vec();
                xattrs.push((xn, xv));
            }
            let payload = match mode & libc::S_IFMT {
                libc::S_IFREG => Payload::File(r.hash()?),
                libc::S_IFDIR => Payload::Dir(r.hash()?),
                libc::S_IFLNK => {
                    let l = r.u16()? as usize;
                    Payload::Symlink(r.take(l)?.to_vec())
                }
                libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => Payload::None,
                _ => return Err(bad("unknown file type")),
            };
            entries.push(Entry {
                name,
                mode,
                uid,
                gid,
                atime,
                mtime,
                size,
                rdev,
                link,
                xattrs,
                payload,
            });
        }
        if !r.b.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Tree { entries })
    }

    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Insert or replace by name, keeping the order.
    pub fn upsert(&mut self, e: Entry) {
        match self
            .entries
            .binary_search_by(|x| x.name.as_slice().cmp(&e.name))
        {
            Ok(i) => self.entries[i] = e,
            Err(i) => self.entries.insert(i, e),
        }
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| self.entries.remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> Entry {
        Entry {
            name: name.into(),
            mode: libc::S_IFREG | 0o644,
            uid: 1,
            gid: 2,
            atime: (1, 2),
            mtime: (-3, 4),
            size: 5,
            rdev: 0,
            link: 0,
            xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
            payload: Payload::File([7; 32]),
        }
    }

    #[test]
    fn roundtrip_and_known_bytes() {
        let mut t = Tree::default();
        t.upsert(file("b"));
        t.upsert(file("a"));
        let mut l = file("l");
        l.mode = libc::S_IFLNK | 0o777;
        l.payload = Payload::Symlink(b"../x".to_vec());
        t.upsert(l);
        let enc = t.encode();
        assert_eq!(&enc[..9], b"LFTR\x01\x00\x00\x00\x03");
        // First entry "a": name length 1 big-endian, then kind 8 (S_IFREG >> 12).
        assert_eq!(&enc[9..13], &[0, 1, b'a', 8]);
        assert_eq!(Tree::decode(&enc).unwrap(), t);
    }

    #[test]
    fn rejects_malformed() {
        let mut t = Tree::default();
        t.upsert(file("a"));
        let enc = t.encode();
        assert!(Tree::decode(&enc[..enc.len() - 1]).is_err());
        let mut v2 = enc.clone();
        v2[4] = 2;
        assert!(Tree::decode(&v2).is_err());
        let mut dotdot = Tree::default();
        dotdot.entries.push(file(".."));
        assert!(Tree::decode(&dotdot.encode()).is_err());
        let mut unsorted = Tree::default();
        unsorted.entries.push(file("b"));
        unsorted.entries.push(file("a"));
        assert!(Tree::decode(&unsorted.encode()).is_err());
    }
}
