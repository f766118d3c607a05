//! `datamover._datamover`: the Python face of the `datamover` crate. Glue
//! only: argument conversion, GIL handling, progress/cancel plumbing and
//! error mapping. Every capability lives in the core library.
//!
//! Long calls run on a worker thread while the calling thread waits with the
//! GIL released, waking every 50 ms to run Python's signal handlers: Ctrl-C
//! (KeyboardInterrupt) cancels the run through the same path as a progress
//! callback that raises, and the core then leaves no partial point.
//!
//! Modules mirror the core: [`errors`] (exception mapping), [`cancel`]
//! (calls off the GIL), [`repository`], [`stats`], [`vm`], [`server`].

mod cancel;

/// A report as Python values: the keys of the CLI's `--json`.
fn as_py<'py, T: serde::Serialize>(py: Python<'py>, v: &T) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(v).map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.import("json")?.getattr("loads")?.call1((text,))
}

mod errors;
mod export;
mod repository;
mod server;
mod stats;
mod vm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datamover::{
    BackupOptions, ChunkingInfo, ChunkingKind, Compression, DiskName, KeepPolicy, PointRef,
    PruneOptions, RestoreOptions, RunStats,
};
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use cancel::{run_cancellable, secs};
use errors::{client_err, to_py};
use repository::{Point, PruneReport, Repository, VerifyReport};
use server::Server;
use stats::Stats;
use vm::{vm_disks, vms};

#[pymodule]
fn _datamover(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Repository>()?;
    m.add_class::<Stats>()?;
    m.add_class::<Point>()?;
    m.add_class::<VerifyReport>()?;
    m.add_class::<PruneReport>()?;
    m.add_class::<Server>()?;
    m.add_class::<export::Export>()?;
    m.add_class::<export::InstantRecovery>()?;
    m.add_class::<export::Files>()?;
    m.add_function(wrap_pyfunction!(export::instant_migrate, m)?)?;
    m.add_function(wrap_pyfunction!(export::instant_discard, m)?)?;
    m.add_function(wrap_pyfunction!(export::instant_sessions, m)?)?;
    m.add_function(wrap_pyfunction!(vm_disks, m)?)?;
    m.add_function(wrap_pyfunction!(vms, m)?)?;
    Ok(())
}
