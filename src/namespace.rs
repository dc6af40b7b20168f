//! Operations that change names: create, mkdir, mknod, symlink, link,
//! unlink, rmdir, rename. Each one is atomic in the upper layer: whenever a
//! whiteout must appear or disappear together with an object, the change is
//! made with a single rename (`RENAME_WHITEOUT`, `RENAME_EXCHANGE`, or an
//! object built in workdir and renamed over the whiteout).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use crate::copyup::{copy_up, mark_impure};
use crate::dirmerge;
use crate::inode::{make_ino, Node, NodeState};
use crate::layers::remove_tree;
use crate::sys::{self, Stat};
use crate::union::{errno, fmt_of, Ctx, Union};
use crate::whiteout;

/// What to create.
pub enum NewObject<'a> {
    File { mode: u32, flags: i32 },
    Dir { mode: u32 },
    Node { mode: u32, rdev: u64 },
    Symlink { target: &'a OsStr },
}

impl NewObject<'_> {
    fn fmt(&self) -> u32 {
        match self {
            NewObject::File { .. } => libc::S_IFREG,
            NewObject::Dir { .. } => libc::S_IFDIR,
            NewObject::Node { mode, .. } => mode & libc::S_IFMT,
            NewObject::Symlink { .. } => libc::S_IFLNK,
        }
    }
}

/// Create the object in `dir` under `name`; a regular file is returned open.
fn make(dir: BorrowedFd<'_>, name: &OsStr, obj: &NewObject<'_>) -> io::Result<Option<OwnedFd>> {
    match obj {
        NewObject::File { mode, flags } => {
            let fl = crate::files::backing_flags(*flags) | libc::O_CREAT | libc::O_EXCL;
            sys::openat(dir, name, fl, mode & 0o7777).map(Some)
        }
        NewObject::Dir { mode } => sys::mkdirat(dir, name, mode & 0o7777).map(|_| None),
        NewObject::Node { mode, rdev } => {
            sys::mknodat(dir, name, *mode, *rdev)?;
            if *mode & libc::S_IFMT == libc::S_IFCHR && *rdev == 0 {
                if let Err(e) = whiteout::mark_chardev(dir, name) {
                    let _ = sys::unlinkat(dir, name, false);
                    return Err(e);
                }
            }
            Ok(None)
        }
        NewObject::Symlink { target } => sys::symlinkat(target, dir, name).map(|_| None),
    }
}

/// Give a new object to its creator. It was made as root with the caller's
/// fsgid (so setgid directories work as usual); set the uid, and put back
/// setuid/setgid bits that chown cleared, stripping setgid where the caller
/// is not in the file's group (as the kernel does).
fn give_to_caller(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    obj: &NewObject<'_>,
    ctx: &Ctx,
) -> io::Result<()> {
    if ctx.uid == 0 {
        return Ok(());
    }
    sys::fchownat(dir, name, ctx.uid, u32::MAX)?;
    let mode = match obj {
        NewObject::File { mode, .. } | NewObject::Node { mode, .. } => *mode,
        _ => return Ok(()),
    };
    let mut special = mode & (libc::S_ISUID | libc::S_ISGID);
    if special == 0 {
        return Ok(());
    }
    let st = sys::fstatat(dir, name)?;
    if special & libc::S_ISGID != 0
        && st.st_gid != ctx.gid
        && !sys::process_groups(ctx.pid).contains(&st.st_gid)
    {
        special &= !libc::S_ISGID;
    }
    if special != 0 {
        let fd = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        sys::chmod_fd(fd.as_fd(), (st.st_mode & 0o7777) | special)?;
    }
    Ok(())
}

/// Run `f` with the calling thread's filesystem gid set to `gid`.
fn with_fsgid<T>(gid: u32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if gid == 0 {
        return f(); // the daemon's own fsgid already
    }
    let _g = sys::FsGid::set(gid);
    f()
}

/// Create a new object; returns its node (one kernel reference counted), its
/// attributes and, for files, the open descriptor.
pub fn create(
    u: &Union,
    ctx: &Ctx,
    parent: u64,
    name: &OsStr,
    obj: NewObject<'_>,
) -> io::Result<(Arc<Node>, Stat, Option<OwnedFd>)> {
    u.check_writable()?;
    sys::check_name(name)?;
    let pnode = u.node(parent)?;
    // No union probe: the kernel calls create/mkdir/mknod/symlink only after a
    // negative lookup, under the directory lock, and every change goes
    // through layerfs. The upper is checked below (whiteout or not).
    copy_up(u, &pnode, true)?;
    let pfd = u.upper_dir_fd(&pnode)?;
    let over_whiteout = match sys::fstatat(pfd.as_fd(), name) {
        Ok(st) if whiteout::is_whiteout(pfd.as_fd(), name, &st) => true,
        Ok(_) => return Err(errno(libc::EEXIST)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
        Err(e) => return Err(e),
    };
    let fd = if !over_whiteout {
        let fd = with_fsgid(ctx.gid, || make(pfd.as_fd(), name, &obj))?;
        if let Err(e) = give_to_caller(pfd.as_fd(), name, &obj, ctx) {
            let _ = sys::unlinkat(pfd.as_fd(), name, obj.fmt() == libc::S_IFDIR);
            return Err(e);
        }
        fd
    } else {
        // Build in workdir, then replace the whiteout in one step.
        let work = u.layers.work()?;
        let tmp = u.tmp_name();
        let built = (|| {
            let fd = with_fsgid(ctx.gid, || make(work, &tmp, &obj))?;
            // In workdir the parent is not the setgid directory: fix the group.
            let pst = sys::fstat(pfd.as_fd())?;
            let gid = if pst.st_mode & libc::S_ISGID != 0 {
                pst.st_gid
            } else {
                ctx.gid
            };
            sys::fchownat(work, &tmp, ctx.uid, gid)?;
            if let NewObject::Dir { mode } = obj {
                let d = sys::openat(work, &tmp, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                let inherit = if pst.st_mode & libc::S_ISGID != 0 {
                    libc::S_ISGID
                } else {
                    0
                };
                sys::chmod_fd(d.as_fd(), (mode & 0o7777) | inherit)?;
                // A directory where a lower one was deleted must not show its entries.
                whiteout::set_opaque(work, Some(&tmp))?;
                sys::renameat2(work, &tmp, pfd.as_fd(), name, sys::RENAME_EXCHANGE)?;
                sys::unlinkat(work, &tmp, false)?;
            } else {
                if let NewObject::File { mode, .. } | NewObject::Node { mode, .. } = obj {
                    if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                        let d = sys::openat(work, &tmp, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                        sys::chmod_fd(d.as_fd(), mode & 0o7777)?;
                    }
                }
                sys::renameat2(work, &tmp, pfd.as_fd(), name, 0)?;
            }
            Ok(fd)
        })();
        match built {
            Ok(fd) => fd,
            Err(e) => {
                let _ = remove_tree(work, &tmp);
                return Err(e);
            }
        }
    };
    let st = match &fd {
        Some(f) => sys::fstat(f.as_fd())?,
        None => sys::fstatat(pfd.as_fd(), name)?,
    };
    let (node, st) = register_new(u, parent, name, st);
    u.dir_changed(&pnode);
    Ok((node, st, fd))
}

fn register_new(u: &Union, parent: u64, name: &OsStr, mut st: Stat) -> (Arc<Node>, Stat) {
    st.st_ino = make_ino(0, st.st_ino);
    let node = u.inodes.lookup_or_insert(
        st.st_ino,
        fmt_of(&st),
        NodeState {
            parent,
            name: name.to_os_string(),
            aliases: vec![],
            upper: true,
            lower: None,
            lower_dirs: vec![],
            impure: false,
            unlinked: false,
        },
    );
    (node, st)
}

/// Remove `name` from the upper directory `pfd`, leaving a whiteout when a
/// lower object would otherwise show through. Atomic in every case.
fn remove_upper(
    u: &Union,
    pfd: BorrowedFd<'_>,
    name: &OsStr,
    is_dir: bool,
    need_whiteout: bool,
) -> io::Result<()> {
    if !need_whiteout {
        match sys::unlinkat(pfd, name, is_dir) {
            Err(e) if is_dir && e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            r => return r,
        }
    }
    // Move it out to workdir, leaving a whiteout (or nothing) in its place.
    let work = u.layers.work()?;
    let tmp = u.tmp_name();
    let flags = if need_whiteout {
        sys::RENAME_WHITEOUT
    } else {
        0
    };
    sys::renameat2(pfd, name, work, &tmp, flags)?;
    // The directory held only whiteouts (the union said it was empty).
    remove_tree(work, &tmp)
}

pub fn unlink(u: &Union, parent: u64, name: &OsStr) -> io::Result<()> {
    remove(u, parent, name, false)
}

pub fn rmdir(u: &Union, parent: u64, name: &OsStr) -> io::Result<()> {
    remove(u, parent, name, true)
}

fn remove(u: &Union, parent: u64, name: &OsStr, dir: bool) -> io::Result<()> {
    u.check_writable()?;
    let pnode = u.node(parent)?;
    let (node, _, probe) = u.lookup_probe(parent, name)?;
    // lookup counted a reference the kernel does not know about.
    let ino = node.ino;
    let result = (|| {
        if dir && !node.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        if !dir && node.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        if dir && !dirmerge::is_empty(u, &node)? {
            return Err(errno(libc::ENOTEMPTY));
        }
        copy_up(u, &pnode, true)?;
        let pfd = u.upper_dir_fd(&pnode)?;
        // What the probe saw at this name: an upper object hides a lower one
        // only if there is one (checked); a lower object always needs a whiteout.
        let upper_here = probe.upper;
        let need_whiteout = if !probe.upper || !probe.lower_dirs.is_empty() {
            true
        } else {
            let pst = pnode.state.read().clone();
            u.lower_has(&pst, name)?
        };
        if upper_here {
            remove_upper(u, pfd.as_fd(), name, dir, need_whiteout)?;
        } else if need_whiteout {
            whiteout::make_whiteout(pfd.as_fd(), name)?;
        }
        if dir {
            u.forget_upper_dir(node.ino);
        }
        drop_name(u, &node, parent, name);
        u.dir_changed(&pnode);
        Ok(())
    })();
    u.inodes.forget(ino, 1);
    result
}

/// A name of `node` went away; the node stays while other names or kernel references remain.
fn drop_name(u: &Union, node: &Node, parent: u64, name: &OsStr) {
    let _bump = NamesChanged(u, node);
    let mut st = node.state.write();
    if st.parent == parent && st.name == name {
        if let Some((p, n)) = st.aliases.pop() {
            st.parent = p;
            st.name = n;
        } else {
            st.unlinked = true;
        }
    } else {
        st.aliases.retain(|(p, n)| !(*p == parent && n == name));
    }
}

pub fn link(u: &Union, ino: u64, newparent: u64, newname: &OsStr) -> io::Result<(Arc<Node>, Stat)> {
    u.check_writable()?;
    sys::check_name(newname)?;
    let node = u.node(ino)?;
    if node.is_dir() {
        return Err(errno(libc::EPERM));
    }
    let pnode = u.node(newparent)?;
    if u.probe_in(&pnode, newname)?.is_some() {
        return Err(errno(libc::EEXIST));
    }
    copy_up(u, &node, true)?;
    copy_up(u, &pnode, true)?;
    let src = u.loc(&node)?;
    let pfd = u.upper_dir_fd(&pnode)?;
    let over_whiteout = matches!(sys::fstatat(pfd.as_fd(), newname), Ok(st) if whiteout::is_whiteout(pfd.as_fd(), newname, &st));
    if over_whiteout {
        let work = u.layers.work()?;
        let tmp = u.tmp_name();
        sys::linkat(src.dir.as_fd(), &src.name, work, &tmp)?;
        if let Err(e) = sys::renameat2(work, &tmp, pfd.as_fd(), newname, 0) {
            let _ = sys::unlinkat(work, &tmp, false);
            return Err(e);
        }
    } else {
        sys::linkat(src.dir.as_fd(), &src.name, pfd.as_fd(), newname)?;
    }
    if node.ino != make_ino(0, sys::fstatat(pfd.as_fd(), newname)?.st_ino) {
        mark_impure(u, &pnode)?;
    }
    {
        let mut st = node.state.write();
        st.aliases.push((newparent, newname.to_os_string()));
    }
    let st = u.stat_node(&node)?;
    // The kernel counts the new entry as a lookup.
    let node = u.inodes.lookup_or_insert(
        node.ino,
        node.fmt,
        NodeState {
            parent: newparent,
            name: newname.to_os_string(),
            aliases: vec![],
            upper: true,
            lower: None,
            lower_dirs: vec![],
            impure: false,
            unlinked: false,
        },
    );
    u.dir_changed(&pnode);
    Ok((node, st))
}

/// Prepare a directory that is about to appear under a new name: if it
/// merges lower directories, record where they are (redirect) so the merge
/// follows it; otherwise make it opaque where the new name has lower entries.
fn mark_moved_dir(
    node: &Node,
    pfd: BorrowedFd<'_>,
    name: &OsStr,
    target_has_lower: bool,
) -> io::Result<()> {
    let st = node.state.read().clone();
    if let Some(first) = st.lower_dirs.first() {
        whiteout::set_redirect(pfd, Some(name), &first.path)?;
    } else if target_has_lower {
        whiteout::set_opaque(pfd, Some(name))?;
    }
    Ok(())
}

pub fn rename(
    u: &Union,
    parent: u64,
    name: &OsStr,
    newparent: u64,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    u.check_writable()?;
    sys::check_name(newname)?;
    if flags & !(sys::RENAME_NOREPLACE | sys::RENAME_EXCHANGE) != 0 {
        return Err(errno(libc::EINVAL));
    }
    let exchange = flags & sys::RENAME_EXCHANGE != 0;
    let p1 = u.node(parent)?;
    let p2 = u.node(newparent)?;
    let (src, _) = u.lookup(parent, name)?;
    let dst = match u.lookup(newparent, newname) {
        Ok((n, _)) => Some(n),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => {
            u.inodes.forget(src.ino, 1);
            return Err(e);
        }
    };
    let result = rename_nodes(
        u,
        &p1,
        name,
        &p2,
        newname,
        &src,
        dst.as_deref(),
        flags,
        exchange,
    );
    u.inodes.forget(src.ino, 1);
    if let Some(d) = &dst {
        u.inodes.forget(d.ino, 1);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn rename_nodes(
    u: &Union,
    p1: &Node,
    name: &OsStr,
    p2: &Node,
    newname: &OsStr,
    src: &Node,
    dst: Option<&Node>,
    flags: u32,
    exchange: bool,
) -> io::Result<()> {
    if let Some(d) = dst {
        if d.ino == src.ino && !exchange {
            return Ok(()); // same object (hard links): POSIX says do nothing
        }
        if flags & sys::RENAME_NOREPLACE != 0 {
            return Err(errno(libc::EEXIST));
        }
        if !exchange {
            match (src.is_dir(), d.is_dir()) {
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, true) if !dirmerge::is_empty(u, d)? => return Err(errno(libc::ENOTEMPTY)),
                _ => {}
            }
        }
    } else if exchange {
        return Err(errno(libc::ENOENT));
    }
    // A directory cannot move below itself.
    if src.is_dir() {
        let mut a = p2.ino;
        loop {
            if a == src.ino {
                return Err(errno(libc::EINVAL));
            }
            if a == crate::inode::ROOT_INO {
                break;
            }
            a = u.node(a)?.state.read().parent;
        }
    }

    copy_up(u, src, true)?;
    copy_up(u, p2, true)?;
    if let Some(d) = dst {
        if exchange {
            copy_up(u, d, true)?;
        }
    }
    let pfd1 = u.upper_dir_fd(p1)?;
    let pfd2 = u.upper_dir_fd(p2)?;
    let p1st = p1.state.read().clone();
    let p2st = p2.state.read().clone();
    let src_lower_here = u.lower_has(&p1st, name)?;
    let dst_lower_here = u.lower_has(&p2st, newname)?;

    if src.is_dir() {
        mark_moved_dir(src, pfd1.as_fd(), name, dst_lower_here)?;
    }
    if exchange {
        let d = dst.ok_or_else(|| errno(libc::ENOENT))?;
        if d.is_dir() {
            mark_moved_dir(d, pfd2.as_fd(), newname, src_lower_here)?;
        }
        sys::renameat2(
            pfd1.as_fd(),
            name,
            pfd2.as_fd(),
            newname,
            sys::RENAME_EXCHANGE,
        )?;
        mark_impure(u, p1)?;
        mark_impure(u, p2)?;
        set_name(u, d, p2.ino, newname, p1.ino, name);
    } else {
        // What sits in the upper at the target: a whiteout or an empty merged
        // directory's leftovers must go first (rename cannot replace them).
        match sys::fstatat(pfd2.as_fd(), newname) {
            Ok(st) if whiteout::is_whiteout(pfd2.as_fd(), newname, &st) && src.is_dir() => {
                // Swap the directory in, then drop the whiteout that was swapped out.
                sys::renameat2(
                    pfd1.as_fd(),
                    name,
                    pfd2.as_fd(),
                    newname,
                    sys::RENAME_EXCHANGE,
                )?;
                // Where a lower object is at the old name, the swapped-out
                // whiteout keeps hiding it; otherwise it goes.
                if !src_lower_here {
                    sys::unlinkat(pfd1.as_fd(), name, false)?;
                }
                finish_rename(u, p1, name, p2, newname, src, dst)?;
                return Ok(());
            }
            Ok(st) if fmt_of(&st) == libc::S_IFDIR && src.is_dir() => {
                // The target directory is empty in the union; its upper may hold whiteouts.
                clear_whiteouts(pfd2.as_fd(), newname)?;
            }
            _ => {}
        }
        let fl = if src_lower_here {
            sys::RENAME_WHITEOUT
        } else {
            0
        };
        sys::renameat2(pfd1.as_fd(), name, pfd2.as_fd(), newname, fl)?;
        finish_rename(u, p1, name, p2, newname, src, dst)?;
        return Ok(());
    }
    set_name(u, src, p1.ino, name, p2.ino, newname);
    u.dir_changed(p1);
    u.dir_changed(p2);
    Ok(())
}

fn finish_rename(
    u: &Union,
    p1: &Node,
    name: &OsStr,
    p2: &Node,
    newname: &OsStr,
    src: &Node,
    dst: Option<&Node>,
) -> io::Result<()> {
    if let Some(d) = dst {
        drop_name(u, d, p2.ino, newname);
        if d.is_dir() {
            u.forget_upper_dir(d.ino);
        }
    }
    set_name(u, src, p1.ino, name, p2.ino, newname);
    // The moved entry keeps an inode number from elsewhere.
    if p1.ino != p2.ino || src.is_dir() {
        mark_impure(u, p2)?;
    }
    u.dir_changed(p1);
    u.dir_changed(p2);
    Ok(())
}

fn set_name(u: &Union, node: &Node, from_parent: u64, from: &OsStr, to_parent: u64, to: &OsStr) {
    let _bump = NamesChanged(u, node);
    let mut st = node.state.write();
    if st.parent == from_parent && st.name == from {
        st.parent = to_parent;
        st.name = to.to_os_string();
    } else if let Some(a) = st
        .aliases
        .iter_mut()
        .find(|(p, n)| *p == from_parent && n == from)
    {
        *a = (to_parent, to.to_os_string());
    } else {
        st.parent = to_parent;
        st.name = to.to_os_string();
    }
    st.unlinked = false;
}

/// Remove the whiteouts inside upper directory `dir/name` (it is empty in the union).
fn clear_whiteouts(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let sub = sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    for e in sys::read_dir_all(sub.as_fd())? {
        let n = OsStr::from_bytes(&e.name);
        let st = sys::fstatat(sub.as_fd(), n)?;
        if whiteout::is_whiteout(sub.as_fd(), n, &st) {
            sys::unlinkat(sub.as_fd(), n, false)?;
        } else {
            return Err(errno(libc::ENOTEMPTY));
        }
    }
    Ok(())
}

/// Bumps the namespace generation when dropped, i.e. after the name change
/// and its lock are done. Only directories: the cached paths are directory
/// paths, and a file's name is never part of another object's path.
struct NamesChanged<'a>(&'a Union, &'a Node);

impl Drop for NamesChanged<'_> {
    fn drop(&mut self) {
        if self.1.is_dir() {
            self.0.inodes.names_changed();
        }
    }
}
