//! agent.toml: where layerd listens, where it keeps its state, which mounts
//! it serves, who gets which role, and the optional coordinator link.
//!
//! Parsing is strict (unknown keys are errors) and every error names the file
//! and the line, since a typo in a grant silently granting nothing would be
//! worse than refusing to start.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use toml::Spanned;

use crate::Role;

pub const DEFAULT_CONFIG: &str = "/etc/layerfs/agent.toml";
pub const DEFAULT_SOCKET: &str = "/run/layerd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/layerd";

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Listening socket of the local HTTP API.
    pub socket: PathBuf,
    /// Audit log (RocksDB, `state_dir/audit`) and coordinator link state.
    pub state_dir: PathBuf,
    /// How this server names itself to the coordinator (default: hostname).
    pub server_id: String,
    pub mounts: Vec<MountConfig>,
    pub grants: Vec<Grant>,
    pub coordinator: Option<CoordinatorConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MountConfig {
    /// Used in URLs (`/v1/mounts/{name}/...`) and by `layerctl -m`.
    pub name: String,
    /// The mountpoint of the union.
    pub path: PathBuf,
    /// Its layerfs control socket.
    pub socket: PathBuf,
}

/// A role for peers with one of `uids`, or in one of `gids` (primary or
/// supplementary group). A peer matching several grants gets the highest role.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub role: Role,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// host:port
    pub address: String,
    /// Shared secret presented by the agent.
    pub token_file: Option<PathBuf>,
    /// TLS trust anchor (PEM); TLS is required unless the address is loopback.
    pub ca_file: Option<PathBuf>,
    /// TLS server name (default: host part of `address`).
    pub server_name: Option<String>,
    /// Role the coordinator's commands run under (default: monitor).
    pub role: Role,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            server_id: hostname(),
            mounts: Vec::new(),
            grants: Vec::new(),
            coordinator: None,
        }
    }
}

// ---- The file as written ----------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<Spanned<PathBuf>>,
    state_dir: Option<Spanned<PathBuf>>,
    server_id: Option<Spanned<String>>,
    #[serde(default)]
    mount: Vec<RawMount>,
    #[serde(default)]
    grant: Vec<RawGrant>,
    coordinator: Option<Spanned<RawCoordinator>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    name: Option<Spanned<String>>,
    path: Spanned<PathBuf>,
    socket: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    role: Role,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    address: Spanned<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    role: Option<Role>,
}

/// "origin:LINE:COL" of a byte offset into `text`.
fn at(origin: &str, text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    format!("{origin}:{line}:{col}")
}

fn absolute(origin: &str, text: &str, what: &str, p: &Spanned<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = p.get_ref();
    if !path.is_absolute() {
        bail!(
            "{}: {what} must be an absolute path, not {:?}",
            at(origin, text, p.span().start),
            path
        );
    }
    Ok(path.clone())
}

/// Mount names appear in URL paths and on command lines: keep them plain.
fn valid_mount_name(n: &str) -> bool {
    !n.is_empty()
        && n != "_"
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':'))
        && !n.starts_with('.')
}

impl AgentConfig {
    /// Read `path`; a missing file means the defaults (no mounts, no grants).
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        match std::fs::read_to_string(path) {
            Ok(text) => AgentConfig::from_str(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentConfig::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Parse agent.toml text; `origin` (a file name) prefixes every error.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, origin: &str) -> anyhow::Result<AgentConfig> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(s) => anyhow::anyhow!("{}: {}", at(origin, text, s.start), e.message().trim()),
            None => anyhow::anyhow!("{origin}: {}", e.message().trim()),
        })?;
        let mut cfg = AgentConfig::default();
        if let Some(s) = &raw.socket {
            cfg.socket = absolute(origin, text, "socket", s)?;
        }
        if let Some(s) = &raw.state_dir {
            cfg.state_dir = absolute(origin, text, "state_dir", s)?;
        }
        if let Some(id) = &raw.server_id {
            let v = id.get_ref().trim();
            if v.is_empty() || v.len() > 253 || v.chars().any(|c| c.is_control()) {
                bail!(
                    "{}: server_id must be 1 to 253 printable characters",
                    at(origin, text, id.span().start)
                );
            }
            cfg.server_id = v.to_string();
        }
        let mut names = HashSet::new();
        for m in &raw.mount {
            let path = absolute(origin, text, "mount path", &m.path)?;
            let (name, span) = match &m.name {
                Some(n) => (n.get_ref().clone(), n.span()),
                None => (
                    path.file_name()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    m.path.span(),
                ),
            };
            if !valid_mount_name(&name) {
                bail!(
                    "{}: mount name {name:?} is not usable (letters, digits, '-', '_', '.', '@', ':'; \
                     not '_' alone; at most 64){}",
                    at(origin, text, span.start),
                    if m.name.is_none() { "; set `name = ...`" } else { "" }
                );
            }
            if !names.insert(name.clone()) {
                bail!(
                    "{}: a mount named {name:?} is already configured (names must be unique)",
                    at(origin, text, span.start)
                );
            }
            let socket = match &m.socket {
                Some(s) => absolute(origin, text, "mount socket", s)?,
                None => layerfs::control::socket_path_for(&path),
            };
            cfg.mounts.push(MountConfig { name, path, socket });
        }
        for g in raw.grant {
            cfg.grants.push(Grant {
                role: g.role,
                uids: g.uids,
                gids: g.gids,
            });
        }
        if let Some(c) = raw.coordinator {
            let span = c.span();
            let c = c.into_inner();
            let addr = c.address.get_ref().trim().to_string();
            if split_host_port(&addr).is_none() {
                bail!(
                    "{}: coordinator address {addr:?} is not host:port (IPv6: [addr]:port)",
                    at(origin, text, c.address.span().start)
                );
            }
            for (what, p) in [("token_file", &c.token_file), ("ca_file", &c.ca_file)] {
                if let Some(p) = p {
                    if !p.is_absolute() {
                        bail!(
                            "{}: coordinator {what} must be an absolute path, not {p:?}",
                            at(origin, text, span.start)
                        );
                    }
                }
            }
            cfg.coordinator = Some(CoordinatorConfig {
                address: addr,
                token_file: c.token_file,
                ca_file: c.ca_file,
                server_name: c.server_name,
                role: c.role.unwrap_or(Role::Monitor),
            });
        }
        Ok(cfg)
    }

    /// The mount called `name`; None or "_" = the only mount.
    pub fn mount(&self, name: Option<&str>) -> Result<&MountConfig, crate::AgentError> {
        match name {
            None | Some("_") => match self.mounts.as_slice() {
                [m] => Ok(m),
                [] => Err(crate::AgentError {
                    code: "not_found".into(),
                    message: "no mounts are configured ([[mount]] in agent.toml)".into(),
                    required_role: None,
                }),
                ms => Err(crate::AgentError {
                    code: "bad_request".into(),
                    message: format!(
                        "{} mounts are configured ({}): name one",
                        ms.len(),
                        ms.iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    required_role: None,
                }),
            },
            Some(n) => self
                .mounts
                .iter()
                .find(|m| m.name == n)
                .ok_or_else(|| crate::AgentError {
                    code: "not_found".into(),
                    message: format!(
                        "no mount named {n:?}; configured: {}",
                        if self.mounts.is_empty() {
                            "none".to_string()
                        } else {
                            self.mounts
                                .iter()
                                .map(|m| m.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                    required_role: None,
                }),
        }
    }
}

/// ("host", port) of "host:port" or "[v6]:port".
pub fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        let (h, p) = addr.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if host.is_empty() {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((host, port))
}

/// The kernel's hostname (no syscall wrapper needed: procfs has it).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_sample() {
        let text = r#"
socket = "/run/x.sock"
state_dir = "/var/lib/x"
server_id = "guest01"
[[mount]]
name = "root"
path = "/srv/root"
[[mount]]
path = "/srv/data"
socket = "/run/layerfs/data.sock"
[[grant]]
role = "monitor"
uids = [1001]
gids = [4]
[[grant]]
role = "manager"
gids = [27]
[coordinator]
address = "10.0.0.5:7443"
token_file = "/etc/layerfs/coordinator.token"
ca_file = "/etc/layerfs/ca.pem"
server_name = "coord.example"
role = "manager"
"#;
        let c = AgentConfig::from_str(text, "agent.toml").unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(c.server_id, "guest01");
        assert_eq!(c.mounts.len(), 2);
        assert_eq!(c.mounts[0].name, "root");
        assert_eq!(
            c.mounts[0].socket,
            PathBuf::from("/run/layerfs/srv-root.sock")
        );
        assert_eq!(c.mounts[1].name, "data");
        assert_eq!(c.mounts[1].socket, PathBuf::from("/run/layerfs/data.sock"));
        assert_eq!(c.grants[0].uids, vec![1001]);
        assert_eq!(c.grants[1].role, Role::Manager);
        let co = c.coordinator.unwrap();
        assert_eq!(co.role, Role::Manager);
        assert_eq!(co.address, "10.0.0.5:7443");
    }

    #[test]
    fn defaults_and_missing_file() {
        let c = AgentConfig::from_str("", "x").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(!c.server_id.is_empty());
        let c = AgentConfig::load(Path::new("/nonexistent/agent.toml")).unwrap();
        assert!(c.mounts.is_empty() && c.grants.is_empty() && c.coordinator.is_none());
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = AgentConfig::from_str("socket = \"/a\"\nsockett = 1\n", "/etc/a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/a.toml:2:"), "{e}");
        assert!(e.contains("sockett"), "{e}");
        let e = AgentConfig::from_str("[[grant]]\nrole = \"admin\"\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml:2:"), "{e}");
        let e = AgentConfig::from_str(
            "[[mount]]\npath = \"/srv/a\"\n[[mount]]\nname = \"a\"\npath = \"/b\"\n",
            "a.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("a.toml:4:") && e.contains("already"), "{e}");
        let e = AgentConfig::from_str("[[mount]]\npath = \"rel\"\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = AgentConfig::from_str("[coordinator]\naddress = \"nohost\"\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.toml:2:"), "{e}");
        let e = AgentConfig::from_str("[[mount]]\nname = \"a/b\"\npath = \"/x\"\n", "a.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not usable"), "{e}");
    }

    #[test]
    fn mount_selection() {
        let one = AgentConfig::from_str("[[mount]]\npath = \"/srv/root\"\n", "a").unwrap();
        assert_eq!(one.mount(None).unwrap().name, "root");
        assert_eq!(one.mount(Some("_")).unwrap().name, "root");
        assert_eq!(one.mount(Some("x")).unwrap_err().code, "not_found");
        let two = AgentConfig::from_str(
            "[[mount]]\npath = \"/srv/a\"\n[[mount]]\npath = \"/srv/b\"\n",
            "a",
        )
        .unwrap();
        assert_eq!(two.mount(Some("_")).unwrap_err().code, "bad_request");
        assert_eq!(two.mount(Some("b")).unwrap().path, PathBuf::from("/srv/b"));
        let none = AgentConfig::from_str("", "a").unwrap();
        assert_eq!(none.mount(None).unwrap_err().code, "not_found");
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a:1"), Some(("a", 1)));
        assert_eq!(split_host_port("[::1]:7443"), Some(("::1", 7443)));
        assert_eq!(split_host_port("::1:7443"), None);
        assert_eq!(split_host_port(":1"), None);
        assert_eq!(split_host_port("a:0"), None);
        assert_eq!(split_host_port("a"), None);
    }
}
