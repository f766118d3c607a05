//! Long calls off the GIL: a worker thread runs the call while the
//! caller waits with the GIL released, waking every 50 ms for Python's
//! signal handlers. Ctrl-C and exceptions from the progress callback
//! cancel the run through the core's progress path (no partial point).

use crate::*;

/// Run `work` on a worker thread with the GIL released; Ctrl-C and
/// exceptions from `progress` cancel it and are re-raised.
pub(crate) fn run_cancellable<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(datamover::ProgressFn) -> datamover::Result<T> + Send,
) -> PyResult<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let raised: Arc<Mutex<Option<PyErr>>> = Arc::default();
    let pfn: datamover::ProgressFn = {
        let (cancel, raised) = (cancel.clone(), raised.clone());
        Arc::new(move |done, total| {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            if let Some(cb) = &progress {
                if let Err(e) = Python::attach(|py| cb.call1(py, (done, total)).map(drop)) {
                    *raised.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    cancel.store(true, Ordering::Relaxed);
                    return false;
                }
            }
            true
        })
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut interrupt: Option<PyErr> = None;
    let result = std::thread::scope(|s| {
        s.spawn(move || {
            let _ = tx.send(work(pfn));
        });
        loop {
            match py.detach(|| rx.recv_timeout(Duration::from_millis(50))) {
                Ok(r) => break r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if interrupt.is_none() {
                        if let Err(e) = py.check_signals() {
                            interrupt = Some(e);
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    break Err(datamover::Error::Internal(
                        "worker thread ended without a result".into(),
                    ));
                }
            }
        }
    });
    if let Some(e) = interrupt {
        return Err(e);
    }
    if let Some(e) = raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    result.map_err(to_py)
}

/// A positive number of seconds.
pub(crate) fn secs(timeout: f64) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| {
            to_py(datamover::Error::InvalidArgument(format!(
                "timeout {timeout} s: give a positive number of seconds"
            )))
        })
}
