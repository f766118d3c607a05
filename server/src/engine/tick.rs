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
        let dead: Vec<(i64, String)> = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let db = self.db();
            let mut st = db.prepare(
                "SELECT p.id, h.name FROM proxies p JOIN hosts h ON h.id = p.host_id WHERE p.state = 'online'",
            )?;
            let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for r in rows {
                let (id, name) = r?;
                let last = seen.get(&id).copied().unwrap_or(self.started);
                if last.elapsed() > self.timing.dead_after {
                    out.push((id, name));
                }
            }
            out
        };
        for (id, name) in dead {
            let mut db = self.db();
            let tx = db.transaction()?;
            tx.execute("UPDATE proxies SET state = 'dead' WHERE id = ?1", [id])?;
            let n = requeue_proxy_tasks(
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
        let due: Vec<String> = {
            let db = self.db();
            let mut st = db.prepare(
                "SELECT name FROM jobs WHERE next_run IS NOT NULL AND CAST(next_run AS INTEGER) <= ?1",
            )?;
            st.query_map([now_ms()], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for j in due {
            match self.run_job(&j) {
                Ok(s) => tracing::info!("scheduled run of job {j}: session {}", s.id),
                Err(e) => {
                    tracing::warn!("scheduled run of job {j} not started: {e}");
                    // Try again at the next interval, not on every tick.
                    let db = self.db();
                    let _ = db.execute(
                        "UPDATE jobs SET next_run = CAST(CAST(next_run AS INTEGER) + 60000 AS TEXT) WHERE name = ?1",
                        [&j],
                    );
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
