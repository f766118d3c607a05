//! The repository service over real mutual TLS on loopback: a source
//! writes through `RemoteStore` exactly as into a local repository; only
//! missing chunks cross the wire; replicas are updated by delta; a source
//! that sends damaged frames, skips frames or disconnects leaves no point;
//! a client of another CA is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datamover::format::manifest::{Manifest, PointMeta};
use datamover::{
    BackupOptions, ChunkId, DiskName, FrameSink, PointId, Repository, Store, StoreSession,
};
use datamover_control::api::ServiceAddress;
use datamover_control::pki::Identity;
use datamover_proxy::repo_service::{self, RemoteStore, Served, ServedMap};
use datamover_server::ca::Ca;
use datamover_testkit::make_disk;

const MIB: usize = 1 << 20;

/// Overwrite 1 MiB at `at` with new pseudo-random (incompressible) bytes.
fn change(path: &Path, at: usize, seed: u64) {
    let mut b = std::fs::read(path).unwrap();
    let mut x = seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for c in b[at..at + MIB].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(path, b).unwrap();
}

struct Service {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn start(id: &Identity, repos: &[(&str, PathBuf)]) -> Service {
    let served: ServedMap = Default::default();
    for (n, p) in repos {
        served
            .write()
            .unwrap()
            .insert(n.to_string(), Served { path: p.clone() });
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let (id, st) = (id.clone(), stop.clone());
    std::thread::spawn(move || repo_service::serve(l, &id, served, st).unwrap());
    Service { port, stop }
}

fn remote(svc: &Service, repo: &str, replica: bool, id: &Identity) -> RemoteStore {
    RemoteStore::new(
        ServiceAddress {
            address: format!("127.0.0.1:{}", svc.port),
            server_name: "127.0.0.1".into(),
            repository: repo.into(),
            replica,
        },
        id,
    )
    .unwrap()
}

fn backup(store: &dyn Store, img: &Path, disk: &str) -> datamover::Result<datamover::BackupReport> {
    let src = datamover::open_source(img)?;
    datamover::backup_to(
        store,
        src.as_ref(),
        &disk.parse().unwrap(),
        &BackupOptions::default(),
    )
}

fn wire(r: &RemoteStore) -> u64 {
    r.wire.sent.swap(0, Ordering::Relaxed) + r.wire.received.swap(0, Ordering::Relaxed)
}

fn restore_equals(repo: &Path, disk: &str, img: &Path) {
    let r = Repository::open(repo).unwrap();
    let d: DiskName = disk.parse().unwrap();
    let p = r.resolve_point(&d, None).unwrap();
    let out = repo.with_file_name("restored.raw");
    let _ = std::fs::remove_file(&out);
    let size = std::fs::metadata(img).unwrap().len();
    let t = datamover::open_target(&out, size, false).unwrap();
    datamover::restore(&r, &d, &p, &*t, &Default::default()).unwrap();
    drop(t);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(img).unwrap(),
        "{disk} restores differently"
    );
}

fn points(repo: &Path, disk: &str) -> usize {
    Repository::open(repo)
        .unwrap()
        .point_ids(&disk.parse().unwrap())
        .unwrap()
        .len()
}

/// The identities of a target (serving on loopback) and a source, under
/// a CA made in `dir`.
fn identities(dir: &Path) -> (Identity, Identity) {
    let ca = Ca::load_or_create(&dir.join("ca"), "test").unwrap();
    let tgt = ca
        .issue(
            "tgt",
            &["127.0.0.1".into()],
            datamover_server::ca::Usage::Host,
        )
        .unwrap();
    let src = ca
        .issue("src", &[], datamover_server::ca::Usage::Host)
        .unwrap();
    (tgt, src)
}

#[test]
fn only_missing_chunks_cross_the_wire_and_every_point_restores() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let vault = d.path().join("vault");
    let svc = start(&tgt, &[("vault", vault.clone())]);
    let img = d.path().join("a.raw");
    make_disk(&img, 16 * MIB, 7);
    let r = remote(&svc, "vault", false, &src);

    // First full: the data crosses the wire once, compressed frames only.
    let b1 = backup(&r, &img, "vm/a").unwrap();
    let w1 = wire(&r);
    assert!(
        w1 >= b1.stats.bytes_stored && w1 < b1.stats.bytes_stored + 256 * 1024,
        "first full: {w1} on the wire for {} stored",
        b1.stats.bytes_stored
    );
    restore_equals(&vault, "vm/a", &img);

    // Unchanged second full: nothing but manifests (and TLS) on the wire.
    let b2 = backup(&r, &img, "vm/a").unwrap();
    let w2 = wire(&r);
    let manifest = std::fs::metadata(
        Repository::open(&vault)
            .unwrap()
            .point_path(&"vm/a".parse().unwrap(), &b2.point),
    )
    .unwrap()
    .len();
    assert!(
        w2 < 2 * manifest + 32 * 1024,
        "unchanged full sent {w2} bytes; the manifest is {manifest}"
    );
    let c = r.last.lock().unwrap().clone().unwrap();
    assert_eq!((c.frames, c.frames_new), (0, 0), "{c:?}");

    // One changed MiB: about one MiB crosses.
    change(&img, 5 * MIB, 1);
    backup(&r, &img, "vm/a").unwrap();
    let w3 = wire(&r);
    assert!(
        w3 > MIB as u64 && w3 < (MIB + 256 * 1024) as u64,
        "one changed MiB sent {w3} bytes"
    );
    restore_equals(&vault, "vm/a", &img);

    // Another disk with the same content is deduplicated against the
    // repository (not only against its own parent).
    let copy = d.path().join("b.raw");
    std::fs::copy(&img, &copy).unwrap();
    backup(&r, &copy, "vm/b").unwrap();
    let c = r.last.lock().unwrap().clone().unwrap();
    assert_eq!(c.frames_new, 0, "{c:?}");
    assert!(wire(&r) < 256 * 1024);
    restore_equals(&vault, "vm/b", &copy);
    assert_eq!(points(&vault, "vm/a"), 3);

    // The newest point's metadata is read over the service too.
    let (p, meta) = r.latest_meta(&"vm/a".parse().unwrap()).unwrap().unwrap();
    assert_eq!(meta.point, p.as_str());
    assert!(
        r.latest_meta(&"vm/none".parse().unwrap())
            .unwrap()
            .is_none()
    );
}

/// With a manifest cache (as `dm-proxy` keeps one), an unchanged full
/// backup asks the service about none of the parent's chunks: about its
/// new manifest crosses the wire, instead of that plus 32 bytes a chunk.
/// A cache entry that is not the parent the service names is not used.
#[test]
fn a_manifest_cache_spares_asking_about_the_parents_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let vault = d.path().join("vault");
    let svc = start(&tgt, &[("vault", vault.clone())]);
    let img = d.path().join("a.raw");
    make_disk(&img, 64 * MIB, 11);
    let opts = BackupOptions {
        chunking: datamover::ChunkingInfo {
            kind: datamover::ChunkingKind::Fixed,
            block_size: 256 * 1024,
        },
        ..Default::default()
    };
    let run = |r: &RemoteStore| {
        let s = datamover::open_source(&img).unwrap();
        datamover::backup_to(r, s.as_ref(), &"vm/a".parse().unwrap(), &opts).unwrap()
    };
    let plain = remote(&svc, "vault", false, &src);
    let cache = d.path().join("cache");
    let cached = remote(&svc, "vault", false, &src).with_manifest_cache(cache);
    run(&cached); // the first point: nothing to fetch, its manifest is kept
    wire(&cached);
    let b = run(&plain); // asks about every chunk; the cache is now stale
    let w_plain = wire(&plain);
    let manifest = std::fs::metadata(
        Repository::open(&vault)
            .unwrap()
            .point_path(&"vm/a".parse().unwrap(), &b.point),
    )
    .unwrap()
    .len();
    assert!(
        manifest > 8 * 1024,
        "manifest of {manifest} bytes: too small to tell"
    );
    assert!(
        w_plain > manifest + manifest / 2,
        "{w_plain} on the wire, manifest {manifest}"
    );
    run(&cached); // stale cache: not used (asks about every chunk), then kept
    let w_stale = wire(&cached);
    assert!(
        w_stale + manifest / 2 > w_plain,
        "{w_stale}: the stale cache was used"
    );
    run(&cached); // fresh cache: asks about nothing
    let w_cached = wire(&cached);
    assert!(
        w_cached < manifest + manifest / 2 && w_cached + manifest / 2 < w_plain,
        "cached {w_cached}, uncached {w_plain}, manifest {manifest}"
    );
    restore_equals(&vault, "vm/a", &img);
    assert_eq!(points(&vault, "vm/a"), 4);
}

#[test]
fn replicas_are_updated_by_delta_and_equal_the_source() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let root = d.path().join("replicas");
    let svc = start(&tgt, &[("dr", root.clone())]);
    let img = d.path().join("vm.raw");
    make_disk(&img, 16 * MIB, 3);
    let r = remote(&svc, "dr", true, &src);
    let replica = datamover::replica::replica_path(
        &repo_service::replica_root(&root),
        &"vm/os".parse().unwrap(),
    );

    backup(&r, &img, "vm/os").unwrap();
    let rep = r.last.lock().unwrap().clone().unwrap().replica.unwrap();
    assert_eq!(rep.path, replica.display().to_string());
    assert!(rep.base.is_none());
    assert!(std::fs::read(&replica).unwrap() == std::fs::read(&img).unwrap());

    change(&img, 9 * MIB, 2);
    let b = backup(&r, &img, "vm/os").unwrap();
    let rep = r.last.lock().unwrap().clone().unwrap().replica.unwrap();
    assert!(rep.base.is_some());
    assert_eq!(rep.point, b.point.as_str());
    assert!(
        rep.bytes_written <= 2 * MIB as u64,
        "a 1 MiB change rewrote {} bytes of the replica",
        rep.bytes_written
    );
    assert!(std::fs::read(&replica).unwrap() == std::fs::read(&img).unwrap());
    let st = datamover::replica::read_state(&replica).unwrap();
    assert_eq!(
        (st.point.as_str(), st.state.as_str()),
        (b.point.as_str(), "applied")
    );

    // An interrupted update ("applying") is not trusted: the next one
    // rewrites the whole image.
    std::fs::write(
        replica.with_extension("img.dm-replica"),
        br#"{"point":"x","state":"applying"}"#,
    )
    .unwrap();
    std::fs::write(&replica, b"garbage").unwrap();
    backup(&r, &img, "vm/os").unwrap();
    let rep = r.last.lock().unwrap().clone().unwrap().replica.unwrap();
    assert!(rep.base.is_none());
    assert!(std::fs::read(&replica).unwrap() == std::fs::read(&img).unwrap());
}

/// A source that misbehaves: drops every frame, damages every frame, or
/// goes away before committing.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    DropFrames,
    DamageFrames,
    NoCommit,
}

struct Faulty<'a>(&'a RemoteStore, Fault);
struct FaultySession<'a>(Box<dyn StoreSession + 'a>, Fault);
struct FaultySink<'a>(Box<dyn FrameSink + 'a>, Fault);

impl Store for Faulty<'_> {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn latest_meta(&self, disk: &DiskName) -> datamover::Result<Option<(PointId, PointMeta)>> {
        self.0.latest_meta(disk)
    }
    fn begin<'s>(
        &'s self,
        disk: &DiskName,
        started: chrono::DateTime<chrono::Utc>,
    ) -> datamover::Result<Box<dyn StoreSession + 's>> {
        Ok(Box::new(FaultySession(
            self.0.begin(disk, started)?,
            self.1,
        )))
    }
}

impl StoreSession for FaultySession<'_> {
    fn point(&self) -> &PointId {
        self.0.point()
    }
    fn parent(&self) -> datamover::Result<Option<(PointId, Manifest)>> {
        self.0.parent()
    }
    fn has(&self, id: &ChunkId) -> bool {
        self.0.has(id)
    }
    fn missing_of(&self, m: &Manifest) -> Option<ChunkId> {
        self.0.missing_of(m)
    }
    fn sink(&self, t: u64) -> datamover::Result<Box<dyn FrameSink + '_>> {
        Ok(Box::new(FaultySink(self.0.sink(t)?, self.1)))
    }
    fn manifest_temp(&self) -> datamover::Result<(std::fs::File, PathBuf)> {
        self.0.manifest_temp()
    }
    fn commit(self: Box<Self>, path: &Path) -> datamover::Result<()> {
        if self.1 == Fault::NoCommit {
            return Err(datamover::Error::Cancelled);
        }
        self.0.commit(path)
    }
}

impl FrameSink for FaultySink<'_> {
    fn add(&mut self, id: ChunkId, len: u32, mut frame: Vec<u8>) -> datamover::Result<()> {
        match self.1 {
            Fault::DropFrames => Ok(()),
            Fault::DamageFrames => {
                let n = frame.len();
                frame[n - 1] ^= 0x40;
                self.0.add(id, len, frame)
            }
            Fault::NoCommit => self.0.add(id, len, frame),
        }
    }
    fn finish(self: Box<Self>) -> datamover::Result<()> {
        self.0.finish()
    }
}

#[test]
fn bad_sources_and_foreign_clients_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let vault = d.path().join("vault");
    let svc = start(&tgt, &[("vault", vault.clone())]);
    let img = d.path().join("a.raw");
    make_disk(&img, 8 * MIB, 11);
    let r = remote(&svc, "vault", false, &src);

    // A manifest naming chunks that were never sent is refused.
    let e = backup(&Faulty(&r, Fault::DropFrames), &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    // Damaged frames are refused when they arrive.
    let e = backup(&Faulty(&r, Fault::DamageFrames), &img, "vm/a").unwrap_err();
    assert!(
        e.to_string().contains("CRC") || e.to_string().contains("refused"),
        "{e}"
    );
    // A source that goes away before its commit.
    backup(&Faulty(&r, Fault::NoCommit), &img, "vm/a").unwrap_err();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(points(&vault, "vm/a"), 0);
    let tmp: Vec<_> = std::fs::read_dir(vault.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "temp files left: {tmp:?}");
    // The repository is sound, and a good backup still works.
    backup(&r, &img, "vm/a").unwrap();
    restore_equals(&vault, "vm/a", &img);
    let v = datamover::verify(&Repository::open(&vault).unwrap(), true).unwrap();
    assert!(v.is_ok(), "{v:?}");

    // Unknown repository names are refused with a message.
    let e = backup(&remote(&svc, "other", false, &src), &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("serves no repository"), "{e}");

    // A client under another CA does not get past TLS; nor does one that
    // expects another server name.
    let other = Ca::load_or_create(&d.path().join("ca2"), "other").unwrap();
    let stranger = other
        .issue("x", &[], datamover_server::ca::Usage::Host)
        .unwrap();
    assert!(backup(&remote(&svc, "vault", false, &stranger), &img, "vm/a").is_err());
    let mut wrong = remote(&svc, "vault", false, &src);
    wrong = RemoteStore::new(
        ServiceAddress {
            server_name: "elsewhere.example".into(),
            address: format!("127.0.0.1:{}", svc.port),
            repository: "vault".into(),
            replica: false,
        },
        &src,
    )
    .unwrap_or(wrong);
    assert!(backup(&wrong, &img, "vm/a").is_err());
    assert_eq!(points(&vault, "vm/a"), 1);
}
