//! Progress reporting and cancellation, shared by backup and restore.

use std::sync::Arc;

/// Called with (bytes done, bytes total) from a worker thread; returning
/// `false` cancels the run cleanly (no partial point is left visible).
pub type ProgressFn = Arc<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// Call the callback, if any; true means go on.
pub(crate) fn report(p: &Option<ProgressFn>, done: u64, total: u64) -> bool {
    p.as_ref().is_none_or(|f| f(done, total))
}
