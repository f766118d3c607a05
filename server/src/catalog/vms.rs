//! `vms`: the VM inventory, as each hypervisor's proxy last reported it.
//!
//! Invariant: a host's rows are replaced whole by each report, so a VM
//! that was undefined leaves with the next one.

use datamover_control::api::{InventoryVm, VmReport};
use rusqlite::{Connection, params};

use super::Q;
use super::ids::HostId;

/// Replace host `id`'s VMs by `vms`, seen at `seen`.
pub fn replace(db: &Connection, id: HostId, vms: &[VmReport], seen: &str) -> Q<()> {
    db.execute("DELETE FROM vms WHERE host_id = ?1", [id])?;
    for v in vms {
        db.execute(
            "INSERT INTO vms(host_id, name, state, disks, seen) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(host_id, name) DO NOTHING",
            params![id, v.name, v.state, serde_json::to_string(&v.disks)?, seen],
        )?;
    }
    Ok(())
}

/// The inventory, by host then name.
pub fn list(db: &Connection) -> Q<Vec<InventoryVm>> {
    let mut st = db.prepare(
        "SELECT h.name, v.name, v.state, v.disks, v.seen FROM vms v JOIN hosts h ON h.id = v.host_id
         ORDER BY h.name, v.name",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    rows.map(|r| {
        let (host, name, state, disks, seen) = r?;
        Ok(InventoryVm {
            host,
            name,
            state,
            disks: serde_json::from_str(&disks)?,
            seen,
        })
    })
    .collect()
}

/// The hypervisor connection of `host` (a host name as the inventory
/// shows it).
pub fn hypervisor_of(db: &Connection, host: &str) -> Q<Option<String>> {
    Ok(db
        .query_row(
            "SELECT hypervisor FROM hosts WHERE name = ?1",
            [host],
            |r| r.get::<_, Option<String>>(0),
        )
        .unwrap_or(None))
}
