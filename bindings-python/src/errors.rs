//! Errors: the core's and the server client's, mapped onto the exception
//! classes of `datamover._errors` (defined there once, in Python, and
//! imported here once as types, never looked up by name per call).

use datamover::ErrorKind;
use pyo3::PyErr;
use pyo3::exceptions::PyFileNotFoundError;

pyo3::import_exception!(datamover._errors, CorruptRepositoryError);
pyo3::import_exception!(datamover._errors, UnsupportedError);
pyo3::import_exception!(datamover._errors, InvalidInputError);
pyo3::import_exception!(datamover._errors, TransportError);
pyo3::import_exception!(datamover._errors, CancelledError);

/// Map a core error to the Python exception hierarchy of `datamover._errors`.
pub(crate) fn to_py(e: datamover::Error) -> PyErr {
    let msg = e.to_string();
    let missing_file = match &e {
        datamover::Error::Io { source, .. }
        | datamover::Error::SourceUnavailable { source, .. } => {
            source.kind() == std::io::ErrorKind::NotFound
        }
        _ => false,
    };
    if missing_file {
        return PyFileNotFoundError::new_err(msg);
    }
    match e.kind() {
        ErrorKind::Corrupt => CorruptRepositoryError::new_err(msg),
        ErrorKind::Unsupported => UnsupportedError::new_err(msg),
        ErrorKind::InvalidInput | ErrorKind::NotFound => InvalidInputError::new_err(msg),
        ErrorKind::Io => TransportError::new_err(msg),
        ErrorKind::Cancelled => CancelledError::new_err(msg),
    }
}

/// Map a server client error: refusals and bad input are
/// `InvalidInputError`, no answer is `TransportError`.
pub(crate) fn client_err(e: datamover_control::client::ClientError) -> PyErr {
    match e.status() {
        Some(s) if (400..500).contains(&s) => InvalidInputError::new_err(e.to_string()),
        _ => TransportError::new_err(e.to_string()),
    }
}
