//! Placement: queued tasks onto free proxy slots, through the pure
//! scheduler (`crate::scheduler`).
//!
//! Invariant: a task is placed only on an online proxy with a free slot
//! that may serve its disk in the chosen mode.

use super::*;

impl Engine {
    /// Place queued tasks on proxies with free slots.
    pub(super) fn place(&self, db: &Connection) -> R<()> {
        let running = running_counts(db)?;
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let others = catalog::proxies::managed_enabled(db)?;
        let mut slots = Vec::new();
        for p in catalog::proxies::placeable(db)? {
            // The built-in proxy works only while no other proxy exists.
            if p.builtin && others > 0 {
                continue;
            }
            if !seen.contains_key(&p.id) {
                continue;
            }
            slots.push(Slot {
                id: p.id.0,
                host: p.name.clone(),
                slots: effective_slots(p.slots, p.cores),
                running: running.get(&p.id).copied().unwrap_or(0),
                modes: ModeSet::from_names(&p.modes).unwrap_or(ModeSet::ALL),
                name: p.name,
                datastores: p.datastores,
            });
        }
        if !slots.is_empty() && slots.iter().all(|s| s.running >= s.slots) {
            return Ok(());
        }
        let names: HashMap<String, i64> = slots.iter().map(|s| (s.name.clone(), s.id)).collect();
        let mut pending = Vec::new();
        let mut waiting: HashMap<i64, Option<String>> = HashMap::new();
        let mut jobs: HashMap<String, JobSpec> = HashMap::new();
        for q in catalog::tasks::queued(db, self.clock.ms())? {
            let (id, d, jspec, holder) = (q.id.0, q.disk, q.job_spec, q.holder);
            waiting.insert(id, q.waiting);
            if !jobs.contains_key(&jspec) {
                jobs.insert(jspec.clone(), serde_json::from_str(&jspec)?);
            }
            let Some(j) = jobs.get(&jspec) else { continue };
            // A restore from a repository a proxy holds runs on that proxy.
            let only: Vec<String> = match (&holder, j.kind) {
                (Some(h), JobKind::Restore) => vec![h.clone()],
                _ => j.proxies.clone(),
            };
            pending.push(Pending {
                id,
                location: location_of(&d),
                // A job's proxy list names proxies that may not be online:
                // an unknown id keeps the task queued rather than anywhere.
                proxies: only
                    .iter()
                    .map(|n| names.get(n).copied().unwrap_or(-1))
                    .collect(),
                pinned: j.transport.parse::<Mode>().ok(),
                failover: j.failover_to_network,
                // A libvirt VM's disks named by the job's `vms`: read in
                // one backup (one freeze) by the proxy on its host.
                group: (d.vm_host.is_some() && d.source.starts_with("libvirt:"))
                    .then(|| format!("{}:{}", q.session, d.source)),
            });
        }
        let placed = scheduler::place(&pending, &mut slots);
        // With slots still free, a task left queued is one no proxy can
        // take: say why (once; placement clears it).
        if slots.is_empty() || slots.iter().any(|s| s.running < s.slots) {
            let done: std::collections::HashSet<i64> = placed.iter().map(|p| p.task).collect();
            for p in pending.iter().filter(|p| !done.contains(&p.id)) {
                let why = scheduler::why_unplaceable(p, &slots);
                if why.is_some() && waiting.get(&p.id) != Some(&why) {
                    catalog::tasks::set_waiting(db, TaskId(p.id), why.as_deref())?;
                }
            }
        }
        let t = self.clock.secs();
        for p in placed {
            let name = slots
                .iter()
                .find(|s| s.id == p.proxy)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            catalog::tasks::assign(
                db,
                TaskId(p.task),
                ProxyId(p.proxy),
                &name,
                p.mode.name(),
                &self.clock.rfc3339(),
                t,
            )?;
        }
        Ok(())
    }
}
