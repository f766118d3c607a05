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
    let loads = py.import("json")?.getattr("loads")?;
    if transports::libvirt::is_libvirt(&address) {
        let disks = py
            .detach(move || transports::libvirt::disks(&address))
            .map_err(to_py)?;
        return disks
            .iter()
            .map(|d| loads.call1((serde_json::json!(d).to_string(),)))
            .collect();
    }
    let disks = py
        .detach(move || transports::qemu::disks(&address, timeout))
        .map_err(to_py)?;
    // The same fields as `dm vm-disks --json`, from the one definition.
    disks
        .iter()
        .map(|d| loads.call1((d.summary().to_string(),)))
        .collect()
}

/// The VMs (libvirt domains) of a connection (`libvirt:///`,
/// `libvirt://HOST/`, `?uri=`): a list of dicts with name, state and disks
/// (target, format, source), as `dm vms --json` prints them.
#[pyfunction]
#[pyo3(signature = (address="libvirt:///"))]
pub(crate) fn vms<'py>(py: Python<'py>, address: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let address = address.to_string();
    let doms = py
        .detach(move || transports::libvirt::domains(&address))
        .map_err(to_py)?;
    let loads = py.import("json")?.getattr("loads")?;
    doms.iter()
        .map(|d| loads.call1((serde_json::json!(d).to_string(),)))
        .collect()
}
