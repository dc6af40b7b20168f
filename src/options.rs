//! Mount option parsing: the `-o` syntax of kernel overlayfs and
//! fuse-overlayfs, plus the generic options mount(8) and mount.fuse pass.
//!
//! Unknown options are an error: a typo in fstab must not silently mount
//! something other than what the operator wrote.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum OptionError {
    #[error("unknown mount option '{0}' (see `layerfs --help` for the accepted options)")]
    Unknown(String),
    #[error("mount option '{0}' needs a value, as in '{0}=...'")]
    MissingValue(String),
    #[error("mount option '{name}' does not take the value '{value}' (accepted: {accepted})")]
    BadValue {
        name: String,
        value: String,
        accepted: &'static str,
    },
    #[error("missing 'lowerdir=': give at least one lower layer, as in -o lowerdir=/repo/base")]
    NoLower,
    #[error("'workdir=' is required together with 'upperdir=' (and the other way round)")]
    UpperWithoutWork,
    #[error("'{0}' is given more than once")]
    Duplicate(String),
    #[error("empty layer path in lowerdir (check for '::' or a trailing ':')")]
    EmptyLayer,
    #[error("at most {0} lower layers are supported")]
    TooManyLayers(usize),
}

/// Generic mount flags that reach the kernel mount call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flags {
    pub ro: bool,
    pub nodev: bool,
    pub nosuid: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub sync: bool,
    pub dirsync: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MountOptions {
    /// Lower layers, topmost first.
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub flags: Flags,
    pub fsname: Option<String>,
    /// Worker threads serving requests (0 = pick from the CPU count).
    pub threads: usize,
    /// Use kernel FUSE passthrough for file data when the kernel supports it.
    pub passthrough: bool,
    /// Serve requests through per-CPU io_uring queues (Linux 6.14+).
    pub uring: crate::fuse_ring::Mode,
    /// Kernel overlayfs's `volatile`: copy-ups are not synced to disk (faster;
    /// after a power loss a copied-up file may be incomplete).
    pub volatile: bool,
    /// Record changes in a journal and offer checkpoints (default on).
    pub journal: bool,
    /// Where the journal and checkpoints live (default `workdir/layerfs`).
    pub statedir: Option<PathBuf>,
    /// Control socket path (default `/run/layerfs/<escaped mountpoint>.sock`).
    pub control: Option<PathBuf>,
    /// Group whose members may use the control socket besides root.
    pub control_gid: Option<u32>,
    /// Take a checkpoint this often when something changed (None: never).
    pub checkpoint_every: Option<std::time::Duration>,
    /// Retention applied after every checkpoint (none set: keep everything).
    pub retention: crate::control::proto::Retention,
}

/// Most lower layers: inode numbers carry the layer index in their top bits.
pub const MAX_LOWERS: usize = 126;

fn on_off(name: &str, value: &str) -> Result<bool, OptionError> {
    match value {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(OptionError::BadValue {
            name: name.into(),
            value: value.into(),
            accepted: "on, off",
        }),
    }
}

/// "90s", "15m", "1h", "1d" or plain seconds; at least a minute (a
/// checkpoint every few seconds would be a mistake, not a policy).
fn parse_interval(v: &str) -> Option<std::time::Duration> {
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    (secs >= 60).then(|| std::time::Duration::from_secs(secs))
}

/// Split the lowerdir list on ':' honouring the kernel's `\:` escape.
fn split_lowers(s: &str) -> Result<Vec<PathBuf>, OptionError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ':' => {
                if cur.is_empty() {
                    return Err(OptionError::EmptyLayer);
                }
                out.push(PathBuf::from(std::mem::take(&mut cur)));
            }
            c => cur.push(c),
        }
    }
    if cur.is_empty() {
        return Err(OptionError::EmptyLayer);
    }
    out.push(PathBuf::from(cur));
    Ok(out)
}

/// Split a comma-separated option string, honouring `\,` escapes.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push('\\');
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// Unescape `\,` in a single option value (the lowerdir list keeps `\:`).
fn unescape_commas(s: &str) -> String {
    s.replace("\\,", ",")
}

impl MountOptions {
    /// Parse all `-o` strings given on the command line, in order.
    pub fn parse<S: AsRef<str>>(option_strings: &[S]) -> Result<Self, OptionError> {
        let mut lowers: Option<Vec<PathBuf>> = None;
        let mut upper = None;
        let mut work = None;
        let mut flags = Flags::default();
        let mut fsname = None;
        let mut threads = 0usize;
        let mut passthrough = true;
        let mut uring = crate::fuse_ring::Mode::Auto;
        let mut volatile = false;
        let mut statedir = None;
        let mut journal = true;
        let mut checkpoint_every = None;
        let mut control = None;
        let mut control_gid = None;
        let mut retention = crate::control::proto::Retention::default();
        let count = |name: &str, v: String| -> Result<u32, OptionError> {
            v.parse().map_err(|_| OptionError::BadValue {
                name: name.into(),
                value: v.clone(),
                accepted: "a number",
            })
        };

        for s in option_strings {
            for opt in split_opts(s.as_ref()) {
                let (name, value) = match opt.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(unescape_commas(v))),
                    None => (opt.clone(), None),
                };
                let need = |v: &Option<String>| -> Result<String, OptionError> {
                    v.clone()
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| OptionError::MissingValue(name.clone()))
                };
                match name.as_str() {
                    "lowerdir" => {
                        if lowers.is_some() {
                            return Err(OptionError::Duplicate(name));
                        }
                        let l = split_lowers(&need(&value)?)?;
                        if l.len() > MAX_LOWERS {
                            return Err(OptionError::TooManyLayers(MAX_LOWERS));
                        }
                        lowers = Some(l);
                    }
                    "upperdir" => {
                        if upper.is_some() {
                            return Err(OptionError::Duplicate(name));
                        }
                        upper = Some(PathBuf::from(need(&value)?));
                    }
                    "workdir" => {
                        if work.is_some() {
                            return Err(OptionError::Duplicate(name));
                        }
                        work = Some(PathBuf::from(need(&value)?));
                    }
                    "threads" => {
                        let v = need(&value)?;
                        threads = v.parse().map_err(|_| OptionError::BadValue {
                            name: name.clone(),
                            value: v.clone(),
                            accepted: "a number of threads, 1 to 256",
                        })?;
                        if !(1..=256).contains(&threads) {
                            return Err(OptionError::BadValue {
                                name,
                                value: v,
                                accepted: "a number of threads, 1 to 256",
                            });
                        }
                    }
                    "passthrough" => passthrough = on_off(&name, &need(&value)?)?,
                    "uring" => {
                        use crate::fuse_ring::Mode;
                        let v = need(&value)?;
                        uring = match v.as_str() {
                            "auto" => Mode::Auto,
                            "on" => Mode::On,
                            "off" => Mode::Off,
                            _ => {
                                return Err(OptionError::BadValue {
                                    name,
                                    value: v,
                                    accepted: "auto, on, off",
                                })
                            }
                        };
                    }
                    "volatile" => volatile = true,
                    "checkpoint_every" => {
                        let v = need(&value)?;
                        checkpoint_every =
                            Some(parse_interval(&v).ok_or(OptionError::BadValue {
                                name: name.clone(),
                                value: v.clone(),
                                accepted: "an interval of at least 60 seconds: 90s, 15m, 1h, 1d",
                            })?);
                    }
                    "journal" => journal = on_off(&name, &need(&value)?)?,
                    "statedir" => statedir = Some(PathBuf::from(need(&value)?)),
                    "control" => control = Some(PathBuf::from(need(&value)?)),
                    "control_gid" => control_gid = Some(count(&name, need(&value)?)?),
                    "keep_last" => retention.keep_last = Some(count(&name, need(&value)?)?),
                    "keep_hourly" => retention.keep_hourly = Some(count(&name, need(&value)?)?),
                    "keep_daily" => retention.keep_daily = Some(count(&name, need(&value)?)?),
                    "keep_weekly" => retention.keep_weekly = Some(count(&name, need(&value)?)?),
                    "fsname" => fsname = Some(need(&value)?),
                    // Generic flags (mount(8), mount.fuse); honoured.
                    "ro" => flags.ro = true,
                    "rw" => flags.ro = false,
                    "nodev" => flags.nodev = true,
                    "dev" => flags.nodev = false,
                    "nosuid" => flags.nosuid = true,
                    "suid" => flags.nosuid = false,
                    "noexec" => flags.noexec = true,
                    "exec" => flags.noexec = false,
                    "noatime" => flags.noatime = true,
                    "atime" => flags.noatime = false,
                    "sync" => flags.sync = true,
                    "async" => flags.sync = false,
                    "dirsync" => flags.dirsync = true,
                    // Accepted and meaningless for a FUSE mount, or always on here.
                    "relatime"
                    | "norelatime"
                    | "strictatime"
                    | "nostrictatime"
                    | "diratime"
                    | "nodiratime"
                    | "lazytime"
                    | "nolazytime"
                    | "defaults"
                    | "auto"
                    | "noauto"
                    | "user"
                    | "nouser"
                    | "users"
                    | "owner"
                    | "group"
                    | "_netdev"
                    | "nofail"
                    | "allow_other"
                    | "default_permissions"
                    | "auto_unmount"
                    | "silent"
                    | "loud"
                    | "iversion"
                    | "noiversion" => {}
                    n if n.starts_with("x-") || n == "comment" || n == "subtype" => {}
                    // Kernel overlayfs options, so an fstab line for overlay works unchanged.
                    // layerfs always behaves as redirect_dir=on and keeps inode numbers stable.
                    "redirect_dir" => match need(&value)?.as_str() {
                        "on" | "follow" | "off" | "nofollow" => {}
                        v => {
                            return Err(OptionError::BadValue {
                                name,
                                value: v.into(),
                                accepted: "on, follow, off, nofollow",
                            })
                        }
                    },
                    "index" | "nfs_export" => {
                        on_off(&name, &need(&value)?)?;
                    }
                    "xino" => match need(&value)?.as_str() {
                        "on" | "off" | "auto" => {}
                        v => {
                            return Err(OptionError::BadValue {
                                name,
                                value: v.into(),
                                accepted: "on, off, auto",
                            })
                        }
                    },
                    "metacopy" => {
                        if on_off(&name, &need(&value)?)? {
                            return Err(OptionError::BadValue {
                                name,
                                value: "on".into(),
                                accepted: "off (layerfs copies data up whole)",
                            });
                        }
                    }
                    _ => return Err(OptionError::Unknown(opt)),
                }
            }
        }
        let lowers = lowers.ok_or(OptionError::NoLower)?;
        if upper.is_some() != work.is_some() {
            return Err(OptionError::UpperWithoutWork);
        }
        Ok(MountOptions {
            lowers,
            upper,
            work,
            flags,
            fsname,
            threads,
            passthrough,
            uring,
            volatile,
            journal,
            checkpoint_every,
            statedir,
            control,
            control_gid,
            retention,
        })
    }

    /// Read-only when asked for, or when there is no upper layer to write to.
    pub fn read_only(&self) -> bool {
        self.flags.ro || self.upper.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_options() {
        let o = MountOptions::parse(&[
            "lowerdir=/a,upperdir=/u,workdir=/w,statedir=/s,checkpoint_every=1h,keep_last=5,keep_daily=7,journal=on",
        ])
        .unwrap();
        assert_eq!(o.statedir.as_deref(), Some(std::path::Path::new("/s")));
        assert_eq!(
            o.checkpoint_every,
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(o.retention.keep_last, Some(5));
        assert_eq!(o.retention.keep_daily, Some(7));
        assert!(o.journal);
        for bad in [
            "checkpoint_every=5s",
            "checkpoint_every=1y",
            "keep_last=x",
            "journal=maybe",
        ] {
            let r = MountOptions::parse(&[format!("lowerdir=/a,{bad}")]);
            assert!(
                matches!(r, Err(OptionError::BadValue { .. })),
                "{bad}: {r:?}"
            );
        }
    }

    #[test]
    fn overlay_syntax() {
        let o = MountOptions::parse(&["lowerdir=/a:/b,upperdir=/u,workdir=/w"]).unwrap();
        assert_eq!(o.lowers, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(o.upper, Some(PathBuf::from("/u")));
        assert!(!o.read_only());
    }

    #[test]
    fn escaped_colon_and_comma() {
        let o = MountOptions::parse(&["lowerdir=/a\\:x:/b\\,c"]).unwrap();
        assert_eq!(o.lowers, vec![PathBuf::from("/a:x"), PathBuf::from("/b,c")]);
        assert!(o.read_only());
    }

    #[test]
    fn generic_flags_honoured() {
        let o = MountOptions::parse(&["lowerdir=/a,nodev,nosuid,noexec,ro", "rw"]).unwrap();
        assert!(o.flags.nodev && o.flags.nosuid && o.flags.noexec && !o.flags.ro);
        assert!(!o.volatile);
        assert!(
            MountOptions::parse(&["lowerdir=/a,volatile"])
                .unwrap()
                .volatile
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            MountOptions::parse(&["lowerdir=/a,bogus"]),
            Err(OptionError::Unknown("bogus".into()))
        );
        assert_eq!(
            MountOptions::parse(&["upperdir=/u"]),
            Err(OptionError::NoLower)
        );
        assert_eq!(
            MountOptions::parse(&["lowerdir=/a,upperdir=/u"]),
            Err(OptionError::UpperWithoutWork)
        );
        assert_eq!(
            MountOptions::parse(&["lowerdir=/a::/b"]),
            Err(OptionError::EmptyLayer)
        );
        assert_eq!(
            MountOptions::parse(&["lowerdir="]),
            Err(OptionError::MissingValue("lowerdir".into()))
        );
        assert!(MountOptions::parse(&["lowerdir=/a,threads=0"]).is_err());
        assert!(matches!(
            MountOptions::parse(&["lowerdir=/a,uring=fast"]),
            Err(OptionError::BadValue { .. })
        ));
        let o = MountOptions::parse(&["lowerdir=/a,uring=on"]).unwrap();
        assert_eq!(o.uring, crate::fuse_ring::Mode::On);
        assert!(MountOptions::parse(&["lowerdir=/a,metacopy=on"]).is_err());
        assert!(MountOptions::parse(&["lowerdir=/a,lowerdir=/b"]).is_err());
    }
}
