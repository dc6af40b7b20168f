//! Writes `layerfs.8` and bash/zsh/fish completions, generated from
//! `layerfs::cli::Args`, into a directory:
//!
//! ```text
//! layerfs-gendocs OUTDIR
//!   OUTDIR/man/layerfs.8
//!   OUTDIR/completions/layerfs.bash
//!   OUTDIR/completions/_layerfs
//!   OUTDIR/completions/layerfs.fish
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::{generate, Shell};
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

fn nofill(r: &mut Roff, text: &str) {
    r.control("nf", [] as [&str; 0]);
    for line in text.lines() {
        r.text([roman(line)]);
    }
    r.control("fi", [] as [&str; 0]);
}

fn head_sections(out: &mut dyn Write) -> std::io::Result<()> {
    let mut r = Roff::new();
    r.control("SH", ["SYNOPSIS"]);
    r.text([
        bold("layerfs"),
        roman(" [-f] [-d] [-s] "),
        bold("-o"),
        roman(" "),
        italic("OPTIONS"),
        roman(" "),
        italic("MOUNTPOINT"),
    ]);
    r.control("br", [] as [&str; 0]);
    r.text([
        bold("mount.fuse.layerfs"),
        roman(" "),
        italic("SOURCE MOUNTPOINT"),
        roman(" "),
        bold("-o"),
        roman(" "),
        italic("OPTIONS"),
        roman(" [-n] [-v] [-s]"),
    ]);
    r.control("br", [] as [&str; 0]);
    r.text([
        bold("mount -t fuse.layerfs"),
        roman(" "),
        italic("SOURCE MOUNTPOINT"),
        roman(" "),
        bold("-o"),
        roman(" "),
        italic("OPTIONS"),
    ]);

    r.control("SH", ["DESCRIPTION"]);
    r.text([roman(
        "layerfs mounts a union of read-only lower layers (topmost first) under an optional \
         writable upper layer, with FUSE. The upper and work directories use the on-disk format \
         of kernel overlayfs: whiteouts are 0/0 character devices, opaque directories and \
         redirects are trusted.overlay.* extended attributes, and files are copied up whole on \
         their first change. Without upperdir= the mount is read-only.",
    )]);
    r.control("PP", [] as [&str; 0]);
    r.text([roman(
        "Without -f, layerfs returns once the mount is serving and keeps running in the \
         background until the filesystem is unmounted (umount(8)) or it receives SIGTERM.",
    )]);
    r.to_writer(out)
}

/// The -o option list and examples of `--help`, kept in their column layout.
fn options_text_section(out: &mut dyn Write, cmd: &clap::Command) -> std::io::Result<()> {
    let Some(text) = cmd.get_after_help().map(|t| t.to_string()) else {
        return Ok(());
    };
    let mut r = Roff::new();
    r.control("SH", ["MOUNT OPTIONS"]);
    nofill(&mut r, &text);
    r.to_writer(out)
}

/// Sections the CLI definition cannot carry: how layerfs is run on a system.
fn extra_sections(out: &mut dyn Write) -> std::io::Result<()> {
    let mut r = Roff::new();

    r.control("SH", ["MOUNT HELPER"]);
    r.text([
        roman("Installed as "),
        bold("/sbin/mount.fuse.layerfs"),
        roman(", layerfs is called by "),
        bold("mount"),
        roman("(8) for filesystems of type "),
        bold("fuse.layerfs"),
        roman(" as "),
        italic("mount.fuse.layerfs SOURCE MOUNTPOINT -o OPTIONS"),
        roman(". It returns once the union is serving, so an "),
        bold("/etc/fstab"),
        roman(" line or a systemd .mount unit works like any other filesystem. The flags -n and -v that mount(8) may pass are accepted and ignored."),
    ]);
    r.control("PP", [] as [&str; 0]);
    nofill(
        &mut r,
        "layerfs /srv/root fuse.layerfs lowerdir=/repo/app:/repo/base,upperdir=/ovl/upper,workdir=/ovl/work,nodev 0 0",
    );

    r.control("SH", ["SYSTEMD"]);
    r.text([
        bold("layerfs@NAME.service"),
        roman(" mounts the union described in "),
        bold("/etc/layerfs/mounts/NAME.conf"),
        roman(" (LOWERDIR, UPPERDIR, WORKDIR, MOUNTPOINT and optional EXTRA_OPTIONS). It is of "),
        bold("Type=notify"),
        roman(": layerfs reports readiness only once the mount is serving. Stopping the unit sends SIGTERM, on which layerfs unmounts (lazily if the mount is busy) and exits. Logs go to the journal: "),
        bold("journalctl -u layerfs@NAME"),
        roman(". Nothing is enabled when the package is installed."),
    ]);
    r.control("PP", [] as [&str; 0]);
    r.text([
        bold("layerd.socket"),
        roman(" and "),
        bold("layerd.service"),
        roman(" run the layerfs agent on demand, on "),
        bold("/run/layerd.sock"),
        roman("."),
    ]);

    r.control("SH", ["SIGNALS"]);
    r.text([
        bold("SIGTERM"),
        roman(", "),
        bold("SIGINT"),
        roman(": unmount and exit. A mount left dead by a killed daemon is cleared at the next mount on the same mount point."),
    ]);

    r.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/layerfs/mounts/NAME.conf",
            "definition of the mount started by layerfs@NAME.service",
        ),
        (
            "/etc/layerfs/mounts/example.conf.sample",
            "commented example of such a definition",
        ),
        (
            "/etc/layerfs/agent.toml.sample",
            "configuration of the agent (placeholder)",
        ),
        (
            "/dev/fuse",
            "the FUSE device; layerfs must run as root to mount a writable union",
        ),
    ] {
        r.control("TP", [] as [&str; 0]);
        r.text([bold(path)]);
        r.text([roman(what)]);
    }

    r.control("SH", ["SEE ALSO"]);
    r.text([roman(
        "mount(8), fstab(5), systemd.mount(5), systemd.service(5), fuse(8), journalctl(1)",
    )]);
    r.to_writer(out)
}

fn write_man(dir: &Path) -> std::io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let cmd = layerfs::cli::Args::command();
    let man = Man::new(cmd.clone())
        .section("8")
        .manual("System Administration")
        .source(format!("layerfs {}", env!("CARGO_PKG_VERSION")));
    let mut buf = Vec::new();
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    head_sections(&mut buf)?;
    man.render_options_section(&mut buf)?;
    options_text_section(&mut buf, &cmd)?;
    extra_sections(&mut buf)?;
    man.render_version_section(&mut buf)?;
    let path = dir.join("layerfs.8");
    fs::write(&path, buf)?;
    Ok(path)
}

fn write_completions(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (shell, file) in [
        (Shell::Bash, "layerfs.bash"),
        (Shell::Zsh, "_layerfs"),
        (Shell::Fish, "layerfs.fish"),
    ] {
        let mut cmd = layerfs::cli::Args::command();
        let mut buf = Vec::new();
        generate(shell, &mut cmd, "layerfs", &mut buf);
        let path = dir.join(file);
        fs::write(&path, buf)?;
        out.push(path);
    }
    Ok(out)
}

fn main() -> ExitCode {
    let Some(outdir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: layerfs-gendocs OUTDIR");
        return ExitCode::from(2);
    };
    let result = (|| {
        let mut written = vec![write_man(&outdir.join("man"))?];
        written.extend(write_completions(&outdir.join("completions"))?);
        Ok::<_, std::io::Error>(written)
    })();
    match result {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("layerfs-gendocs: {e}");
            ExitCode::FAILURE
        }
    }
}
