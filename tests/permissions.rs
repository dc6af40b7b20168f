//! Permissions are the kernel's; what a caller creates belongs to the caller;
//! setuid/setgid bits are cleared on write as the kernel does.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

#[test]
fn created_objects_belong_to_the_caller() {
    let mut f = Fixture::new();
    fs::create_dir_all(f.l1.join("pub")).unwrap();
    fs::set_permissions(f.l1.join("pub"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir_all(f.l1.join("sgid")).unwrap();
    std::os::unix::fs::chown(f.l1.join("sgid"), Some(0), Some(4242)).unwrap();
    fs::set_permissions(f.l1.join("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
    fs::create_dir_all(f.l1.join("private")).unwrap();
    fs::set_permissions(f.l1.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    f.mount();
    let m = f.mnt.clone();
    let code = as_user(NOBODY, NOGROUP, 0o027, || {
        let ok = fs::write(m.join("pub/file"), "x").is_ok()
            && fs::create_dir(m.join("pub/dir")).is_ok()
            && std::os::unix::fs::symlink("t", m.join("pub/lnk")).is_ok()
            && fs::write(m.join("sgid/inherit"), "x").is_ok()
            && fs::create_dir(m.join("sgid/subdir")).is_ok()
            // No permission in a 0700 root directory.
            && fs::write(m.join("private/nope"), "x").is_err();
        if ok {
            0
        } else {
            1
        }
    });
    assert_eq!(code, 0);
    let file = fs::metadata(f.m("pub/file")).unwrap();
    assert_eq!((file.uid(), file.gid()), (NOBODY, NOGROUP));
    assert_eq!(file.mode() & 0o777, 0o640, "umask not applied");
    let dir = fs::metadata(f.m("pub/dir")).unwrap();
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o777),
        (NOBODY, NOGROUP, 0o750)
    );
    assert_eq!(fs::symlink_metadata(f.m("pub/lnk")).unwrap().uid(), NOBODY);
    let inh = fs::metadata(f.m("sgid/inherit")).unwrap();
    assert_eq!(inh.gid(), 4242, "setgid directory group not inherited");
    let sub = fs::metadata(f.m("sgid/subdir")).unwrap();
    assert_eq!(sub.gid(), 4242);
    assert!(
        sub.mode() & 0o2000 != 0,
        "setgid bit not inherited by subdirectory"
    );
}

#[test]
fn setuid_bits_cleared_on_write_truncate_and_chown() {
    let mut f = Fixture::new();
    for n in ["w", "t", "c", "rootw"] {
        write(f.l1.join(n), "data");
        fs::set_permissions(f.l1.join(n), fs::Permissions::from_mode(0o6777)).unwrap();
    }
    f.mount();
    let m = f.mnt.clone();
    let code = as_user(NOBODY, NOGROUP, 0o022, || {
        let w = OpenOptions::new()
            .write(true)
            .open(m.join("w"))
            .and_then(|mut h| h.write_all(b"X"));
        let t = OpenOptions::new()
            .write(true)
            .open(m.join("t"))
            .and_then(|h| h.set_len(1));
        if w.is_ok() && t.is_ok() {
            0
        } else {
            1
        }
    });
    assert_eq!(code, 0);
    assert_eq!(fs::metadata(f.m("w")).unwrap().mode() & 0o7777, 0o777);
    assert_eq!(fs::metadata(f.m("t")).unwrap().mode() & 0o7777, 0o777);
    std::os::unix::fs::chown(f.m("c"), Some(NOBODY), None).unwrap();
    assert_eq!(fs::metadata(f.m("c")).unwrap().mode() & 0o6000, 0);
    // Root (CAP_FSETID) keeps the bits when writing, as on any filesystem.
    OpenOptions::new()
        .write(true)
        .open(f.m("rootw"))
        .unwrap()
        .write_all(b"R")
        .unwrap();
    assert_eq!(fs::metadata(f.m("rootw")).unwrap().mode() & 0o7777, 0o6777);
}

#[test]
fn permission_checks_are_the_kernels() {
    let mut f = Fixture::new();
    write(f.l1.join("secret"), "s");
    fs::set_permissions(f.l1.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    write(f.l1.join("readable"), "r");
    fs::set_permissions(f.l1.join("readable"), fs::Permissions::from_mode(0o644)).unwrap();
    f.mount();
    let m = f.mnt.clone();
    let code = as_user(NOBODY, NOGROUP, 0o022, || {
        let denied_read = fs::read(m.join("secret")).is_err();
        let can_read = fs::read(m.join("readable")).is_ok();
        let denied_write = fs::write(m.join("readable"), "w").is_err();
        let denied_unlink = fs::remove_file(m.join("readable")).is_err();
        if denied_read && can_read && denied_write && denied_unlink {
            0
        } else {
            1
        }
    });
    assert_eq!(code, 0);
    // Nothing was copied up by the failed attempts.
    assert!(!f.u("readable").exists());
}
