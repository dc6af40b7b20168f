//! Union semantics on a real layerfs mount: lookup, readdir, copy-up,
//! whiteouts, rename, hard links, inode numbers, file types and I/O.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};

use common::*;

#[test]
fn lookup_topmost_wins_and_directories_merge() {
    let mut f = Fixture::new();
    write(f.l2.join("a"), "l2");
    write(f.l1.join("a"), "l1");
    write(f.l2.join("only2"), "two");
    write(f.l2.join("d/x"), "x2");
    write(f.l1.join("d/y"), "y1");
    write(f.upper.join("d/z"), "zu");
    // A lower non-directory hides a directory of the same name below it.
    write(f.l1.join("shadow"), "file");
    write(f.l2.join("shadow/inner"), "hidden");
    f.mount();
    assert_eq!(read(f.m("a")), "l1");
    assert_eq!(read(f.m("only2")), "two");
    assert_eq!(names(f.m("d")), ["x", "y", "z"]);
    assert!(f.m("shadow").is_file());
    assert_eq!(read(f.m("shadow")), "file");
}

#[test]
fn readdir_hides_whiteouts_duplicates_and_stays_valid() {
    let mut f = Fixture::new();
    for i in 0..3000 {
        write(f.l2.join(format!("big/f{i:05}")), "x");
    }
    for i in 0..3000 {
        if i % 2 == 0 {
            write(f.l1.join(format!("big/f{i:05}")), "y");
        }
    }
    write(f.l1.join("big/extra"), "e");
    f.mount();
    let n = names(f.m("big"));
    assert_eq!(n.len(), 3001);
    for i in (0..3000).step_by(3) {
        fs::remove_file(f.m(&format!("big/f{i:05}"))).unwrap();
    }
    let n = names(f.m("big"));
    assert_eq!(n.len(), 3001 - 1000);
    assert!(!n.iter().any(|x| x == "f00000" || x == "f00003"));
    assert!(is_whiteout(&f.u("big/f00000")));

    // telldir/seekdir: the name found after seeking back is the same, even
    // when entries are added and removed meanwhile.
    let c = cstr(&f.m("big"));
    // SAFETY: plain libc directory stream use on a valid path.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        for _ in 0..500 {
            assert!(!libc::readdir(d).is_null());
        }
        let pos = libc::telldir(d);
        let e = libc::readdir(d);
        let name1 = std::ffi::CStr::from_ptr((*e).d_name.as_ptr()).to_owned();
        write(f.m("big/new-while-reading"), "n");
        fs::remove_file(f.m("big/f00001")).unwrap();
        for _ in 0..100 {
            libc::readdir(d);
        }
        libc::seekdir(d, pos);
        let e = libc::readdir(d);
        let name2 = std::ffi::CStr::from_ptr((*e).d_name.as_ptr()).to_owned();
        assert_eq!(name1, name2);
        let mut count = 0;
        libc::rewinddir(d);
        while !libc::readdir(d).is_null() {
            count += 1;
        }
        libc::closedir(d);
        // ".", "..", 2001 entries - f00001 + new-while-reading
        assert_eq!(count, 2 + 2001);
    }
}

#[test]
fn readdir_inode_numbers_match_stat() {
    let mut f = Fixture::new();
    write(f.l2.join("d/low"), "1");
    write(f.l1.join("d/mid"), "2");
    write(f.upper.join("d/up"), "3");
    fs::create_dir_all(f.l2.join("d/sub")).unwrap();
    fs::create_dir_all(f.l1.join("d/sub")).unwrap();
    f.mount();
    // A copied-up file and a renamed directory keep their numbers.
    OpenOptions::new()
        .append(true)
        .open(f.m("d/low"))
        .unwrap()
        .write_all(b"more")
        .unwrap();
    for e in fs::read_dir(f.m("d")).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            e.ino(),
            ino(e.path()),
            "readdir and stat disagree for {:?}",
            e.file_name()
        );
    }
}

#[test]
fn copy_up_keeps_data_holes_metadata_xattrs_acls() {
    let mut f = Fixture::new();
    let p = f.l2.join("dir/sparse");
    fs::create_dir_all(f.l2.join("dir")).unwrap();
    {
        let mut file = File::create(&p).unwrap();
        file.write_all(b"head").unwrap();
        file.seek(SeekFrom::Start(64 << 20)).unwrap();
        file.write_all(b"tail").unwrap();
    }
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&p, Some(1), Some(2)).unwrap();
    std::os::unix::fs::chown(f.l2.join("dir"), Some(3), Some(4)).unwrap();
    fs::set_permissions(f.l2.join("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    lsetxattr(&p, "user.color", b"blue").unwrap();
    lsetxattr(&p, "trusted.secret", b"t").unwrap();
    // A POSIX ACL as its raw xattr (version 2; user::rw-, user:1000:r--, group::r--, mask::r--, other::---).
    let acl: Vec<u8> = {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    };
    lsetxattr(&p, "system.posix_acl_access", &acl).unwrap();
    sh(&format!("touch -d '2001-02-03 04:05:06' {}", p.display()));
    let before = fs::metadata(&p).unwrap();
    let ino_before;
    f.mount();
    {
        ino_before = ino(f.m("dir/sparse"));
        // Changing metadata copies up; data is kept.
        lsetxattr(&f.m("dir/sparse"), "user.new", b"1").unwrap();
    }
    let up = f.u("dir/sparse");
    let m = fs::metadata(&up).unwrap();
    assert_eq!(m.len(), before.len());
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (1, 2));
    assert_eq!(m.mtime(), before.mtime());
    assert!(
        m.blocks() < 1024,
        "holes were filled in: {} blocks",
        m.blocks()
    );
    let d = fs::metadata(f.u("dir")).unwrap();
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (3, 4, 0o750));
    assert_eq!(lgetxattr(&up, "user.color").unwrap(), b"blue");
    assert_eq!(lgetxattr(&up, "trusted.secret").unwrap(), b"t");
    assert_eq!(lgetxattr(&up, "system.posix_acl_access").unwrap(), acl);
    assert_eq!(lgetxattr(&f.m("dir/sparse"), "user.new").unwrap(), b"1");
    let mut buf = Vec::new();
    File::open(f.m("dir/sparse"))
        .unwrap()
        .read_to_end(&mut buf)
        .unwrap();
    assert_eq!(&buf[..4], b"head");
    assert_eq!(&buf[buf.len() - 4..], b"tail");
    // The lower is untouched and the inode number survived copy-up.
    assert!(lgetxattr(&p, "user.new").is_none());
    assert_eq!(ino(f.m("dir/sparse")), ino_before);
    // Private overlay attributes are invisible.
    let list = sh(&format!(
        "getfattr -d -m - {} 2>/dev/null || true",
        f.m("dir/sparse").display()
    ));
    assert!(!list.contains("layerfs"), "private xattr visible: {list}");
}

#[test]
fn every_change_copies_up() {
    let mut f = Fixture::new();
    for n in ["chmod", "chown", "utimes", "trunc", "setx", "link", "wr"] {
        write(f.l1.join(n), "data");
    }
    f.mount();
    fs::set_permissions(f.m("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(f.m("chown"), Some(7), None).unwrap();
    sh(&format!(
        "touch -d '2010-01-01' {}",
        f.m("utimes").display()
    ));
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(f.m("trunc"))
        .unwrap();
    lsetxattr(&f.m("setx"), "user.a", b"b").unwrap();
    fs::hard_link(f.m("link"), f.m("link2")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(f.m("wr"))
        .unwrap()
        .write_all(b"D")
        .unwrap();
    for n in [
        "chmod", "chown", "utimes", "trunc", "setx", "link", "link2", "wr",
    ] {
        assert!(f.u(n).exists(), "{n} not copied up");
    }
    assert_eq!(read(f.u("trunc")), "");
    assert_eq!(read(f.m("wr")), "Data");
    assert_eq!(read(f.l1.join("wr")), "data");
    // Reads do not copy up.
    write(f.l2.join("ro"), "r");
    f.remount();
    assert_eq!(read(f.m("ro")), "r");
    assert!(!f.u("ro").exists());
}

#[test]
fn whiteouts_opaque_dirs_and_rmdir() {
    let mut f = Fixture::new();
    write(f.l1.join("file"), "f");
    write(f.l2.join("dir/a"), "a");
    write(f.l1.join("dir/b"), "b");
    fs::create_dir_all(f.l2.join("empty")).unwrap();
    f.mount();
    fs::remove_file(f.m("file")).unwrap();
    assert!(!f.m("file").exists());
    assert!(is_whiteout(&f.u("file")));
    assert_eq!(
        errno_of(fs::remove_dir(f.m("dir"))),
        libc::ENOTEMPTY,
        "rmdir of a merged non-empty directory"
    );
    fs::remove_file(f.m("dir/a")).unwrap();
    fs::remove_file(f.m("dir/b")).unwrap();
    fs::remove_dir(f.m("dir")).unwrap();
    assert!(!f.m("dir").exists());
    assert!(is_whiteout(&f.u("dir")));
    fs::remove_dir(f.m("empty")).unwrap();
    // A directory made where a lower one was deleted is opaque.
    fs::create_dir(f.m("dir")).unwrap();
    assert!(names(f.m("dir")).is_empty());
    assert_eq!(
        lgetxattr(&f.u("dir"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    // A file made over a whiteout replaces it.
    write(f.m("file"), "new");
    assert_eq!(read(f.m("file")), "new");
    f.remount();
    assert_eq!(read(f.m("file")), "new");
    assert!(names(f.m("dir")).is_empty());
    assert!(!f.m("empty").exists());
}

#[test]
fn rename_files_and_lower_directories() {
    let mut f = Fixture::new();
    write(f.l2.join("src/deep/x"), "x");
    write(f.l1.join("src/y"), "y");
    write(f.l1.join("f"), "f");
    write(f.l1.join("g"), "g");
    write(f.l2.join("dst/old"), "old");
    f.mount();
    let src_ino = ino(f.m("src"));
    // A directory that exists in lower layers moves without EXDEV.
    fs::rename(f.m("src"), f.m("moved")).unwrap();
    assert!(!f.m("src").exists());
    assert_eq!(names(f.m("moved")), ["deep", "y"]);
    assert_eq!(read(f.m("moved/deep/x")), "x");
    assert_eq!(ino(f.m("moved")), src_ino);
    // A new directory at the old name does not show the old contents.
    fs::create_dir(f.m("src")).unwrap();
    assert!(names(f.m("src")).is_empty());
    // Move into another directory, over an existing lower file.
    fs::rename(f.m("f"), f.m("dst/old")).unwrap();
    assert_eq!(read(f.m("dst/old")), "f");
    assert!(!f.m("f").exists());
    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    let g = cstr(&f.m("g"));
    let old = cstr(&f.m("dst/old"));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            g.as_ptr(),
            libc::AT_FDCWD,
            old.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            g.as_ptr(),
            libc::AT_FDCWD,
            old.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0);
    assert_eq!(read(f.m("g")), "f");
    assert_eq!(read(f.m("dst/old")), "g");
    // Renamed directory containing a merged subdirectory, then remount.
    fs::rename(f.m("moved"), f.m("dst/moved2")).unwrap();
    f.remount();
    assert_eq!(read(f.m("dst/moved2/deep/x")), "x");
    assert_eq!(read(f.m("dst/moved2/y")), "y");
    assert!(!f.m("moved").exists());
    assert!(names(f.m("src")).is_empty());
}

#[test]
fn hard_links_stay_one_file() {
    let mut f = Fixture::new();
    write(f.l1.join("orig"), "one");
    f.mount();
    let i = ino(f.m("orig"));
    fs::hard_link(f.m("orig"), f.m("second")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(f.m("second"))
        .unwrap()
        .write_all(b"+two")
        .unwrap();
    assert_eq!(read(f.m("orig")), "one+two");
    assert_eq!(ino(f.m("second")), i);
    assert_eq!(ino(f.m("orig")), i);
    assert_eq!(fs::metadata(f.m("orig")).unwrap().nlink(), 2);
    fs::remove_file(f.m("orig")).unwrap();
    assert_eq!(fs::metadata(f.m("second")).unwrap().nlink(), 1);
    assert_eq!(read(f.m("second")), "one+two");
    f.remount();
    assert_eq!(ino(f.m("second")), i);
}

#[test]
fn inode_numbers_stable_across_copy_up_and_remount() {
    let mut f = Fixture::new();
    write(f.l2.join("a/b/c"), "c");
    write(f.l1.join("a/d"), "d");
    f.mount();
    let before: Vec<u64> = ["a", "a/b", "a/b/c", "a/d"]
        .iter()
        .map(|p| ino(f.m(p)))
        .collect();
    let mut all = before.clone();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "inode numbers not unique");
    write(f.m("a/b/c"), "changed");
    fs::set_permissions(f.m("a/d"), fs::Permissions::from_mode(0o600)).unwrap();
    let after: Vec<u64> = ["a", "a/b", "a/b/c", "a/d"]
        .iter()
        .map(|p| ino(f.m(p)))
        .collect();
    assert_eq!(before, after);
    f.remount();
    let again: Vec<u64> = ["a", "a/b", "a/b/c", "a/d"]
        .iter()
        .map(|p| ino(f.m(p)))
        .collect();
    assert_eq!(before, again);
    let dev = fs::metadata(f.m("a")).unwrap().dev();
    assert_eq!(fs::metadata(f.m("a/b/c")).unwrap().dev(), dev);
}

#[test]
fn special_files_and_names() {
    let mut f = Fixture::new();
    std::os::unix::fs::symlink("target", f.l1.join("lnk")).unwrap();
    sh(&format!("mkfifo {}", f.l1.join("fifo").display()));
    sh(&format!("mknod {} c 1 3", f.l1.join("null").display()));
    f.mount();
    assert_eq!(fs::read_link(f.m("lnk")).unwrap().to_str(), Some("target"));
    assert!(fs::symlink_metadata(f.m("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(fs::symlink_metadata(f.m("null"))
        .unwrap()
        .file_type()
        .is_char_device());
    std::os::unix::fs::symlink("/etc/passwd", f.m("newlink")).unwrap();
    assert_eq!(
        fs::read_link(f.m("newlink")).unwrap().to_str(),
        Some("/etc/passwd")
    );
    sh(&format!("mknod {} c 0 0", f.m("zerodev").display()));
    assert!(fs::symlink_metadata(f.m("zerodev"))
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(names(&f.mnt).contains(&"zerodev".to_string()));
    let sock = std::os::unix::net::UnixListener::bind(f.m("sock")).unwrap();
    assert!(fs::symlink_metadata(f.m("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    drop(sock);
    // Any byte but '/' and NUL, up to 255 bytes.
    let odd = std::ffi::OsStr::from_bytes(b"\x01\xff odd\tname\n");
    fs::write(f.mnt.join(odd), "o").unwrap();
    assert_eq!(fs::read(f.mnt.join(odd)).unwrap(), b"o");
    let long = "x".repeat(255);
    fs::write(f.m(&long), "l").unwrap();
    assert_eq!(
        errno_of(fs::write(f.m(&"y".repeat(256)), "l")),
        libc::ENAMETOOLONG
    );
    // statfs reports the upper filesystem.
    let s = sh(&format!("stat -f -c %b {}", f.mnt.display()));
    let u = sh(&format!("stat -f -c %b {}", f.upper.display()));
    assert_eq!(s, u);
}

#[test]
fn file_io_semantics() {
    let mut f = Fixture::new();
    write(f.l1.join("log"), "start\n");
    f.mount();
    // O_APPEND from two descriptors.
    let mut a = OpenOptions::new().append(true).open(f.m("log")).unwrap();
    let mut b = OpenOptions::new().append(true).open(f.m("log")).unwrap();
    a.write_all(b"a\n").unwrap();
    b.write_all(b"b\n").unwrap();
    assert_eq!(read(f.m("log")), "start\na\nb\n");
    // Files over 4 GiB, SEEK_DATA/SEEK_HOLE, fallocate.
    let big = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(f.m("big"))
        .unwrap();
    big.set_len(5 << 30).unwrap();
    let mut bw = &big;
    bw.seek(SeekFrom::Start((5 << 30) - 3)).unwrap();
    bw.write_all(b"end").unwrap();
    assert_eq!(fs::metadata(f.m("big")).unwrap().len(), 5 << 30);
    // SAFETY: lseek on a valid descriptor.
    let data = unsafe { libc::lseek(big.as_raw_fd(), 0, libc::SEEK_DATA) };
    assert!(data >= (4 << 30), "SEEK_DATA found {data}");
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(big.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(hole, 0);
    // SAFETY: fallocate on a valid descriptor.
    assert_eq!(
        unsafe { libc::fallocate(big.as_raw_fd(), 0, 0, 1 << 20) },
        0
    );
    big.sync_all().unwrap();
    big.sync_data().unwrap();
    // SAFETY: syncfs on a valid descriptor.
    assert_eq!(unsafe { libc::syncfs(big.as_raw_fd()) }, 0);
    drop(big);
    // Shared writable mmap.
    write(f.l1.join("mm"), "hello world");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.m("mm"))
        .unwrap();
    // SAFETY: mapping 11 bytes of a file that is 11 bytes long.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            11,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        *(p as *mut u8) = b'J';
        libc::msync(p, 11, libc::MS_SYNC);
        libc::munmap(p, 11);
    }
    drop(file);
    assert_eq!(read(f.m("mm")), "Jello world");
    // O_DIRECT reads and writes.
    let mut d = OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(f.m("direct"))
        .unwrap();
    d.write_all(&[7u8; 4096]).unwrap();
    drop(d);
    assert_eq!(fs::read(f.m("direct")).unwrap(), vec![7u8; 4096]);
    // flock and POSIX locks.
    let l1 = File::open(f.m("log")).unwrap();
    let l2 = File::open(f.m("log")).unwrap();
    // SAFETY: flock on valid descriptors.
    unsafe {
        assert_eq!(
            libc::flock(l1.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            0
        );
        assert_eq!(
            libc::flock(l2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
    }
    let code = sh(&format!(
        "flock -n {} true && echo free || echo held",
        f.m("log").display()
    ));
    assert_eq!(code.trim(), "held");
    drop(l1);
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.m("log"))
        .unwrap();
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_len = 10;
    // SAFETY: fcntl with a valid flock struct.
    assert_eq!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
}

#[test]
fn unlinked_open_file_keeps_working() {
    let mut f = Fixture::new();
    write(f.l1.join("lowerfile"), "lower");
    f.mount();
    let mut h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.m("lowerfile"))
        .unwrap();
    fs::remove_file(f.m("lowerfile")).unwrap();
    h.write_all(b"LOW").unwrap();
    let m = h.metadata().unwrap();
    assert_eq!(m.nlink(), 0);
    let mut s = String::new();
    h.seek(SeekFrom::Start(0)).unwrap();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "LOWer");
    assert!(!f.m("lowerfile").exists());
}

#[test]
fn read_only_without_upper() {
    let mut f = Fixture::new();
    write(f.l1.join("a"), "a");
    let opts = format!("lowerdir={}:{}", f.l1.display(), f.l2.display());
    f.mount_with(&opts);
    assert_eq!(read(f.m("a")), "a");
    assert_eq!(errno_of(fs::write(f.m("b"), "b")), libc::EROFS);
    assert_eq!(errno_of(fs::remove_file(f.m("a"))), libc::EROFS);
}

#[test]
fn upper_changes_while_unmounted_are_seen() {
    let mut f = Fixture::new();
    write(f.l1.join("a"), "a");
    f.mount();
    assert_eq!(read(f.m("a")), "a");
    f.unmount();
    write(f.upper.join("a"), "changed offline");
    write(f.upper.join("new"), "n");
    f.mount();
    assert_eq!(read(f.m("a")), "changed offline");
    assert_eq!(read(f.m("new")), "n");
}

#[test]
fn no_escape_through_symlinks_or_redirects() {
    let mut f = Fixture::new();
    // The topmost lower has a symlink where a lower one has a directory.
    std::os::unix::fs::symlink("/etc", f.l1.join("esc")).unwrap();
    write(f.l2.join("esc/inner"), "i");
    // A hostile redirect planted in the upper must not reach outside the layers.
    fs::create_dir_all(f.upper.join("evil")).unwrap();
    lsetxattr(
        &f.upper.join("evil"),
        "trusted.overlay.redirect",
        b"/../../../../etc",
    )
    .unwrap();
    fs::create_dir_all(f.upper.join("evil2")).unwrap();
    lsetxattr(
        &f.upper.join("evil2"),
        "trusted.overlay.redirect",
        b"../../etc",
    )
    .unwrap();
    f.mount();
    assert!(fs::symlink_metadata(f.m("esc"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(names(f.m("evil")).is_empty());
    assert!(names(f.m("evil2")).is_empty());
    // Writing through the union never lands outside the upper.
    write(f.m("evil/x"), "x");
    assert!(f.u("evil/x").exists());
}

#[test]
fn parallel_readers_in_different_directories() {
    let mut f = Fixture::new();
    for d in 0..8 {
        for i in 0..200 {
            write(f.l2.join(format!("d{d}/f{i}")), &format!("{d}-{i}"));
        }
    }
    f.mount();
    let mnt = f.mnt.clone();
    let hs: Vec<_> = (0..8)
        .map(|d| {
            let mnt = mnt.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    for i in 0..200 {
                        let s = fs::read_to_string(mnt.join(format!("d{d}/f{i}"))).unwrap();
                        assert_eq!(s, format!("{d}-{i}"));
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let c = CString::new("x").unwrap();
    drop(c);
}

#[test]
fn lower_hard_links_never_share_a_number_with_different_data() {
    let mut f = Fixture::new();
    write(f.l1.join("a"), "shared");
    fs::hard_link(f.l1.join("a"), f.l1.join("b")).unwrap();
    f.mount();
    assert_eq!(ino(f.m("a")), ino(f.m("b")));
    write(f.m("a"), "changed");
    f.remount();
    // After copy-up, "a" is its own file; "b" is still the lower one.
    assert_eq!(read(f.m("a")), "changed");
    assert_eq!(read(f.m("b")), "shared");
    assert_ne!(ino(f.m("a")), ino(f.m("b")));
}

#[test]
fn attribute_changes_through_handles_never_touch_a_lower_layer() {
    let mut f = Fixture::new();
    write(f.l1.join("ro"), "x");
    write(f.l1.join("rw"), "y");
    fs::set_permissions(f.l1.join("ro"), fs::Permissions::from_mode(0o644)).unwrap();
    f.mount();
    // fchmod through a handle opened read-only (it is still the lower file).
    let ro = File::open(f.m("ro")).unwrap();
    ro.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    assert_eq!(fs::metadata(f.l1.join("ro")).unwrap().mode() & 0o777, 0o644);
    assert_eq!(fs::metadata(f.m("ro")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(ro.metadata().unwrap().mode() & 0o777, 0o600);
    // fchmod/futimens on a writable handle of a file that was unlinked meanwhile.
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.m("rw"))
        .unwrap();
    fs::remove_file(f.m("rw")).unwrap();
    rw.set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();
    rw.set_len(0).unwrap();
    assert_eq!(rw.metadata().unwrap().mode() & 0o777, 0o640);
    assert_eq!(rw.metadata().unwrap().len(), 0);
    assert_eq!(read(f.l1.join("rw")), "y");
}

#[test]
fn passthrough_never_serves_a_stale_lower_file_after_copy_up() {
    let mut f = Fixture::new();
    write(f.l1.join("cfg"), "old-contents");
    f.mount();
    // A reader opened before copy-up is backed by the lower file.
    let mut early = File::open(f.m("cfg")).unwrap();
    let mut s = String::new();
    early.read_to_string(&mut s).unwrap();
    assert_eq!(s, "old-contents");
    // A writer copies up and changes the file.
    let mut w = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(f.m("cfg"))
        .unwrap();
    w.write_all(b"new").unwrap();
    drop(w);
    // Every later open sees the new data, even while the early reader is open.
    assert_eq!(read(f.m("cfg")), "new");
    let mut mm = File::open(f.m("cfg")).unwrap();
    let mut s2 = String::new();
    mm.read_to_string(&mut s2).unwrap();
    assert_eq!(s2, "new");
    drop(early);
    assert_eq!(read(f.m("cfg")), "new");
    // A big lower file read through a passthrough backing file: the kernel
    // cannot switch that inode to the upper copy while the reader is open, so
    // a writer gets ETXTBSY (never the lower file); once the reader is gone it works.
    fs::write(f.l1.join("big"), vec![b'a'; 2 << 20]).unwrap();
    f.remount();
    let reader = File::open(f.m("big")).unwrap();
    let busy = OpenOptions::new().append(true).open(f.m("big"));
    assert_eq!(errno_of(busy), libc::ETXTBSY);
    drop(reader);
    OpenOptions::new()
        .append(true)
        .open(f.m("big"))
        .unwrap()
        .write_all(b"b")
        .unwrap();
    assert_eq!(fs::metadata(f.m("big")).unwrap().len(), (2 << 20) + 1);
    assert_eq!(fs::metadata(f.l1.join("big")).unwrap().len(), 2 << 20);
    // The same without passthrough (page cache kept across opens).
    f.unmount();
    write(f.l1.join("cfg2"), "lower");
    f.mount_with(&format!("{},passthrough=off", f.opts()));
    let _early = File::open(f.m("cfg2")).unwrap();
    assert_eq!(read(f.m("cfg2")), "lower");
    write(f.m("cfg2"), "upper!");
    assert_eq!(read(f.m("cfg2")), "upper!");
}

#[test]
fn opaque_and_whiteouts_inside_lower_layers() {
    // A lower layer that was once an upper: its whiteouts and opaque
    // directories hide what lies below it.
    let mut f = Fixture::new();
    write(f.l2.join("d/hidden"), "h");
    write(f.l2.join("gone"), "g");
    write(f.l1.join("d/seen"), "s");
    lsetxattr(&f.l1.join("d"), "trusted.overlay.opaque", b"y").unwrap();
    sh(&format!("mknod {} c 0 0", f.l1.join("gone").display()));
    f.mount();
    assert_eq!(names(f.m("d")), ["seen"]);
    assert!(!f.m("gone").exists());
    assert!(!names(&f.mnt).contains(&"gone".to_string()));
}

#[test]
fn volatile_mount_copies_up_the_same_way() {
    let mut f = Fixture::new();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(f.l1.join("big"), &data).unwrap();
    f.mount_with(&format!("{},volatile", f.opts()));
    OpenOptions::new()
        .append(true)
        .open(f.m("big"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    let got = fs::read(f.u("big")).unwrap();
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(got.len(), data.len() + 1);
}
