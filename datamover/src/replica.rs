//! Replica disks: a restore point kept as a ready-to-run disk image on the
//! target's storage (replication, quick migration), brought up to date by
//! writing only the extents that differ from the point it holds.
//!
//! Next to each replica `<name>.img` a state file `<name>.img.dm-replica`
//! (JSON, written atomically) records the point the image holds and
//! whether an update was under way. An update that was interrupted leaves
//! `"state": "applying"`; the next one then rewrites every extent instead
//! of trusting the image, so a replica never silently mixes two points.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::ids::{DiskName, PointId};
use crate::repo::Repository;
use crate::restore::{RestoreOptions, restore};
use crate::target::FileTarget;

/// Suffix of a replica's state file.
pub const STATE_SUFFIX: &str = ".dm-replica";

/// A replica's state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The point the image holds (`applied`) or is being brought to.
    pub point: String,
    /// `applied` or `applying`.
    pub state: String,
}

/// What an update did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The replica image.
    pub path: String,
    /// The point it holds now.
    pub point: String,
    /// The point it held before (`None`: written whole).
    pub base: Option<String>,
    /// Bytes written or zeroed (the rest was already right).
    pub bytes_written: u64,
    /// Disk size.
    pub disk_size: u64,
    /// Seconds taken.
    pub seconds: f64,
}

/// Where the replica of `disk` lives under `root`: `root/<vm>/<disk>.img`.
pub fn replica_path(root: &Path, disk: &DiskName) -> PathBuf {
    root.join(disk.vm()).join(format!("{}.img", disk.disk()))
}

fn state_path(img: &Path) -> PathBuf {
    let mut s = img.as_os_str().to_owned();
    s.push(STATE_SUFFIX);
    PathBuf::from(s)
}

/// Read a replica's state, `None` when it has none (or an unreadable one:
/// the image is then rewritten whole).
pub fn read_state(img: &Path) -> Option<ReplicaState> {
    let b = std::fs::read(state_path(img)).ok()?;
    if b.len() > 4096 {
        return None;
    }
    serde_json::from_slice(&b).ok()
}

fn write_state(img: &Path, st: &ReplicaState) -> Result<()> {
    let p = state_path(img);
    let tmp = p.with_extension("dm-replica.tmp");
    let b = serde_json::to_vec_pretty(st).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&tmp, b).ctx("write", &tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .ctx("sync", &tmp)?;
    std::fs::rename(&tmp, &p).ctx("rename into place", &p)?;
    if let Some(d) = p.parent() {
        crate::repo::sync_dir(d)?;
    }
    Ok(())
}

/// Bring the replica image `img` to `point` of `disk`: only what differs
/// from the point it holds is written; a new or untrusted image is
/// written whole. The image is fsynced before the state says `applied`.
pub fn apply(
    repo: &Repository,
    disk: &DiskName,
    point: &PointId,
    img: &Path,
) -> Result<ReplicaReport> {
    let t0 = Instant::now();
    if let Some(d) = img.parent() {
        std::fs::create_dir_all(d).ctx("create", d)?;
    }
    let size = repo.point_meta(disk, point)?.meta.disk_size;
    let known: Vec<PointId> = repo.point_ids(disk)?;
    let base = match read_state(img) {
        Some(s) if s.state == "applied" && img.is_file() => {
            known.into_iter().find(|p| p.as_str() == s.point)
        }
        _ => None,
    };
    write_state(
        img,
        &ReplicaState {
            point: point.to_string(),
            state: "applying".into(),
        },
    )?;
    let target = match &base {
        Some(_) => FileTarget::update(img, size)?,
        None => FileTarget::create(img, size, true)?,
    };
    let opts = RestoreOptions {
        base: base.clone(),
        ..RestoreOptions::default()
    };
    let r = restore(repo, disk, point, &target, &opts)?;
    write_state(
        img,
        &ReplicaState {
            point: point.to_string(),
            state: "applied".into(),
        },
    )?;
    Ok(ReplicaReport {
        path: img.display().to_string(),
        point: point.to_string(),
        base: base.map(|b| b.to_string()),
        bytes_written: r.stats.bytes_new,
        disk_size: size,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
