//! The local control socket of a mounted layerfs: protocol, server, client,
//! and the service that answers requests from the union's state.

pub mod cli;
pub mod client;
pub mod proto;
pub mod render;
pub mod server;
pub mod service;

use std::path::{Path, PathBuf};

/// Where the control socket of the mount at `mountpoint` lives by default:
/// `/run/layerfs/<escaped absolute mountpoint>.sock`, escaped as systemd does
/// (`/srv/root` -> `srv-root`), so the CLI finds it from the mountpoint alone.
pub fn socket_path_for(mountpoint: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let mut name = String::new();
    let s = abs.to_string_lossy();
    let trimmed = s.trim_matches('/');
    if trimmed.is_empty() {
        name.push('-');
    }
    for (i, b) in trimmed.bytes().enumerate() {
        match b {
            b'/' => name.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b':' => name.push(b as char),
            b'.' if i > 0 => name.push('.'),
            _ => name.push_str(&format!("\\x{b:02x}")),
        }
    }
    PathBuf::from("/run/layerfs").join(format!("{name}.sock"))
}
