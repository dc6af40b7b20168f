//! `layerfs` command line: `layerfs -o lowerdir=...,upperdir=...,workdir=... MOUNTPOINT`.
//! Also works as the mount helper `mount.fuse.layerfs SOURCE MOUNTPOINT -o OPTS`.

use std::process::ExitCode;

use clap::Parser;
use layerfs::cli::Args;
use layerfs::mount::{run, MountRequest};
use layerfs::options::MountOptions;
use tracing_subscriber::EnvFilter;

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
