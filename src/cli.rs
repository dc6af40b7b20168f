//! The command line definition, shared by the binary and the man page generator.

use std::path::PathBuf;

use clap::Parser;

/// A FUSE union filesystem: read-only repository layers under a writable overlay.
#[derive(Parser, Debug)]
#[command(
    name = "layerfs",
    version,
    after_help = "\
Options for -o (comma-separated; the syntax of kernel overlayfs):
  lowerdir=L1:L2:...   read-only layers, topmost first (required)
  upperdir=U           writable layer; without it the mount is read-only
  workdir=W            scratch directory on the same filesystem as U (required with U)
  threads=N            request threads (default: 2 per CPU, 4..16; with uring, shared out
                       over the CPUs' queues, at least 2 per queue)
  passthrough=on|off   kernel FUSE passthrough for file data (default on)
  uring=auto|on|off    serve requests through per-CPU io_uring queues (Linux 6.14+; faster
                       small-file work). auto (default): when the kernel's fuse.enable_uring
                       is on; on: switch it on (root), else fall back to /dev/fuse; off: never
  volatile             do not sync copied-up data to disk (as kernel overlayfs's volatile;
                       faster, but a power loss may leave a copied-up file incomplete)
  fsname=NAME          source name shown in /proc/mounts
  journal=on|off       record every change and offer checkpoints (default on; needs upperdir)
  statedir=DIR         journal database and checkpoint store (default WORKDIR/layerfs; keep
                       it on the overlay partition)
  control=PATH         control socket (default /run/layerfs/<escaped mountpoint>.sock)
  control_gid=GID      members of this group may use the control socket too (default root only)
  checkpoint_every=T   take a checkpoint every T (90s, 15m, 1h, 1d; at least 1m) if anything changed
  keep_last=N, keep_hourly=N, keep_daily=N, keep_weekly=N
                       retention applied after every checkpoint (default: keep all)
  rw, ro, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, sync, dirsync
                       generic mount flags, honoured
  redirect_dir=, index=, xino=, metacopy=off
                       kernel overlayfs options, accepted for drop-in fstab lines

Examples:
  layerfs -o lowerdir=/repo/app:/repo/base,upperdir=/ovl/upper,workdir=/ovl/work /srv/root
  mount -t fuse.layerfs layerfs /srv/root -o lowerdir=/repo/base,upperdir=/ovl/u,workdir=/ovl/w
Checkpoints, rollback and the journal: see `layerfs-ctl --help`.
Logging: RUST_LOG=debug (tracing filter syntax)."
)]
pub struct Args {
    /// Mount options (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Stay in the foreground.
    #[arg(short = 'f')]
    pub foreground: bool,
    /// Foreground with debug logging.
    #[arg(short = 'd')]
    pub debug: bool,
    /// Single-threaded (same as -o threads=1).
    #[arg(short = 's')]
    pub single: bool,
    /// Accepted for mount helper compatibility (no mtab to write).
    #[arg(short = 'n', hide = true)]
    pub no_mtab: bool,
    /// Accepted for mount helper compatibility.
    #[arg(short = 'v', hide = true)]
    pub verbose: bool,
    /// `SOURCE MOUNTPOINT` (mount helper form) or just `MOUNTPOINT`.
    #[arg(value_name = "MOUNTPOINT", num_args = 1..=2, required = true)]
    pub paths: Vec<PathBuf>,
}
