//! `layerfs` command line: `layerfs -o lowerdir=...,upperdir=...,workdir=... MOUNTPOINT`.
//! Also works as the mount helper `mount.fuse.layerfs SOURCE MOUNTPOINT -o OPTS`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use layerfs::mount::{run, MountRequest};
use layerfs::options::MountOptions;
use tracing_subscriber::EnvFilter;

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
  threads=N            request threads (default: 2 per CPU, 4..16)
  passthrough=on|off   kernel FUSE passthrough for file data (default on)
  fsname=NAME          source name shown in /proc/mounts
  rw, ro, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, sync, dirsync
                       generic mount flags, honoured
  redirect_dir=, index=, xino=, metacopy=off
                       kernel overlayfs options, accepted for drop-in fstab lines

Examples:
  layerfs -o lowerdir=/repo/app:/repo/base,upperdir=/ovl/upper,workdir=/ovl/work /srv/root
  mount -t fuse.layerfs layerfs /srv/root -o lowerdir=/repo/base,upperdir=/ovl/u,workdir=/ovl/w
Logging: RUST_LOG=debug (tracing filter syntax)."
)]
struct Args {
    /// Mount options (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground.
    #[arg(short = 'f')]
    foreground: bool,
    /// Foreground with debug logging.
    #[arg(short = 'd')]
    debug: bool,
    /// Single-threaded (same as -o threads=1).
    #[arg(short = 's')]
    single: bool,
    /// Accepted for mount helper compatibility (no mtab to write).
    #[arg(short = 'n', hide = true)]
    no_mtab: bool,
    /// Accepted for mount helper compatibility.
    #[arg(short = 'v', hide = true)]
    verbose: bool,
    /// `SOURCE MOUNTPOINT` (mount helper form) or just `MOUNTPOINT`.
    #[arg(value_name = "MOUNTPOINT", num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // fuser warns when the kernel already unmounted (umount(8)); not news.
    let default = if args.debug {
        "debug"
    } else {
        "info,fuser::session=error"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mut opts = match MountOptions::parse(&args.options) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("layerfs: {e}");
            return ExitCode::from(2);
        }
    };
    if args.single {
        opts.threads = 1;
    }
    let mountpoint = args.paths.last().cloned().unwrap_or_default();
    let req = MountRequest {
        options: opts,
        mountpoint,
        foreground: args.foreground || args.debug,
    };
    match run(req) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("layerfs: {e:#}");
            ExitCode::from(1)
        }
    }
}
