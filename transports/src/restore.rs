//! Restore by address: the counterpart of [`crate::backup`], the one
//! place the CLI, Python and the proxy agent restore a point to a path,
//! a device or an NBD export.
//!
//! Invariant: the target is opened only after the point is resolved and
//! its size known, so a wrong point reference never touches the target.

use datamover::{PointRef, Repository, RestoreOptions, RestoreReport, Result};

use crate::SourceOptions;

/// Restore the point `point` names (`disk` = newest, `disk@id` = by id
/// or unique prefix) to `target`: a path, a block device or an NBD
/// export (`nbd://…`, `nbd+unix://…`). An existing file is replaced only
/// with `overwrite`; `opts` carries the NBD timeout and TLS settings.
pub fn restore(
    repo: &Repository,
    point: &PointRef,
    target: &str,
    overwrite: bool,
    opts: &SourceOptions,
    restore: &RestoreOptions,
) -> Result<RestoreReport> {
    let id = repo.resolve_point(&point.disk, point.at.as_deref())?;
    let size = repo.point_meta(&point.disk, &id)?.meta.disk_size;
    let t = crate::open_target(target, size, overwrite, opts)?;
    datamover::restore(repo, &point.disk, &id, t.as_ref(), restore)
}
