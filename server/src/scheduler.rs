//! Task placement: which queued task runs on which proxy, in which
//! transport mode. Pure and in memory, so it is tested and benchmarked
//! alone (10,000 disks on 500 proxies: `cargo bench -p datamover-server`).
//!
//! Rules, in order:
//! 1. A task may only go to a proxy the job allows (its proxy list, or
//!    any), that allows the mode, and that can serve the disk in it:
//!    the one rule of `transports::mode::modes_for` (san: the disk's file
//!    is under a datastore the proxy sees; hotadd and storage snapshots:
//!    the proxy runs on the VM's host; nbd: any proxy reaches a network
//!    export or a VM).
//!
//!    A pinned mode allows only that mode (plus nbd with failover).
//! 2. Only proxies with a free slot; tasks queue while none has one.
//! 3. Among those: best mode first (san > hotadd > nbd), then least
//!    loaded (running / slots), then fewest running, then name.
//!
//! Tasks are considered in queue order, so an early task is never
//! overtaken by a later one for the same proxy.

pub use transports::mode::{Location, Mode, ModeSet};

/// A proxy as placement sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Catalog id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Its host's name.
    pub host: String,
    /// Task slots.
    pub slots: u32,
    /// Tasks placed on it (running or assigned).
    pub running: u32,
    /// Allowed modes.
    pub modes: ModeSet,
    /// Datastore directories it sees.
    pub datastores: Vec<String>,
}

/// A queued task as placement sees it.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Catalog id.
    pub id: i64,
    /// Where its disk lives.
    pub location: Location,
    /// Proxy ids the job allows (empty: any).
    pub proxies: Vec<i64>,
    /// A pinned mode.
    pub pinned: Option<Mode>,
    /// Failover to network mode.
    pub failover: bool,
    /// Tasks with the same group (the disks of one VM in one session)
    /// are placed together on one proxy or not at all, so that the proxy
    /// reads them in one backup (one guest freeze). A group larger than a
    /// proxy's slots takes the whole proxy when it is idle.
    pub group: Option<String>,
}

/// One placement decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Task id.
    pub task: i64,
    /// Proxy id.
    pub proxy: i64,
    /// The mode expected on that proxy.
    pub mode: Mode,
}

/// The best mode `p` can serve `t` in, if any.
pub fn best_mode(t: &Pending, p: &Slot) -> Option<Mode> {
    let possible = transports::mode::modes_for(&t.location, &p.host, &p.datastores);
    possible.iter().copied().find(|m| {
        p.modes.contains(*m)
            && match t.pinned {
                None => *m != Mode::StorageSnapshot,
                Some(pin) => *m == pin || (t.failover && *m == Mode::Nbd),
            }
    })
}

/// Why no proxy in `proxies` could ever take `t` (free slots aside), or
/// `None` when one could and the task only waits for a slot.
pub fn why_unplaceable(t: &Pending, proxies: &[Slot]) -> Option<String> {
    if proxies.is_empty() {
        return Some("no proxy is online".into());
    }
    let allowed: Vec<&Slot> = proxies
        .iter()
        .filter(|p| t.proxies.is_empty() || t.proxies.contains(&p.id))
        .collect();
    if allowed.is_empty() {
        return Some("none of the proxies the job allows is online".into());
    }
    if allowed.iter().any(|p| best_mode(t, p).is_some()) {
        return None;
    }
    Some(match (&t.location, t.pinned) {
        (Location::Path(path), _) => format!(
            "no online proxy sees {path} (give a proxy its directory: dm-proxy run --datastore DIR)"
        ),
        (Location::OnHost(host), _) => {
            format!("no online proxy runs on {host}, the hypervisor whose libvirt holds this VM")
        }
        (_, Some(m)) => format!(
            "no online proxy may use the pinned transport mode {} for this disk",
            m.name()
        ),
        _ => "no online proxy may use a transport mode this disk can be read in".into(),
    })
}

/// Place as many of `tasks` (in queue order) as free slots allow;
/// `proxies[i].running` is updated for each placement.
pub fn place(tasks: &[Pending], proxies: &mut [Slot]) -> Vec<Placement> {
    let mut out = Vec::new();
    let mut free: u64 = proxies
        .iter()
        .map(|p| u64::from(p.slots.saturating_sub(p.running)))
        .sum();
    let mut grouped: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for t in tasks {
        if free == 0 {
            break;
        }
        if let Some(g) = &t.group {
            if !grouped.insert(g.as_str()) {
                continue;
            }
            let members: Vec<&Pending> = tasks
                .iter()
                .filter(|x| x.group.as_deref() == Some(g.as_str()))
                .collect();
            let need = members.len() as u32;
            let fits = |p: &Slot| {
                let free_here = p.slots.saturating_sub(p.running);
                free_here >= need || (p.running == 0 && p.slots > 0)
            };
            let best = proxies
                .iter()
                .enumerate()
                .filter(|(_, p)| fits(p) && (t.proxies.is_empty() || t.proxies.contains(&p.id)))
                .filter_map(|(i, p)| best_mode(t, p).map(|m| (m, p.running, p.name.clone(), i)))
                .min();
            if let Some((mode, _, _, i)) = best {
                proxies[i].running += need;
                free = free.saturating_sub(u64::from(need));
                out.extend(members.iter().map(|m| Placement {
                    task: m.id,
                    proxy: proxies[i].id,
                    mode,
                }));
            }
            continue;
        }
        let mut best: Option<(usize, Mode)> = None;
        for (i, p) in proxies.iter().enumerate() {
            if p.running >= p.slots || (!t.proxies.is_empty() && !t.proxies.contains(&p.id)) {
                continue;
            }
            let Some(m) = best_mode(t, p) else { continue };
            let better = match best {
                None => true,
                Some((j, bm)) => {
                    let q = &proxies[j];
                    // Load compared as fractions without division.
                    let (a, b) = (
                        u64::from(p.running) * u64::from(q.slots),
                        u64::from(q.running) * u64::from(p.slots),
                    );
                    (m, a, p.running, &p.name) < (bm, b, q.running, &q.name)
                }
            };
            if better {
                best = Some((i, m));
            }
        }
        if let Some((i, mode)) = best {
            proxies[i].running += 1;
            free -= 1;
            out.push(Placement {
                task: t.id,
                proxy: proxies[i].id,
                mode,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: i64, slots: u32, ds: &[&str]) -> Slot {
        Slot {
            id,
            name: format!("p{id}"),
            host: format!("h{id}"),
            slots,
            running: 0,
            modes: ModeSet::ALL,
            datastores: ds.iter().map(|s| s.to_string()).collect(),
        }
    }
    fn task(id: i64, location: Location) -> Pending {
        Pending {
            id,
            location,
            proxies: vec![],
            pinned: None,
            failover: false,
            group: None,
        }
    }

    /// The disks of one VM go to one proxy together or wait together;
    /// a VM with more disks than slots takes an idle proxy whole.
    #[test]
    fn a_vms_disks_are_placed_together_or_not_at_all() {
        let vm = |id: i64, g: &str| Pending {
            group: Some(g.into()),
            ..task(id, Location::Network)
        };
        let mut slots = [slot(1, 2, &[]), slot(2, 3, &[])];
        slots[0].running = 1;
        let placed = place(
            &[
                vm(1, "a"),
                task(2, Location::Network),
                vm(3, "a"),
                vm(4, "a"),
            ],
            &mut slots,
        );
        let on: Vec<(i64, i64)> = placed.iter().map(|p| (p.task, p.proxy)).collect();
        // Group a needs 3 slots: only proxy 2 has them; task 2 takes proxy 1.
        assert_eq!(on, vec![(1, 2), (3, 2), (4, 2), (2, 1)]);
        // Too few free slots anywhere: the group waits whole.
        let mut busy = [slot(1, 2, &[])];
        busy[0].running = 1;
        assert!(place(&[vm(1, "b"), vm(2, "b")], &mut busy).is_empty());
        // A group larger than any proxy takes an idle one.
        let mut idle = [slot(1, 1, &[])];
        assert_eq!(place(&[vm(1, "c"), vm(2, "c")], &mut idle).len(), 2);
    }

    #[test]
    fn fills_every_slot_least_loaded_first_and_queues_the_rest() {
        let mut ps = vec![slot(1, 2, &[]), slot(2, 2, &[]), slot(3, 2, &[])];
        let ts: Vec<_> = (0..12).map(|i| task(i, Location::Network)).collect();
        let out = place(&ts, &mut ps);
        assert_eq!(out.len(), 6);
        // Round robin by load: p1, p2, p3, p1, p2, p3.
        let order: Vec<i64> = out.iter().map(|p| p.proxy).collect();
        assert_eq!(order, vec![1, 2, 3, 1, 2, 3]);
        assert!(ps.iter().all(|p| p.running == 2));
        assert!(place(&ts[6..], &mut ps).is_empty());
    }

    #[test]
    fn an_unplaceable_task_says_why() {
        let mut ps = vec![slot(1, 1, &["/data"])];
        ps[0].running = 1;
        let t = task(1, Location::Path("/data/a.raw".into()));
        // Busy but able: it only waits for the slot.
        assert_eq!(why_unplaceable(&t, &ps), None);
        let far = task(2, Location::Path("/other/b.raw".into()));
        let why = why_unplaceable(&far, &ps).unwrap();
        assert!(
            why.contains("/other/b.raw") && why.contains("--datastore"),
            "{why}"
        );
        assert_eq!(
            why_unplaceable(&t, &[]).as_deref(),
            Some("no proxy is online")
        );
        let mut pinned = task(3, Location::Network);
        pinned.proxies = vec![9];
        assert!(
            why_unplaceable(&pinned, &ps)
                .unwrap()
                .contains("job allows")
        );
        pinned.proxies.clear();
        pinned.pinned = Some(Mode::HotAdd);
        assert!(why_unplaceable(&pinned, &ps).unwrap().contains("hotadd"));
    }

    #[test]
    fn best_mode_beats_load_and_visibility_is_required() {
        let mut ps = vec![slot(1, 4, &[]), slot(2, 1, &["/data"])];
        ps[1].running = 0;
        let ts = vec![
            task(1, Location::Path("/data/a.raw".into())),
            task(2, Location::Path("/data/b.raw".into())),
            task(3, Location::Path("/other/c.raw".into())),
            task(
                4,
                Location::Vm {
                    host: Some("h1".into()),
                },
            ),
            task(
                5,
                Location::Vm {
                    host: Some("h9".into()),
                },
            ),
        ];
        let out = place(&ts, &mut ps);
        assert_eq!(
            out,
            vec![
                Placement {
                    task: 1,
                    proxy: 2,
                    mode: Mode::San
                },
                Placement {
                    task: 4,
                    proxy: 1,
                    mode: Mode::HotAdd
                },
                Placement {
                    task: 5,
                    proxy: 1,
                    mode: Mode::Nbd
                },
            ]
        );
    }

    #[test]
    fn job_proxy_list_pins_and_failover_are_honoured() {
        let mut ps = vec![slot(1, 2, &[]), slot(2, 2, &[])];
        let mut t = task(
            1,
            Location::Vm {
                host: Some("h1".into()),
            },
        );
        t.proxies = vec![2];
        assert_eq!(place(&[t.clone()], &mut ps)[0].proxy, 2);
        t.proxies.clear();
        t.pinned = Some(Mode::San);
        assert!(place(&[t.clone()], &mut ps).is_empty());
        t.failover = true;
        assert_eq!(place(&[t.clone()], &mut ps)[0].mode, Mode::Nbd);
        ps[0].modes = ModeSet::from_names(&["san"]).unwrap();
        ps[1].modes = ModeSet::from_names(&["san"]).unwrap();
        assert!(place(&[t], &mut ps).is_empty());
        assert!(ModeSet::from_names(&["warp"]).is_err());
    }
}
