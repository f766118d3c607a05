//! Replica disks: a restore point kept as a ready-to-run disk image on the
//! target's storage (replication, quick migration), brought up to date by
//! writing only the extents that differ from the point it holds.
//!
//! Next to each replica `<name>.img` a state file `<name>.img.dm-replica`
//! (JSON, written atomically) records the point the image holds and
//! whether an update was under way. An update that was interrupted leaves
//! `"state": "applying"`; the next one then rewrites every extent instead
//! of trusting the image, so a replica never silently mixes two points.
//! (Untrusted images that exist are compared extent by extent and only
//! what differs is written.)
//!
//! `"state": "failover"` marks a replica a VM runs on (a failover, or
//! the end of a quick migration): an update would write under a running
//! guest, so it is refused until the failover is undone (the guest's
//! writes make the image untrusted: `applying`) or failed back.

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
    /// `applied`, `applying` or `failover`.
    pub state: String,
}

/// The replica state of an image a VM runs on.
pub const FAILOVER: &str = "failover";

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

/// Record that `img` holds `point` (`applied`), or is being changed
/// (`applying`, untrusted), or runs a VM ([`FAILOVER`]).
pub fn set_state(img: &Path, point: &str, state: &str) -> Result<()> {
    write_state(
        img,
        &ReplicaState {
            point: point.to_string(),
            state: state.to_string(),
        },
    )
}

/// The replica images of `vm` under `root` (`root/VM/DISK.img`) whose
/// disk `VM/DISK` the repository knows, in disk order, with their state.
pub fn replicas_of(
    repo: &Repository,
    root: &Path,
    vm: &str,
) -> Result<Vec<(DiskName, PathBuf, Option<ReplicaState>)>> {
    let mut out = Vec::new();
    for d in repo.disks()? {
        if d.vm() != vm {
            continue;
        }
        let img = replica_path(root, &d);
        if img.is_file() {
            let st = read_state(&img);
            out.push((d, img, st));
        }
    }
    Ok(out)
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
    let held = read_state(img);
    if let Some(s) = held.as_ref().filter(|s| s.state == FAILOVER) {
        return Err(Error::InvalidArgument(format!(
            "replica {} is failed over (a VM runs on it, from point {}): fail back, or undo the failover, before it is updated again",
            img.display(),
            s.point
        )));
    }
    let base = match held {
        Some(s) if s.state == "applied" && img.is_file() => {
            known.into_iter().find(|p| p.as_str() == s.point)
        }
        _ => None,
    };
    // An image that exists but cannot be trusted is compared, not
    // rewritten: a failover undone changed a few blocks, not the disk.
    let compare = base.is_none() && std::fs::metadata(img).is_ok_and(|m| m.is_file());
    write_state(
        img,
        &ReplicaState {
            point: point.to_string(),
            state: "applying".into(),
        },
    )?;
    let target = match (&base, compare) {
        (None, false) => FileTarget::create(img, size, true)?,
        _ => FileTarget::update(img, size)?,
    };
    let opts = RestoreOptions {
        base: base.clone(),
        compare,
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
