//! The upper layer is kernel overlayfs's format: an upper written through
//! layerfs shows the same tree under kernel overlayfs, and the other way round.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// A listing of a tree: path, type, mode and content, sorted.
fn snapshot(root: &Path) -> String {
    sh(&format!(
        "cd {} && find . -mindepth 1 -printf '%p %y %m %s\\n' | sort && find . -type f | sort | xargs -r -d '\\n' md5sum",
        root.display()
    ))
}

fn populate_lowers(f: &Fixture) {
    write(f.l2.join("etc/app.conf"), "v1");
    write(f.l2.join("etc/keep"), "k");
    write(f.l2.join("usr/lib/libx.so"), "lib");
    write(f.l1.join("usr/lib/liby.so"), "liby");
    write(f.l1.join("usr/share/doc/readme"), "doc");
    write(f.l2.join("var/old/a"), "a");
    write(f.l2.join("var/old/b"), "b");
    write(f.l1.join("opt/pkg/bin"), "bin");
}

/// The same sequence of changes, done through whatever is mounted.
fn change_tree(f: &Fixture) {
    write(f.m("etc/app.conf"), "v2");
    fs::remove_file(f.m("etc/keep")).unwrap();
    fs::remove_file(f.m("usr/lib/libx.so")).unwrap();
    fs::remove_dir_all(f.m("var/old")).unwrap();
    fs::create_dir(f.m("var/old")).unwrap();
    write(f.m("var/old/fresh"), "f");
    fs::rename(f.m("usr/share"), f.m("usr/share2")).unwrap();
    fs::rename(f.m("opt/pkg"), f.m("pkg-moved")).unwrap();
    fs::set_permissions(f.m("usr/lib/liby.so"), fs::Permissions::from_mode(0o755)).unwrap();
    write(f.m("new/dir/file"), "new");
}

#[test]
fn layerfs_upper_mounts_with_kernel_overlayfs() {
    let mut f = Fixture::new();
    populate_lowers(&f);
    f.mount();
    change_tree(&f);
    let through_layerfs = snapshot(&f.mnt);
    f.unmount();
    f.mount_kernel();
    let through_kernel = snapshot(&f.mnt);
    f.unmount();
    assert_eq!(through_layerfs, through_kernel);
    assert!(through_kernel.contains("./usr/share2/doc/readme"));
    assert!(!through_kernel.contains("./var/old/a"));
}

#[test]
fn kernel_overlayfs_upper_mounts_with_layerfs() {
    let mut f = Fixture::new();
    populate_lowers(&f);
    f.mount_kernel();
    change_tree(&f);
    let through_kernel = snapshot(&f.mnt);
    f.unmount();
    f.mount();
    let through_layerfs = snapshot(&f.mnt);
    // And layerfs can keep changing it.
    write(f.m("usr/share2/doc/readme"), "edited");
    f.unmount();
    assert_eq!(through_kernel, through_layerfs);
    f.mount_kernel();
    assert_eq!(read(f.m("usr/share2/doc/readme")), "edited");
}
