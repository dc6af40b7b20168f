//! The change journal, checkpoints and rollback on a real mounted union,
//! driven through the control socket by the real `layerfs-ctl`.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

const CTL: &str = env!("CARGO_BIN_EXE_layerfs-ctl");

fn socket(f: &Fixture) -> PathBuf {
    layerfs::control::socket_path_for(&f.mnt)
}

fn ready(f: &Fixture) {
    let s = socket(f);
    wait_for(|| s.exists(), "control socket");
}

fn ctl_raw(f: &Fixture, args: &[&str]) -> Output {
    Command::new(CTL)
        .arg("-s")
        .arg(socket(f))
        .args(args)
        .output()
        .expect("run layerfs-ctl")
}

/// Run layerfs-ctl --json and parse its output; panics with stderr on failure.
fn ctl(f: &Fixture, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = ctl_raw(f, &a);
    assert!(
        o.status.success(),
        "layerfs-ctl {args:?} failed ({:?}): {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "layerfs-ctl {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

fn records(f: &Fixture, extra: &[&str]) -> Vec<Value> {
    let mut a = vec!["log", "--limit", "100000"];
    a.extend_from_slice(extra);
    ctl(f, &a).as_array().cloned().unwrap_or_default()
}

fn layout(f: &Fixture) {
    fs::create_dir_all(f.l2.join("etc/app")).unwrap();
    fs::create_dir_all(f.l1.join("usr/bin")).unwrap();
    fs::write(f.l2.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    fs::write(f.l2.join("etc/app/app.conf"), "level=1\n").unwrap();
    fs::write(f.l1.join("usr/bin/tool"), "#!/bin/sh\necho v1\n").unwrap();
    fs::write(f.l1.join("etc-motd"), "hello\n").unwrap();
}

/// Every path under `root` with its kind and content (what a user sees).
fn snapshot(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, String)>) {
        let mut ents: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap()).collect();
        ents.sort_by_key(|e| e.file_name());
        for e in ents {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let mode = md.permissions().mode() & 0o7777;
            if md.is_dir() {
                out.push((rel, format!("dir {mode:o}")));
                walk(base, &p, out);
            } else if md.file_type().is_symlink() {
                out.push((
                    rel,
                    format!("link {}", fs::read_link(&p).unwrap().display()),
                ));
            } else {
                let data = fs::read(&p).unwrap();
                out.push((
                    rel,
                    format!("file {mode:o} {}", String::from_utf8_lossy(&data)),
                ));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

#[test]
fn journal_records_each_change_with_its_process() {
    let mut f = Fixture::new();
    layout(&f);
    f.mount();
    ready(&f);
    // Changes made by known programs.
    sh(&format!("touch {}", f.m("new.txt").display()));
    sh(&format!("mkdir {}", f.m("etc/app/conf.d").display()));
    sh(&format!(
        "mv {} {}",
        f.m("new.txt").display(),
        f.m("etc/renamed.txt").display()
    ));
    sh(&format!("chmod 600 {}", f.m("etc/hosts").display()));
    sh(&format!("rm {}", f.m("etc-motd").display()));
    // 200 writes through one open file: one coalesced record.
    {
        let mut fh = fs::OpenOptions::new()
            .append(true)
            .open(f.m("etc/app/app.conf"))
            .unwrap();
        for i in 0..200 {
            writeln!(fh, "line {i}").unwrap();
        }
    }
    // The write record is made when the daemon sees the release, which the
    // kernel sends after close() has returned (asynchronously).
    let is_write = |r: &Value| r["op"] == "write" && r["path"] == "/etc/app/app.conf";
    wait_for(
        || records(&f, &[]).iter().any(is_write),
        "the write record of /etc/app/app.conf",
    );
    let recs = records(&f, &[]);
    let find = |op: &str, path: &str| {
        recs.iter()
            .find(|r| r["op"] == op && r["path"] == path)
            .unwrap_or_else(|| panic!("no {op} record for {path} in {recs:#?}"))
            .clone()
    };
    let c = find("create", "/new.txt");
    assert_eq!(c["comm"], "touch");
    assert_eq!(c["uid"], 0);
    assert!(c["pid"].as_u64().unwrap() > 0);
    assert_eq!(find("mkdir", "/etc/app/conf.d")["comm"], "mkdir");
    let r = find("rename", "/new.txt");
    assert_eq!(r["path2"], "/etc/renamed.txt");
    assert_eq!(r["comm"], "mv");
    assert_eq!(find("chmod", "/etc/hosts")["detail"], "mode 0600");
    assert_eq!(find("unlink", "/etc-motd")["comm"], "rm");
    let writes: Vec<_> = recs.iter().filter(|r| is_write(r)).collect();
    assert_eq!(
        writes.len(),
        1,
        "writes are coalesced per open: {writes:#?}"
    );
    // Queries narrow by path prefix, operation and process.
    let etc = records(&f, &["--path", "/etc/app"]);
    assert!(etc
        .iter()
        .all(|r| r["path"].as_str().unwrap().starts_with("/etc/app")));
    assert!(etc.len() >= 2);
    let rms = records(&f, &["--op", "unlink"]);
    assert_eq!(rms.len(), 1);
    let by_mv = records(&f, &["--comm", "mv"]);
    assert_eq!(by_mv.len(), 1);
    // Records survive a remount.
    f.remount();
    ready(&f);
    assert_eq!(records(&f, &[]).len(), recs.len());
}

#[test]
fn journal_paths_follow_renamed_and_reused_directories() {
    // The daemon caches directory paths per thread until a directory's name
    // changes: each record must still carry the path at the time of change.
    let mut f = Fixture::new();
    layout(&f);
    f.mount();
    ready(&f);
    fs::create_dir(f.m("d1")).unwrap();
    fs::write(f.m("d1/a"), "a").unwrap();
    fs::write(f.m("d1/keep"), "k").unwrap();
    fs::rename(f.m("d1"), f.m("d2")).unwrap();
    fs::write(f.m("d2/b"), "b").unwrap();
    fs::remove_file(f.m("d2/a")).unwrap();
    fs::rename(f.m("d2/b"), f.m("d2/c")).unwrap();
    fs::set_permissions(f.m("d2/c"), fs::Permissions::from_mode(0o600)).unwrap();
    // Directories removed and made again, so the upper may hand out their
    // inode numbers again: the new one's children must not get the old path.
    for i in 0..20 {
        let (x, y) = (format!("x{i}"), format!("y{i}"));
        fs::create_dir(f.m(&x)).unwrap();
        fs::write(f.m(&format!("{x}/f")), "f").unwrap();
        fs::remove_file(f.m(&format!("{x}/f"))).unwrap();
        fs::remove_dir(f.m(&x)).unwrap();
        fs::create_dir(f.m(&y)).unwrap();
        fs::write(f.m(&format!("{y}/g")), "g").unwrap();
    }
    let recs = records(&f, &[]);
    // An operation may be folded into the record before it (`also`).
    let has = |op: &str, path: &str| {
        recs.iter().any(|r| {
            r["path"] == path
                && (r["op"] == op
                    || r["also"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|o| o == op)))
        })
    };
    for (op, path) in [
        ("create", "/d1/a"),
        ("create", "/d1/keep"),
        ("rename", "/d1"),
        ("create", "/d2/b"),
        ("unlink", "/d2/a"),
        ("rename", "/d2/b"),
        ("chmod", "/d2/c"),
    ] {
        assert!(has(op, path), "no {op} {path} in {recs:#?}");
    }
    for i in 0..20 {
        assert!(
            has("create", &format!("/y{i}/g")),
            "no create /y{i}/g in {recs:#?}"
        );
        assert!(has("unlink", &format!("/x{i}/f")), "no unlink /x{i}/f");
    }
    let bad: Vec<_> = recs
        .iter()
        .filter(|r| {
            let p = r["path"].as_str().unwrap_or("");
            (p.starts_with("/d1/") && p != "/d1/a" && p != "/d1/keep")
                || (p.starts_with("/x") && p.ends_with("/g"))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "records under a stale directory path: {bad:#?}"
    );
}

#[test]
fn checkpoint_rollback_and_roll_forward() {
    let mut f = Fixture::new();
    layout(&f);
    f.mount();
    ready(&f);
    fs::write(f.m("etc/app/app.conf"), "level=2\n").unwrap();
    fs::create_dir_all(f.m("var/lib/app")).unwrap();
    fs::write(f.m("var/lib/app/state"), "s1\n").unwrap();
    let a = ctl(
        &f,
        &["checkpoint", "create", "--name", "A", "--message", "first"],
    );
    assert_eq!(a["name"], "A");
    let state_a = snapshot(&f.mnt);

    // Many kinds of change.
    fs::write(f.m("etc/app/app.conf"), "level=3\n").unwrap();
    fs::remove_file(f.m("etc/hosts")).unwrap();
    fs::remove_dir_all(f.m("var/lib/app")).unwrap();
    fs::write(f.m("new-file"), "new\n").unwrap();
    fs::set_permissions(f.m("usr/bin/tool"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::rename(f.m("etc/app"), f.m("etc/app2")).unwrap();
    std::os::unix::fs::symlink("etc/app2", f.m("link")).unwrap();
    ctl(&f, &["checkpoint", "create", "--name", "B"]);
    let state_b = snapshot(&f.mnt);
    assert_ne!(state_a, state_b);

    // The diff names what changed.
    let d = ctl(&f, &["checkpoint", "diff", "A", "B"]);
    let d = d.as_array().unwrap();
    let has =
        |change: &str, path: &str| d.iter().any(|e| e["change"] == change && e["path"] == path);
    assert!(has("added", "/new-file"), "{d:#?}");
    assert!(has("deleted", "/etc/hosts"), "{d:#?}");
    assert!(
        has("modified", "/usr/bin/tool") || has("added", "/usr/bin/tool"),
        "{d:#?}"
    );

    // A process holding a file open across the rollback keeps working.
    let mut held = fs::File::open(f.m("new-file")).unwrap();
    // Warm the kernel caches with B's view.
    let _ = fs::read(f.m("etc/app2/app.conf")).unwrap();
    let _ = fs::metadata(f.m("etc/hosts")).is_err();

    let r = ctl(&f, &["rollback", "A"]);
    let saved = r["saved_as"].as_str().unwrap().to_string();
    assert_eq!(snapshot(&f.mnt), state_a, "after rollback to A");
    assert_eq!(read(f.m("etc/hosts")), "127.0.0.1 localhost\n");
    assert!(!f.m("new-file").exists());
    let mut s = String::new();
    held.seek(SeekFrom::Start(0)).unwrap();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "new\n", "an open file keeps its content");
    drop(held);

    // Roll forward to the state saved before the rollback (== B).
    ctl(&f, &["rollback", &saved]);
    assert_eq!(snapshot(&f.mnt), state_b, "after roll forward");
    ctl(&f, &["rollback", "A"]);
    // Survives a remount (the upper itself is A now).
    f.remount();
    ready(&f);
    assert_eq!(snapshot(&f.mnt), state_a, "A after remount");
    // Live diff against A: nothing.
    let d = ctl(&f, &["checkpoint", "diff", "A"]);
    assert_eq!(d.as_array().unwrap().len(), 0, "{d:#?}");
    // Restore one file from B.
    ctl(&f, &["restore", "B", "/new-file"]);
    assert_eq!(read(f.m("new-file")), "new\n");
    assert!(
        f.m("etc/hosts").exists(),
        "restore touches only the paths given"
    );
    let list = ctl(&f, &["checkpoint", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"A") && names.contains(&"B"), "{names:?}");
    let v = ctl(&f, &["verify"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v:#?}");
    // The rollback is in the journal.
    assert!(!records(&f, &["--op", "rollback"]).is_empty());
}

#[test]
fn bad_input_gets_clear_errors() {
    let mut f = Fixture::new();
    layout(&f);
    f.mount();
    ready(&f);
    let o = ctl_raw(&f, &["rollback", "nope"]);
    assert_eq!(o.status.code(), Some(5), "unknown checkpoint: exit 5");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no checkpoint named 'nope'"), "{err}");
    ctl(&f, &["checkpoint", "create", "--name", "x"]);
    let o = ctl_raw(&f, &["checkpoint", "create", "--name", "x"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));
    let o = ctl_raw(&f, &["checkpoint", "create", "--name", "../evil"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid checkpoint name"));
    let o = ctl_raw(&f, &["restore", "x", "../../etc/passwd"]);
    assert_ne!(o.status.code(), Some(0));
    // A peer that is not root is refused by its credentials.
    let o = Command::new(CTL)
        .arg("-s")
        .arg(socket(&f))
        .arg("status")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    // The socket is root-only: connect fails (EACCES) or the server refuses.
    assert!(matches!(o.status.code(), Some(3) | Some(4)), "{o:?}");
    assert!(!String::from_utf8_lossy(&o.stderr).is_empty());
}

#[test]
fn verify_finds_a_corrupted_object() {
    let mut f = Fixture::new();
    layout(&f);
    f.mount();
    ready(&f);
    let payload = "precious configuration data that must not rot\n".repeat(100);
    fs::write(f.m("etc/app/app.conf"), &payload).unwrap();
    ctl(&f, &["checkpoint", "create", "--name", "good"]);
    // Find the object holding that content (same size) and flip a byte.
    let objects = f.work.join("layerfs/objects");
    let mut hit = None;
    for d in fs::read_dir(&objects).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() {
            continue;
        }
        for o in fs::read_dir(&d).unwrap() {
            let o = o.unwrap().path();
            if fs::metadata(&o).unwrap().len() == payload.len() as u64 {
                hit = Some(o);
            }
        }
    }
    let obj = hit.expect("object with the file's data");
    fs::set_permissions(&obj, fs::Permissions::from_mode(0o600)).unwrap();
    let mut data = fs::read(&obj).unwrap();
    data[10] ^= 0xff;
    fs::write(&obj, data).unwrap();
    let o = ctl_raw(&f, &["verify"]);
    assert_eq!(o.status.code(), Some(6), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("/etc/app/app.conf"), "{out}");
    assert!(out.contains("good"), "{out}");
}

#[test]
fn full_disk_during_checkpoint_loses_nothing() {
    let mut f = Fixture::new();
    layout(&f);
    // Upper, work and state on a 24 MiB filesystem.
    let small = f.root.join("small");
    fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success());
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Umount(small.clone());
    f.upper = small.join("u");
    f.work = small.join("w");
    fs::create_dir_all(&f.upper).unwrap();
    fs::create_dir_all(&f.work).unwrap();
    f.mount();
    ready(&f);
    let chunk: Vec<u8> = (0..6u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    fs::write(f.m("big1"), &chunk).unwrap();
    ctl(&f, &["checkpoint", "create", "--name", "one"]);
    // Fill most of what is left; the checkpoint's copy cannot fit.
    let chunk2: Vec<u8> = chunk.iter().map(|b| b.wrapping_add(1)).collect();
    fs::write(f.m("big2"), &chunk2).unwrap();
    let o = ctl_raw(&f, &["checkpoint", "create", "--name", "two"]);
    assert_ne!(
        o.status.code(),
        Some(0),
        "checkpoint must fail on a full disk"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.to_lowercase().contains("space"), "{err}");
    // Nothing lost: the union and the first checkpoint are intact.
    assert_eq!(fs::read(f.m("big2")).unwrap(), chunk2);
    let list = ctl(&f, &["checkpoint", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let v = ctl(&f, &["verify"]);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
    // Space freed: the checkpoint then works.
    fs::remove_file(f.m("big1")).unwrap();
    ctl(&f, &["checkpoint", "create", "--name", "two"]);
    f.unmount();
}
