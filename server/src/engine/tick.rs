//! The periodic tick: dead proxies, retries whose delay has passed,
//! scheduled jobs.
//!
//! Invariant: a proxy silent for `dead_after` is declared dead and its
//! tasks are re-queued without counting as a failure.

use super::*;

impl Engine {
    /// Periodic work: declare silent proxies dead (re-queueing their
    /// tasks), start scheduled jobs, place queued tasks.
    pub fn tick(&self) -> R<()> {
        let dead: Vec<(ProxyId, String)> = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            catalog::proxies::online(&self.db())?
                .into_iter()
                .filter(|(id, _)| {
                    let last = seen.get(id).copied().unwrap_or(self.started);
                    self.clock.monotonic().saturating_sub(last) > self.timing.dead_after
                })
                .collect()
        };
        for (id, name) in dead {
            let mut db = self.db();
            let tx = db.transaction()?;
            catalog::proxies::set_state(&tx, id, "dead")?;
            let n = requeue_proxy_tasks(
                &*self.clock,
                &tx,
                id,
                &format!(
                    "proxy {name} missed its heartbeats for {} s and was declared dead",
                    self.timing.dead_after.as_secs()
                ),
            )?;
            tx.commit()?;
            tracing::warn!("proxy {name} declared dead; {n} task(s) re-queued");
        }
        let due = catalog::jobs::due(&self.db(), self.clock.ms())?;
        for j in due {
            match self.run_job(&j) {
                Ok(s) => tracing::info!("scheduled run of job {j}: session {}", s.id),
                Err(e) => {
                    tracing::warn!("scheduled run of job {j} not started: {e}");
                    // Try again at the next interval, not on every tick.
                    let _ = catalog::jobs::postpone(&self.db(), &j);
                }
            }
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        self.place(&tx)?;
        tx.commit()?;
        Ok(())
    }
}
