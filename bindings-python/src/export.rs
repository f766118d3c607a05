//! `Repository.export` and `Repository.instant_recover`: servers run on a
//! background thread, stopped by `stop()` or by leaving the `with` block;
//! the instant recovery session calls (migrate, discard, list).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::*;

/// A running export (`Repository.export`): `uri` is where NBD clients
/// connect; `stop()` ends it and returns what it read.
#[pyclass(module = "datamover")]
pub(crate) struct Export {
    /// The NBD URI to connect to.
    #[pyo3(get)]
    uri: String,
    bg: Background<datamover::reader::ReaderStats>,
}

/// A server run on a background thread of its own: `run` gets the
/// repository at `root`, a stop flag, and a sender for the first thing
/// it says (what it serves) once it serves.
pub(crate) struct Background<R> {
    pub(crate) said: String,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: Mutex<Option<std::thread::JoinHandle<datamover::Result<R>>>>,
}

/// Start `run` as a [`Background`] named `what`; returns once it says
/// it serves, or with its error.
pub(crate) fn background<R: Send + 'static>(
    what: &str,
    root: std::path::PathBuf,
    run: impl FnOnce(
        &datamover::Repository,
        &AtomicBool,
        Box<dyn FnOnce(String) + Send>,
    ) -> datamover::Result<R>
    + Send
    + 'static,
) -> PyResult<Background<R>> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    let s = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("dm-{what}"))
        .spawn(move || {
            let started = tx.clone();
            let r = datamover::Repository::open(&root).and_then(|repo| {
                run(
                    &repo,
                    &s,
                    Box::new(move |said| {
                        let _ = started.send(Some(said));
                    }),
                )
            });
            if r.is_err() {
                let _ = tx.send(None);
            }
            r
        })
        .map_err(|e| PyValueError::new_err(format!("cannot start the {what}: {e}")))?;
    match rx.recv() {
        Ok(Some(said)) => Ok(Background {
            said,
            stop,
            thread: Mutex::new(Some(thread)),
        }),
        Ok(None) | Err(_) => {
            let r = thread
                .join()
                .map_err(|_| PyValueError::new_err(format!("the {what} thread panicked")))?;
            Err(to_py(r.err().unwrap_or_else(|| {
                datamover::Error::Internal(format!("the {what} ended before it served"))
            })))
        }
    }
}

impl<R> Background<R> {
    /// Stop it and wait (GIL released): its result, or None when it was
    /// stopped already.
    pub(crate) fn end(&self, py: Python<'_>) -> PyResult<Option<R>>
    where
        R: Send,
    {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(t) = t else {
            return Ok(None);
        };
        py.detach(move || t.join())
            .map_err(|_| PyValueError::new_err("the server thread panicked"))?
            .map(Some)
            .map_err(to_py)
    }
}

impl<R> Drop for Background<R> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Export {
    /// Start exporting `point` of the repository at `root`.
    pub(crate) fn start(
        root: std::path::PathBuf,
        point: datamover::PointRef,
        how: transports::export::Export,
    ) -> PyResult<Export> {
        let bg = background("export", root, move |repo, stop, ready| {
            transports::export::export(repo, &point, &how, stop, |uri| ready(uri.to_string()))
        })?;
        Ok(Export {
            uri: bg.said.clone(),
            bg,
        })
    }
}

#[pymethods]
impl Export {
    /// Stop serving (open connections are closed); a dict of what the
    /// export read: chunks_loaded, bytes_loaded, hits.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let Some(r) = self.bg.end(py)? else {
            return crate::as_py(py, &serde_json::json!(null));
        };
        crate::as_py(
            py,
            &serde_json::json!({
                "chunks_loaded": r.chunks_loaded,
                "bytes_loaded": r.bytes_loaded,
                "hits": r.hits,
            }),
        )
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("Export({})", self.uri)
    }
}

/// An instant recovery (`Repository.instant_recover`): the VM runs from
/// the repository while this serves it; `session` is its session as it
/// started; `stop()` powers the VM off (its writes kept) unless it was
/// migrated or discarded meanwhile, and returns the session as it ended.
#[pyclass(module = "datamover")]
pub(crate) struct InstantRecovery {
    /// The session's (and domain's) name.
    #[pyo3(get)]
    name: String,
    bg: Background<transports::instant::Session>,
}

impl InstantRecovery {
    pub(crate) fn start(
        root: std::path::PathBuf,
        points: Vec<String>,
        how: transports::instant::Recover,
    ) -> PyResult<InstantRecovery> {
        let bg = background("instant-recovery", root, move |repo, stop, ready| {
            let points = transports::instant::points_named(repo, &points)?;
            transports::instant::recover(repo, &points, &how, stop, |s| {
                ready(serde_json::to_string(s).unwrap_or_default())
            })
        })?;
        let name = serde_json::from_str::<transports::instant::Session>(&bg.said)
            .map(|s| s.name)
            .unwrap_or_default();
        Ok(InstantRecovery { name, bg })
    }
}

#[pymethods]
impl InstantRecovery {
    /// The session as it started (the keys of `dm instant-recover --json`).
    #[getter]
    fn session<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?
            .getattr("loads")?
            .call1((self.bg.said.as_str(),))
    }

    /// Stop serving (the VM is powered off unless migrated or discarded);
    /// the session as it ended, or None when stopped already.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let r = self.bg.end(py)?;
        crate::as_py(py, &r)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("InstantRecovery({})", self.name)
    }
}

/// Copy instant recovery session `name`'s disks to images in `to` while
/// its VM runs, switch the VM to them and define it there; the session
/// as it ended (state "migrated", downtime_ms).
#[pyfunction]
#[pyo3(signature = (name, to, *, dir=None, format="raw"))]
pub(crate) fn instant_migrate<'py>(
    py: Python<'py>,
    name: &str,
    to: PathBuf,
    dir: Option<PathBuf>,
    format: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(transports::instant::DEFAULT_DIR));
    let how = transports::instant::Migrate {
        to,
        format: format.to_string(),
    };
    let name = name.to_string();
    let s = run_cancellable(py, None, move |_| {
        transports::instant::migrate(&dir, &name, &how, |_| {})
    })?;
    crate::as_py(py, &s)
}

/// Power off instant recovery session `name`'s VM and drop its writes.
#[pyfunction]
#[pyo3(signature = (name, *, dir=None))]
pub(crate) fn instant_discard<'py>(
    py: Python<'py>,
    name: &str,
    dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(transports::instant::DEFAULT_DIR));
    let name = name.to_string();
    let s = run_cancellable(py, None, move |_| transports::instant::discard(&dir, &name))?;
    crate::as_py(py, &s)
}

/// The instant recovery sessions under `dir`.
#[pyfunction]
#[pyo3(signature = (*, dir=None))]
pub(crate) fn instant_sessions<'py>(
    py: Python<'py>,
    dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(transports::instant::DEFAULT_DIR));
    let s = transports::instant::sessions(&dir).map_err(to_py)?;
    crate::as_py(py, &s)
}

/// A point's files (`Repository.files`): one libguestfs appliance serves
/// every call until `close()` (or the end of a `with` block).
#[pyclass(module = "datamover")]
pub(crate) struct Files {
    session: Mutex<Option<transports::files::Session>>,
}

impl Files {
    pub(crate) fn open(
        py: Python<'_>,
        root: std::path::PathBuf,
        point: datamover::PointRef,
        opts: transports::files::FilesOptions,
    ) -> PyResult<Files> {
        let s = py
            .detach(move || transports::files::Session::open(root, point, opts))
            .map_err(to_py)?;
        Ok(Files {
            session: Mutex::new(Some(s)),
        })
    }

    fn with<'py, T: serde::Serialize + Send>(
        &self,
        py: Python<'py>,
        f: impl FnOnce(&transports::files::Session) -> datamover::Result<T> + Send,
    ) -> PyResult<Bound<'py, PyAny>> {
        let g = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let s = g
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("the Files object is closed"))?;
        let v = py.detach(|| f(s)).map_err(to_py)?;
        crate::as_py(py, &v)
    }
}

#[pymethods]
impl Files {
    /// The point's filesystems: name, device, fstype, size, error.
    fn filesystems<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.with(py, |s| s.filesystems())
    }

    /// List "/" (the filesystems), a directory or a file
    /// ("/FILESYSTEM/PATH"): dicts with name, path, kind, size, mode,
    /// uid, gid, mtime, mtime_nsec, target.
    #[pyo3(signature = (path="/"))]
    fn ls<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyAny>> {
        self.with(py, |s| s.list(path))
    }

    /// Copy `paths` into directory `to` with their metadata; what was
    /// extracted (files, dirs, symlinks, bytes, bytes_loaded, ...).
    fn get<'py>(
        &self,
        py: Python<'py>,
        paths: Vec<String>,
        to: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.with(py, |s| s.get(&paths, &to))
    }

    /// Write `paths` as a tar archive to the new file `file`.
    fn tar<'py>(
        &self,
        py: Python<'py>,
        paths: Vec<String>,
        file: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.with(py, |s| s.tar_to(&paths, &file))
    }

    /// Stop the appliance.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let s = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match s {
            Some(s) => py.detach(move || s.close()).map_err(to_py),
            None => Ok(()),
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }
}
