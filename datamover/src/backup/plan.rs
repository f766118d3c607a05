//! The plan of a backup: a full read, or an incremental built from the
//! parent point plus the source's tracked changes.
//!
//! Invariant: an incremental is planned only when the parent exists, was
//! made with the same chunking, and the tracker vouches for the changes
//! since it; otherwise the plan is a full read with the reason why.

use super::*;

/// How the reader covers the disk.
pub(super) enum Plan<'s> {
    /// Read every allocated byte.
    Full,
    /// Read what changed; take the rest from the parent point.
    Incremental {
        parent: PointId,
        /// Its manifest, read as the run goes.
        manifest: Box<PointFile>,
        tracker: &'s dyn ChangeTracker,
    },
}

/// Decide between a full and an incremental run: (plan, chunking to use,
/// why a tracked source is read in full).
pub(super) fn plan<'s>(
    session: &dyn StoreSession,
    source: &'s dyn BlockSource,
    disk: &DiskName,
    opts: &BackupOptions,
) -> Result<(Plan<'s>, ChunkingInfo, Option<String>)> {
    let tracker = match source.change_tracking() {
        _ if opts.full => return Ok((Plan::Full, opts.chunking, None)),
        Tracking::Off => return Ok((Plan::Full, opts.chunking, None)),
        Tracking::On(t) => Ok(t),
        Tracking::Unavailable(why) => Err(why),
    };
    let size = source.size();
    let why = match tracker {
        Err(why) => why,
        Ok(tracker) => match session.parent()? {
            None => format!("{disk} has no previous point to build on"),
            Some((parent, m)) => {
                let since = tracker.since_checkpoint();
                if since.is_some() && m.meta.checkpoint != since {
                    format!(
                        "the changes are tracked since checkpoint {}, but the previous point {parent} {}",
                        since.as_deref().unwrap_or_default(),
                        match &m.meta.checkpoint {
                            Some(c) => format!("started checkpoint {c}"),
                            None => "started no checkpoint (it was not taken from this VM)".into(),
                        }
                    )
                } else if m.meta.disk_size != size {
                    format!(
                        "the disk is {size} bytes but its previous point {parent} is {} bytes",
                        m.meta.disk_size
                    )
                } else if let Some(id) = session.missing_of(&m)? {
                    format!(
                        "chunk {} of the previous point {parent} is missing from the repository (run `dm verify`)",
                        id.short()
                    )
                } else {
                    let chunking = m.meta.chunking;
                    return Ok((
                        Plan::Incremental {
                            parent,
                            manifest: Box::new(m),
                            tracker,
                        },
                        chunking,
                        None,
                    ));
                }
            }
        },
    };
    if opts.full_if_needed {
        Ok((Plan::Full, opts.chunking, Some(why)))
    } else {
        Err(Error::IncrementalImpossible {
            disk: disk.clone(),
            reason: why,
        })
    }
}
