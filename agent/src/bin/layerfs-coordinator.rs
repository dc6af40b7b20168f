//! layerfs-coordinator: receives the change journals of many layerd agents,
//! stores them durably, and sends them operators' commands.
//!
//! `serve` runs the coordinator; the other subcommands talk to a running one
//! through its admin socket (DATA/admin.sock, root or the coordinator's user
//! only) and print JSON.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use layerfs_agent::coordinator::{self, AdminClient, AdminOp};
use layerfs_agent::AgentOp;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "layerfs-coordinator",
    version,
    about = "Coordinator of layerd agents: journal store and commands"
)]
struct Cli {
    /// Data directory (records, cursors, admin socket).
    #[arg(long, global = true, default_value = "/var/lib/layerfs-coordinator")]
    data: PathBuf,
    /// Admin socket (default: DATA/admin.sock).
    #[arg(long, global = true)]
    admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Serve {
        /// Address agents connect to (host:port). Not loopback: needs --cert/--key.
        #[arg(long)]
        listen: SocketAddr,
        /// Shared secrets agents present: one per line.
        #[arg(long)]
        token_file: PathBuf,
        /// TLS certificate chain (PEM).
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
    },
    /// Known servers: registration, connection, stored journal position per mount.
    Servers,
    /// Stored journal records of a server's mount (a JSON array).
    Changes {
        #[arg(long)]
        server: String,
        /// Mount name (default: the server's only mount).
        #[arg(long)]
        mount: Option<String>,
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        /// At most this many records (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Run an operation on a connected server and print its result.
    Command {
        #[arg(long)]
        server: String,
        /// Mount name (default: the server's only mount).
        #[arg(long)]
        mount: Option<String>,
        /// Seconds to wait for the result.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
        #[command(subcommand)]
        op: RemoteOp,
    },
}

#[derive(Subcommand)]
enum RemoteOp {
    /// Create a checkpoint.
    Checkpoint {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        message: Option<String>,
    },
    /// List checkpoints.
    Checkpoints,
    /// Make the union exactly checkpoint NAME.
    Rollback { name: String },
    /// Bring back PATHs as they are in checkpoint NAME.
    Restore {
        name: String,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// The agent's and its mounts' status.
    Status,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("layerfs-coordinator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("layerfs-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let admin = cli
        .admin_socket
        .clone()
        .unwrap_or_else(|| cli.data.join("admin.sock"));
    match cli.cmd {
        Cmd::Serve {
            listen,
            token_file,
            cert,
            key,
        } => {
            let tokens = layerfs_agent::wire::read_token_file(&token_file)?;
            let running = coordinator::start(coordinator::Config {
                listen,
                data_dir: cli.data.clone(),
                tokens,
                tls: cert.zip(key),
                admin_socket: cli.admin_socket.clone(),
            })
            .await?;
            // The address actually bound (port 0 picks one), for scripts.
            println!("listening on {}", running.local_addr);
            let _ = std::io::stdout().flush();
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("stopping");
            running.shutdown();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Servers => {
            let mut c = AdminClient::connect(&admin).await?;
            print_reply(c.call(AdminOp::Servers).await?)
        }
        Cmd::Changes {
            server,
            mount,
            from_seq,
            limit,
        } => {
            let mut c = AdminClient::connect(&admin).await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut next = from_seq;
            let mut left = limit.unwrap_or(u64::MAX);
            let mut first = true;
            out.write_all(b"[")?;
            while left > 0 {
                let page = left.min(coordinator::MAX_CHANGES_PAGE);
                let r = c
                    .call(AdminOp::Changes {
                        server: server.clone(),
                        mount: mount.clone(),
                        from_seq: Some(next),
                        limit: Some(page),
                    })
                    .await?;
                let v = match r {
                    Ok(v) => v,
                    Err(e) => {
                        drop(out);
                        eprintln!("layerfs-coordinator: {} ({})", e.message, e.code);
                        return Ok(ExitCode::FAILURE);
                    }
                };
                let records = v
                    .get("records")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for r in &records {
                    out.write_all(if first { b"\n" } else { b",\n" })?;
                    serde_json::to_writer(&mut out, r)?;
                    first = false;
                }
                if (records.len() as u64) < page {
                    break;
                }
                left -= records.len() as u64;
                next = v
                    .get("next_seq")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
            }
            out.write_all(b"\n]\n")?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Command {
            server,
            mount,
            timeout,
            op,
        } => {
            let command = match op {
                RemoteOp::Checkpoint { name, message } => AgentOp::CheckpointCreate {
                    mount,
                    name,
                    message,
                },
                RemoteOp::Checkpoints => AgentOp::CheckpointList { mount },
                RemoteOp::Rollback { name } => AgentOp::Rollback { mount, name },
                RemoteOp::Restore { name, paths } => AgentOp::Restore { mount, name, paths },
                RemoteOp::Status => AgentOp::Status,
            };
            let mut c = AdminClient::connect(&admin).await?;
            let timeout_s =
                Some(Duration::from_secs_f64(timeout.clamp(0.1, 86_400.0)).as_secs_f64());
            let r = c
                .call(AdminOp::Command {
                    server,
                    command,
                    timeout_s,
                })
                .await?;
            let failed = matches!(&r, Ok(v) if v.get("ok") != Some(&Value::Bool(true)));
            let code = print_reply(r)?;
            Ok(if failed { ExitCode::FAILURE } else { code })
        }
    }
}

/// Print the result (or the coordinator's error) as JSON on stdout.
fn print_reply(r: Result<Value, coordinator::AdminError>) -> anyhow::Result<ExitCode> {
    match r {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"ok": false, "error": e}))?
            );
            eprintln!("layerfs-coordinator: {} ({})", e.message, e.code);
            Ok(ExitCode::FAILURE)
        }
    }
}
