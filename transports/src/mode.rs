//! Transport modes and the one rule of which modes can read a disk from
//! a proxy: the scheduler places tasks with it and the proxy reports
//! what it sees with it, so placement and execution never disagree.
//!
//! Invariant: [`Mode::ALL`] and every list [`modes_for`] returns are in
//! efficiency order (direct storage access > virtual appliance > storage
//! snapshot > network), and a mode's name is the same everywhere (CLI,
//! JSON, REST, points).

use datamover::{Error, Result};

/// A transport mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Direct storage access: read the raw image or LUN.
    San,
    /// Virtual appliance: attach the frozen disk locally.
    HotAdd,
    /// Read a storage snapshot (only when pinned: it needs a provider).
    StorageSnapshot,
    /// Network: NBD from the VM.
    Nbd,
}

impl Mode {
    /// Every mode, most efficient first.
    pub const ALL: [Mode; 4] = [Mode::San, Mode::HotAdd, Mode::StorageSnapshot, Mode::Nbd];

    /// The mode's name as the CLI, JSON, the REST API and points show it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::San => "san",
            Mode::HotAdd => "hotadd",
            Mode::Nbd => "nbd",
            Mode::StorageSnapshot => "storage-snapshot",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    /// A mode's name (`san`, `hotadd`, `storage-snapshot`, `nbd`) or an
    /// alias (`direct`, `network`).
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "san" | "direct" => Mode::San,
            "hotadd" => Mode::HotAdd,
            "nbd" | "network" => Mode::Nbd,
            "storage-snapshot" => Mode::StorageSnapshot,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown transport mode {other:?}: use san, hotadd, storage-snapshot or nbd"
                )));
            }
        })
    }
}

/// A set of modes (a proxy's allowed modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSet(u8);

impl ModeSet {
    /// Every mode.
    pub const ALL: ModeSet = ModeSet(0b1111);

    /// The modes named; none named: every mode. An unknown name is an
    /// error.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<ModeSet> {
        if names.is_empty() {
            return Ok(ModeSet::ALL);
        }
        names.iter().try_fold(ModeSet(0), |acc, n| {
            Ok(ModeSet(acc.0 | n.as_ref().parse::<Mode>()?.bit()))
        })
    }

    /// Whether `m` is in the set.
    pub fn contains(self, m: Mode) -> bool {
        self.0 & m.bit() != 0
    }
}

/// Where a disk lives, as far as choosing a mode cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An image file or device, read directly.
    Path(String),
    /// An NBD export.
    Network,
    /// A VM's disk, on this host when known.
    Vm {
        /// The VM host's name.
        host: Option<String>,
    },
    /// A VM that only a proxy on this host reaches (a libvirt domain of the
    /// host's own libvirtd), read over NBD.
    OnHost(String),
}

/// Whether a proxy with `datastores` sees `path`: the path is absolute,
/// has no `..`, and lies under one of them (by whole components).
pub fn sees(datastores: &[String], path: &str) -> bool {
    let p = std::path::Path::new(path);
    p.is_absolute()
        && !p
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && datastores.iter().any(|d| p.starts_with(d))
}

/// Why a path was refused by [`resolve_within`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    /// Not an absolute path.
    #[error("{0}: a task's path must be absolute")]
    Relative(String),
    /// It (or its directory) cannot be resolved.
    #[error("{path}: cannot be resolved: {why}")]
    Unresolvable {
        /// The path as given.
        path: String,
        /// Why.
        why: String,
    },
    /// Resolved (`..` and symlinks followed), it lies outside every
    /// datastore.
    #[error(
        "{path} resolves to {resolved}, which is not under a datastore of this proxy ({datastores}); the administrator gives datastores with dm-proxy run --datastore DIR"
    )]
    Outside {
        /// The path as given.
        path: String,
        /// Where it really is.
        resolved: String,
        /// The datastores, resolved.
        datastores: String,
    },
}

/// Resolve `path` (every `..` and symlink, the way the kernel will open
/// it) and check that the result lies under one of `datastores` (resolved
/// the same way; those that do not exist are skipped). A path that does
/// not exist yet (a restore target) is resolved through its directory.
/// Returns the resolved path, which is what the caller should open.
pub fn resolve_within(
    datastores: &[std::path::PathBuf],
    path: &std::path::Path,
) -> Result<std::path::PathBuf, PathRefused> {
    let shown = path.display().to_string();
    if !path.is_absolute() {
        return Err(PathRefused::Relative(shown));
    }
    let unresolvable = |e: std::io::Error| PathRefused::Unresolvable {
        path: shown.clone(),
        why: e.to_string(),
    };
    let resolved = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Err(unresolvable(e));
            };
            // A dangling symlink is not a new file: refuse it rather
            // than let the open follow it somewhere else.
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(PathRefused::Unresolvable {
                    path: shown,
                    why: "a symlink to nothing".into(),
                });
            }
            std::fs::canonicalize(dir).map_err(unresolvable)?.join(name)
        }
        Err(e) => return Err(unresolvable(e)),
    };
    let roots: Vec<std::path::PathBuf> = datastores
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    if roots.iter().any(|r| resolved.starts_with(r)) {
        Ok(resolved)
    } else {
        Err(PathRefused::Outside {
            path: shown,
            resolved: resolved.display().to_string(),
            datastores: if roots.is_empty() {
                "it has none".into()
            } else {
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }
}

/// The modes a proxy on `host` seeing `datastores` could read a disk at
/// `location` in, most efficient first (allowed modes and pinning
/// aside): a path under a datastore in SAN mode; a VM's disk on the
/// proxy's own host in HotAdd, storage snapshot or NBD mode, elsewhere in
/// NBD mode; an NBD export in NBD mode.
pub fn modes_for(location: &Location, host: &str, datastores: &[String]) -> &'static [Mode] {
    match location {
        Location::Path(path) if sees(datastores, path) => &[Mode::San],
        Location::Path(_) => &[],
        Location::Network => &[Mode::Nbd],
        Location::Vm { host: Some(h) } if h == host => {
            &[Mode::HotAdd, Mode::StorageSnapshot, Mode::Nbd]
        }
        Location::Vm { .. } => &[Mode::Nbd],
        Location::OnHost(h) if h == host => &[Mode::Nbd],
        Location::OnHost(_) => &[],
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_aliases_and_sets() {
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>().unwrap(), m);
        }
        assert_eq!("direct".parse::<Mode>().unwrap(), Mode::San);
        assert_eq!("network".parse::<Mode>().unwrap(), Mode::Nbd);
        assert!("fast".parse::<Mode>().is_err());
        let s = ModeSet::from_names(&["nbd", "hotadd"]).unwrap();
        assert!(s.contains(Mode::Nbd) && s.contains(Mode::HotAdd) && !s.contains(Mode::San));
        assert_eq!(ModeSet::from_names::<&str>(&[]).unwrap(), ModeSet::ALL);
        assert!(ModeSet::from_names(&["nbd", "x"]).is_err());
    }

    #[test]
    fn visibility_is_by_whole_components_and_refuses_dot_dot() {
        let ds = vec!["/srv/images".to_string()];
        assert!(sees(&ds, "/srv/images/a.raw"));
        assert!(!sees(&ds, "/srv/images2/a.raw"));
        assert!(!sees(&ds, "/srv/images/../secret/a.raw"));
        assert!(!sees(&ds, "images/a.raw"));
        assert_eq!(
            modes_for(&Location::Path("/srv/images/a".into()), "h", &ds),
            &[Mode::San]
        );
        let vm = Location::Vm {
            host: Some("h".into()),
        };
        assert_eq!(modes_for(&vm, "h", &ds)[0], Mode::HotAdd);
        assert_eq!(modes_for(&vm, "other", &ds), &[Mode::Nbd]);
    }
}
