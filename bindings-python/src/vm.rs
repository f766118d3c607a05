//! VMs: the disks of a running VM, through `transports`.

use crate::*;

/// A running VM's disks (`qmp+unix:///path/qmp.sock` or `qmp://host:port`):
/// a list of dicts with node, device, format, file, size, backing and
/// checkpoints.
#[pyfunction]
#[pyo3(signature = (address, *, timeout=60.0))]
pub(crate) fn vm_disks<'py>(
    py: Python<'py>,
    address: &str,
    timeout: f64,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let timeout = secs(timeout)?;
    let address = address.to_string();
    let disks = py
        .detach(move || transports::qemu::disks(&address, timeout))
        .map_err(to_py)?;
    // The same fields as `dm vm-disks --json`, from the one definition.
    let loads = py.import("json")?.getattr("loads")?;
    disks
        .iter()
        .map(|d| loads.call1((d.summary().to_string(),)))
        .collect()
}
