//! layerd: the layerfs agent. Serves the local HTTP API on a Unix socket
//! (its own, or the one systemd passes), enforces roles by the peer's
//! credentials, audits every call, and runs the coordinator link when one
//! is configured. SIGTERM or SIGINT: clean exit.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Parser;
use layerfs_agent::config::{AgentConfig, DEFAULT_CONFIG};
use layerfs_agent::ops::Agent;

#[derive(Parser)]
#[command(
    name = "layerd",
    version,
    about = "The layerfs agent: local HTTP API (roles, audit) and coordinator link",
    after_help = "API reference: /usr/share/doc/layerfs/AGENT-API.md. Logs: RUST_LOG=debug for more."
)]
struct Args {
    /// Configuration file (a missing default file means built-in defaults).
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Listening socket (overrides `socket` of the configuration; ignored
    /// under socket activation).
    #[arg(short, long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("layerd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("layerd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = match &args.config {
        Some(p) if !p.exists() => bail!("configuration file {} does not exist", p.display()),
        Some(p) => AgentConfig::load(p)?,
        None => {
            let p = Path::new(DEFAULT_CONFIG);
            if !p.exists() {
                tracing::info!(
                    "no {DEFAULT_CONFIG}: running on built-in defaults (no mounts, root only)"
                );
            }
            AgentConfig::load(p)?
        }
    };
    if let Some(s) = args.socket {
        if !s.is_absolute() {
            bail!("--socket must be an absolute path, not {}", s.display());
        }
        cfg.socket = s;
    }
    let activated = activated()?;
    if let Some(l) = &activated {
        // Report the socket actually served (status shows it).
        if let Some(p) = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        {
            cfg.socket = p;
        }
    }
    // The audit log before the socket: a second layerd on the same state
    // fails here, before it looks at the first one's socket.
    let agent = Agent::new(cfg.clone())?;
    let (listener, ours) = match activated {
        Some(l) => {
            tracing::info!(socket = %cfg.socket.display(), "serving the socket passed by systemd");
            (l, None)
        }
        None => {
            let (l, id) = bind(&cfg.socket)?;
            tracing::info!(socket = %cfg.socket.display(), "listening");
            (l, Some(id))
        }
    };
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tracing::info!(
        server_id = %cfg.server_id,
        mounts = ?agent.mounts().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        "layerd {} ready",
        env!("CARGO_PKG_VERSION")
    );
    // Does nothing without a [coordinator] section.
    let link = layerfs_agent::link::spawn(agent.clone());
    let served = layerfs_agent::api::serve(agent, listener, shutdown_signal()).await;
    link.abort();
    served?;
    if let Some(id) = ours {
        remove_if_ours(&cfg.socket, id);
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop layerd with SIGKILL");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// The listening socket of systemd socket activation (LISTEN_FDS=1 for this
/// process: descriptor 3), if any.
fn activated() -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok());
    if pid != Some(std::process::id()) || fds.unwrap_or(0) == 0 {
        return Ok(None);
    }
    // Not for any children (layerd starts none today, but be tidy).
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if fds != Some(1) {
        tracing::warn!(
            "systemd passed {} sockets; serving the first",
            fds.unwrap_or(0)
        );
    }
    let l = layerfs::sys::inherited_unix_listener(3).context("socket activation (LISTEN_FDS)")?;
    Ok(Some(l))
}

/// Bind `path` (mode 0666: every local user may connect; roles are checked
/// per peer). A stale socket (nobody listening) is replaced; a live one or
/// anything that is not a socket is refused. Returns the socket's identity
/// (device, inode) so only our own file is removed at exit.
fn bind(path: &Path) -> anyhow::Result<(std::os::unix::net::UnixListener, (u64, u64))> {
    let p = path.display();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!(
                "{p} is in use: another layerd (or another program) is listening on it; stop it first or pass another --socket"
            ),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!("replacing the stale socket {p}");
                std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {p}"))?;
            }
            Err(e) => bail!("{p} exists and cannot be checked ({e}); remove it if no layerd runs"),
        },
        Ok(_) => bail!("{p} exists and is not a socket; refusing to replace it"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot check {p}: {e}"),
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {p}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot make {p} mode 0666"))?;
    let md = std::fs::symlink_metadata(path).with_context(|| format!("cannot stat {p}"))?;
    Ok((l, (md.dev(), md.ino())))
}

fn remove_if_ours(path: &Path, id: (u64, u64)) {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if (md.dev(), md.ino()) == id {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}
