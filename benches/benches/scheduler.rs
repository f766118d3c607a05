//! Scheduler alone: place 10,000 disks on 500 proxies (target < 1 s).
//!
//! `cargo bench -p datamover-benches --bench scheduler`
//!
//! The disks are a third image files under one of 50 datastores (SAN for
//! the proxies that see it), a third NBD exports, a third VM disks on one
//! of 500 hosts (HotAdd on that host's proxy, NBD elsewhere); one proxy in
//! five sees two datastores. With 20 slots per proxy 7,996 disks are
//! placed (image files only fit the 2,000 slots that see them); with 4
//! slots per proxy 2,000 are placed and 8,000 stay queued (the pass must
//! stay fast when most disks wait).

use criterion::{Criterion, criterion_group, criterion_main};
use datamover_server::scheduler::{Location, ModeSet, Pending, Slot, place};

fn proxies(n: usize, slots: u32) -> Vec<Slot> {
    (0..n)
        .map(|i| Slot {
            id: i as i64,
            name: format!("proxy{i:03}"),
            host: format!("host{i:03}"),
            slots,
            running: 0,
            modes: ModeSet::ALL,
            datastores: if i % 5 == 0 {
                vec![
                    format!("/ds/{:02}", i % 50),
                    format!("/ds/{:02}", (i + 1) % 50),
                ]
            } else {
                vec![]
            },
        })
        .collect()
}

fn tasks(n: usize) -> Vec<Pending> {
    (0..n)
        .map(|i| Pending {
            id: i as i64,
            location: match i % 3 {
                0 => Location::Path(format!("/ds/{:02}/vm{i}.raw", i % 50)),
                1 => Location::Network,
                _ => Location::Vm {
                    host: Some(format!("host{:03}", i % 500)),
                },
            },
            proxies: vec![],
            pinned: None,
            failover: false,
            group: None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let ts = tasks(10_000);
    let full = proxies(500, 20);
    let placed = place(&ts, &mut full.clone()).len();
    eprintln!("10,000 disks, 500 proxies x 20 slots: {placed} placed");
    c.bench_function("place 10k disks on 500 proxies x 20 slots", |b| {
        b.iter(|| place(&ts, &mut full.clone()))
    });
    let tight = proxies(500, 4);
    let placed = place(&ts, &mut tight.clone()).len();
    eprintln!("10,000 disks, 500 proxies x 4 slots: {placed} placed");
    c.bench_function("place 10k disks on 500 proxies x 4 slots", |b| {
        b.iter(|| place(&ts, &mut tight.clone()))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
