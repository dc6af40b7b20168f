//! Mounting: checks with clear errors, daemon mode, the FUSE session,
//! systemd readiness and clean unmount on SIGTERM/SIGINT.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fuser::{Config, MountOption, SessionACL};
use tracing::{error, info, warn};

use crate::cache::CachePolicy;
use crate::fs::LayerFs;
use crate::fuse_dev::DevFs;
use crate::fuse_ring;
use crate::layers::Layers;
use crate::options::MountOptions;
use crate::sys;
use crate::union::Union;

pub struct MountRequest {
    pub options: MountOptions,
    pub mountpoint: PathBuf,
    pub foreground: bool,
}

/// Everything that can be checked before forking, with messages an operator can act on.
fn preflight(req: &MountRequest) -> Result<()> {
    let mp = &req.mountpoint;
    // A previous daemon that died (kill -9, crash) leaves a dead mount
    // (ENOTCONN): clear it, and any stacked below it. Right after the death
    // a request may still end with ECONNABORTED while the kernel tears the
    // connection down (io_uring queues are released asynchronously).
    let dead = |e| matches!(e, Some(libc::ENOTCONN) | Some(libc::ECONNABORTED));
    let mut cleared = 0;
    while dead(sys::statfs_errno(mp)) && cleared < 16 {
        warn!(mountpoint = %mp.display(), "clearing a dead FUSE mount left by a previous daemon");
        sys::umount_detach(mp)
            .with_context(|| format!("cannot clear the dead mount at {}", mp.display()))?;
        cleared += 1;
    }
    match sys::statfs_errno(mp) {
        Some(libc::ENOENT) => bail!("mount point '{}' does not exist", mp.display()),
        Some(e) => bail!(
            "cannot use mount point '{}': {}",
            mp.display(),
            std::io::Error::from_raw_os_error(e)
        ),
        None => {}
    }
    if !mp.is_dir() {
        bail!("mount point '{}' is not a directory", mp.display());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "/dev/fuse does not exist: load the fuse module (modprobe fuse) or give the container the device"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            bail!("no permission to open /dev/fuse: run layerfs as root")
        }
        Err(e) => bail!("cannot open /dev/fuse: {e}"),
    }
    if sys::geteuid() != 0 && req.options.upper.is_some() {
        bail!(
            "no permission: a writable layerfs mount must run as root (it writes whiteouts and trusted.* attributes in the upper layer)"
        );
    }
    Ok(())
}

/// `threads=`, else 2 per CPU (4 to 16): fuser's threads, or with the
/// io_uring queues that many per queue's share (see `fuse_ring::start`).
fn request_threads(opts: &MountOptions) -> usize {
    if opts.threads > 0 {
        opts.threads
    } else {
        std::thread::available_parallelism()
            .map(|n| (n.get() * 2).clamp(4, 16))
            .unwrap_or(4)
    }
}

fn fuse_config(opts: &MountOptions, read_only: bool) -> Config {
    let mut mo = vec![
        MountOption::FSName(opts.fsname.clone().unwrap_or_else(|| "layerfs".into())),
        // As a kernel option (fuser sends Subtype only to fusermount), so
        // /proc/mounts says fuse.layerfs whichever way it was mounted.
        MountOption::CUSTOM("subtype=layerfs".into()),
        MountOption::DefaultPermissions,
    ];
    let f = &opts.flags;
    mo.push(if read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    mo.push(if f.nodev {
        MountOption::NoDev
    } else {
        MountOption::Dev
    });
    mo.push(if f.nosuid {
        MountOption::NoSuid
    } else {
        MountOption::Suid
    });
    mo.push(if f.noexec {
        MountOption::NoExec
    } else {
        MountOption::Exec
    });
    if f.noatime {
        mo.push(MountOption::NoAtime);
    }
    if f.sync {
        mo.push(MountOption::Sync);
    }
    if f.dirsync {
        mo.push(MountOption::DirSync);
    }
    let threads = request_threads(opts);
    let mut c = Config::default();
    c.mount_options = mo;
    c.acl = SessionACL::All;
    c.n_threads = Some(threads);
    c.clone_fd = true;
    c
}

/// Mount and serve until unmounted. In daemon mode the calling process
/// returns only once the mount is up (or failed), like mount(8) expects.
pub fn run(req: MountRequest) -> Result<()> {
    preflight(&req)?;
    let layers = Layers::open(&req.options)?;
    if req.foreground {
        return serve(req, layers, None);
    }
    let (rd, wr) = sys::pipe()?;
    match sys::fork()? {
        0 => {
            drop(rd);
            sys::setsid();
            let status = serve(req, layers, Some(wr));
            if let Err(e) = &status {
                error!("{e:#}");
            }
            std::process::exit(if status.is_ok() { 0 } else { 1 });
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            let mut f = std::fs::File::from(rd);
            let _ = f.read_to_string(&mut msg);
            if msg == "ok" {
                Ok(())
            } else if msg.is_empty() {
                Err(anyhow!(
                    "the layerfs daemon exited before the mount was ready"
                ))
            } else {
                Err(anyhow!("{msg}"))
            }
        }
    }
}

fn report(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(msg.as_bytes());
    }
}

fn serve(req: MountRequest, layers: Layers, mut ready: Option<OwnedFd>) -> Result<()> {
    let result = (|| {
        let read_only = req.options.read_only();
        let union = Arc::new(
            Union::new(layers, read_only, req.options.volatile)
                .context("cannot read the upper layer")?,
        );
        // The caller's mode arrives already masked by the kernel; take it as is.
        sys::set_umask(0);
        sys::block_term_signals()?;
        let config = fuse_config(&req.options, read_only);
        let journal = if read_only || !req.options.journal {
            None
        } else {
            Some(open_journal(&req.options)?)
        };
        let fs = Arc::new(LayerFs::new(
            union.clone(),
            CachePolicy::default(),
            req.options.passthrough,
            journal.clone(),
        ));
        let history = match &journal {
            Some(j) => Some(open_history(
                &req,
                union.clone(),
                fs.files.clone(),
                j.clone(),
            )?),
            None => None,
        };
        let negotiated = Arc::new(fuse_ring::Negotiated::default());
        let devfs = DevFs {
            fs: fs.clone(),
            want_uring: fuse_ring::prepare(req.options.uring),
            uring: negotiated.clone(),
        };
        let session = fuser::Session::new(devfs, &req.mountpoint, &config).map_err(|e| {
            anyhow!(
                "cannot mount on '{}': {e}{}",
                req.mountpoint.display(),
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    " (no permission: run as root)"
                } else {
                    ""
                }
            )
        })?;
        let server = match history {
            Some((cps, svc_path)) => {
                cps.set_kernel(Box::new(KernelCaches(session.notifier())));
                let svc = crate::control::service::Service {
                    mountpoint: std::fs::canonicalize(&req.mountpoint)
                        .unwrap_or_else(|_| req.mountpoint.clone()),
                    lowers: req.options.lowers.clone(),
                    upper: req.options.upper.clone(),
                    statedir: state_dir(&req.options),
                    journal: journal.clone().ok_or_else(|| anyhow!("no journal"))?,
                    checkpoints: cps,
                };
                let mut access = crate::control::server::Access::root_only();
                access.gid = req.options.control_gid;
                let h = crate::control::server::spawn(&svc_path, Arc::new(svc), access)
                    .with_context(|| {
                        format!("cannot serve the control socket '{}'", svc_path.display())
                    })?;
                info!(socket = %svc_path.display(), "control socket ready");
                Some(h)
            }
            None => None,
        };
        // Our own descriptor of the connection: backing-file ioctls and
        // the io_uring queues use it.
        let dev = Arc::new(
            std::os::fd::AsFd::as_fd(&session)
                .try_clone_to_owned()
                .context("cannot duplicate the /dev/fuse descriptor")?,
        );
        fs.io().set_device(dev.clone());
        // The queues can start only after INIT, which the session answers.
        let threads = request_threads(&req.options);
        let rings = std::thread::Builder::new()
            .name("ring-start".into())
            .spawn(move || match negotiated.wait(Duration::from_secs(30)) {
                Some(true) => match fuse_ring::start(fs, dev, threads) {
                    Ok(q) => Some(q),
                    Err(e) => {
                        warn!(err = %e, "cannot start the io_uring queues; using /dev/fuse");
                        None
                    }
                },
                _ => None,
            })?;
        Ok::<_, anyhow::Error>((session, server, rings))
    })();
    let (mut session, _server, rings) = match result {
        Ok(s) => s,
        Err(e) => {
            report(&mut ready, &format!("{e:#}"));
            return Err(e);
        }
    };
    info!(mountpoint = %req.mountpoint.display(), lowers = req.options.lowers.len(),
          upper = ?req.options.upper, "layerfs mounted");
    let mut unmounter = session.unmount_callable();
    let mp = req.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = sys::wait_signal();
            info!(signal = sig, "unmounting on signal");
            if let Err(e) = unmounter.unmount() {
                // Busy: detach now; the kernel finishes when the last user leaves.
                warn!(err = %e, "unmount failed; detaching lazily");
                if let Err(e) = sys::umount_detach(&mp) {
                    error!(err = %e, "lazy unmount failed");
                }
            }
        })?;
    if ready.is_some() {
        // Daemon mode: let go of the caller's terminal and pipes (mount(8)
        // and scripts wait for them to close). Under systemd, stderr is the
        // journal and stays.
        if std::env::var_os("JOURNAL_STREAM").is_none() {
            let _ = sys::redirect_stdio_to_null();
        }
        report(&mut ready, "ok");
    }
    notify_systemd();
    let ran = session.run();
    if let Ok(Some(q)) = rings.join() {
        q.join();
    }
    ran.context("FUSE session ended with an error")?;
    info!("layerfs unmounted");
    Ok(())
}

/// The state directory: `statedir=`, else `workdir/layerfs` (on the overlay
/// partition, outside the union, next to kernel overlayfs's `work`).
pub fn state_dir(opts: &MountOptions) -> Option<PathBuf> {
    opts.statedir
        .clone()
        .or_else(|| opts.work.as_ref().map(|w| w.join("layerfs")))
}

fn open_journal(opts: &MountOptions) -> Result<Arc<crate::journal::Journal>> {
    let dir = state_dir(opts).ok_or_else(|| anyhow!("no state directory"))?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the state directory '{}'", dir.display()))?;
    let db = crate::journal::open_db(&dir.join("db"))?;
    let j = crate::journal::Journal::new(db)?;
    Ok(j)
}

/// Checkpoints over the journal; finishes an interrupted rollback and
/// repairs the journal after a crash, before the union serves anything.
fn open_history(
    req: &MountRequest,
    union: Arc<Union>,
    files: Arc<crate::files::Handles<crate::files::OpenFile>>,
    journal: Arc<crate::journal::Journal>,
) -> Result<(Arc<crate::checkpoint::Checkpoints>, PathBuf)> {
    let dir = state_dir(&req.options).ok_or_else(|| anyhow!("no state directory"))?;
    let fd = sys::open_root(&dir)
        .with_context(|| format!("cannot open the state directory '{}'", dir.display()))?;
    let cps = crate::checkpoint::Checkpoints::open(
        union,
        files,
        journal.clone(),
        std::os::fd::AsFd::as_fd(&fd),
        req.options.retention.clone(),
    )
    .with_context(|| format!("cannot open the checkpoint store in '{}'", dir.display()))?;
    cps.recover()
        .context("cannot finish an interrupted rollback")?;
    let clean = journal.meta_get(crate::journal::META_CLEAN)?.is_some();
    if !clean {
        cps.repair_journal()
            .context("cannot check the upper layer against the journal")?;
    }
    // Until a clean unmount says otherwise, the next mount must check.
    journal.meta_put(crate::journal::META_CLEAN, None)?;
    let sock = req
        .options
        .control
        .clone()
        .unwrap_or_else(|| crate::control::socket_path_for(&req.mountpoint));
    let cps = Arc::new(cps);
    if let Some(every) = req.options.checkpoint_every {
        cps.spawn_periodic(every)?;
    }
    Ok((cps, sock))
}

/// The kernel's caches, told to forget entries after a rollback.
struct KernelCaches(fuser::Notifier);

impl crate::checkpoint::Invalidate for KernelCaches {
    fn entry(&self, parent: u64, name: &std::ffi::OsStr) {
        // ENOENT: the kernel had nothing cached there; fine.
        let _ = self.0.inval_entry(fuser::INodeNo(parent), name);
    }
    fn inode(&self, ino: u64) {
        let _ = self.0.inval_inode(fuser::INodeNo(ino), 0, 0);
    }
}

/// Tell systemd (Type=notify) that the union is serving.
fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let p = Path::new(&path);
    let r = if let Some(abs) = p.to_str().and_then(|s| s.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", p)
    };
    if let Err(e) = r {
        warn!(err = %e, "cannot notify systemd");
    }
}
