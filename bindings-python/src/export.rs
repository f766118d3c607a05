//! `Repository.export`: a point served over NBD from a background thread,
//! stopped by `stop()` or by leaving the `with` block.

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
    stop: Arc<AtomicBool>,
    thread:
        Mutex<Option<std::thread::JoinHandle<datamover::Result<datamover::reader::ReaderStats>>>>,
}

impl Export {
    /// Start exporting `point` of the repository at `root`.
    pub(crate) fn start(
        root: std::path::PathBuf,
        point: datamover::PointRef,
        how: transports::export::Export,
    ) -> PyResult<Export> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<datamover::Result<String>>();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dm-export".into())
            .spawn(move || {
                let started = tx.clone();
                let r = datamover::Repository::open(&root).and_then(|repo| {
                    transports::export::export(&repo, &point, &how, &s, move |uri| {
                        let _ = started.send(Ok(uri.to_string()));
                    })
                });
                if let Err(e) = &r {
                    let _ = tx.send(Err(datamover::Error::Internal(e.to_string())));
                }
                r
            })
            .map_err(|e| PyValueError::new_err(format!("cannot start the export: {e}")))?;
        match rx.recv() {
            Ok(Ok(uri)) => Ok(Export {
                uri,
                stop,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(_)) | Err(_) => {
                let r = thread
                    .join()
                    .map_err(|_| PyValueError::new_err("the export thread panicked"))?;
                Err(to_py(r.err().unwrap_or_else(|| {
                    datamover::Error::Internal("the export ended before it listened".into())
                })))
            }
        }
    }
}

#[pymethods]
impl Export {
    /// Stop serving (open connections are closed); a dict of what the
    /// export read: chunks_loaded, bytes_loaded, hits.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(t) = t else {
            return crate::as_py(py, &serde_json::json!(null));
        };
        let r = py
            .detach(move || t.join())
            .map_err(|_| PyValueError::new_err("the export thread panicked"))?
            .map_err(to_py)?;
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

impl Drop for Export {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
