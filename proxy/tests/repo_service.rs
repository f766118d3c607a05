//! The repository service over real mutual TLS on loopback: a source
//! writes through `RemoteStore` exactly as into a local repository; only
//! missing chunks cross the wire; replicas are updated by delta; a source
//! that sends damaged frames, skips frames or disconnects leaves no point;
//! a client of another CA is refused; a point is read (exported) through
//! the service under a read grant only, fetching the chunks read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datamover::format::manifest::PointMeta;
use datamover::repo::PointFile;
use datamover::{
    BackupOptions, ChunkId, DiskName, FrameSink, PointId, Repository, Store, StoreSession,
};
use datamover_control::api::{Grant, ServiceAddress};
use datamover_control::pki::Identity;
use datamover_proxy::repo_service::server::Limits;
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
    served: ServedMap,
}

/// The fingerprint the server puts in a grant for `id`.
fn fp(id: &Identity) -> String {
    datamover_control::pki::fingerprint(
        &datamover_control::pki::cert_der_from_pem(&id.cert_pem).unwrap(),
    )
}

/// A grant for `id` to write `disk` (the server sends one per task).
fn grant(id: &Identity, disk: &str, replica: bool) -> Grant {
    Grant {
        task: 1,
        peer: fp(id),
        disk: disk.parse().unwrap(),
        replica,
        start: false,
        read: false,
        point: None,
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A service of `repos`, each granting `grants`.
fn start(id: &Identity, repos: &[(&str, PathBuf)], grants: &[Grant]) -> Service {
    start_with(id, repos, grants, test_limits())
}

/// Limits with a short wait for grants (a test's grants are all there
/// from the start).
fn test_limits() -> Limits {
    Limits {
        grant_wait: std::time::Duration::from_millis(300),
        ..Limits::default()
    }
}

fn start_with(
    id: &Identity,
    repos: &[(&str, PathBuf)],
    grants: &[Grant],
    limits: Limits,
) -> Service {
    let served: ServedMap = Default::default();
    for (n, p) in repos {
        served.write().unwrap().insert(
            n.to_string(),
            Served {
                path: p.clone(),
                grants: grants.to_vec(),
                hypervisor: None,
            },
        );
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let (id, st, m) = (id.clone(), stop.clone(), served.clone());
    let id = datamover_proxy::identity::LiveIdentity::new(id, None);
    std::thread::spawn(move || repo_service::server::serve_with(l, &id, m, st, limits).unwrap());
    Service { port, stop, served }
}

/// Where `svc` serves `repo`, for a session of `task` (none: any grant).
fn address(svc: &Service, repo: &str, replica: bool, task: Option<u64>) -> ServiceAddress {
    ServiceAddress {
        address: format!("127.0.0.1:{}", svc.port),
        server_name: "127.0.0.1".into(),
        repository: repo.into(),
        replica,
        task,
    }
}

fn remote(svc: &Service, repo: &str, replica: bool, id: &Identity) -> RemoteStore {
    RemoteStore::new(address(svc, repo, replica, None), id).unwrap()
}

/// Replace the grants `svc` holds for `repo` (the server's next orders);
/// returns the ones it held.
fn set_grants(svc: &Service, repo: &str, grants: Vec<Grant>) -> Vec<Grant> {
    let mut m = svc.served.write().unwrap();
    std::mem::replace(&mut m.get_mut(repo).unwrap().grants, grants)
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
    let svc = start(
        &tgt,
        &[("vault", vault.clone())],
        &[
            grant(&src, "vm/a", false),
            grant(&src, "vm/b", false),
            grant(&src, "vm/none", false),
        ],
    );
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
    let svc = start(
        &tgt,
        &[("vault", vault.clone())],
        &[grant(&src, "vm/a", false)],
    );
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
    let svc = start(&tgt, &[("dr", root.clone())], &[grant(&src, "vm/os", true)]);
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

/// A source that misbehaves: drops every frame, damages every frame,
/// forges frames (sound frames whose bytes are not the chunk their id
/// names: dedupe poisoning), or goes away before committing.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    DropFrames,
    DamageFrames,
    ForgeFrames,
    NoCommit,
}

struct Faulty<'a>(&'a RemoteStore, Fault);
struct FaultySession<'a>(Box<dyn StoreSession + 'a>, Fault);
struct FaultySink<'a>(Box<dyn FrameSink + 'a>, Fault, u64);

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
    fn parent(&self) -> datamover::Result<Option<(PointId, PointFile)>> {
        self.0.parent()
    }
    fn has(&self, id: &ChunkId) -> bool {
        self.0.has(id)
    }
    fn missing_of(&self, m: &PointFile) -> datamover::Result<Option<ChunkId>> {
        self.0.missing_of(m)
    }
    fn sink(&self, t: u64) -> datamover::Result<Box<dyn FrameSink + '_>> {
        Ok(Box::new(FaultySink(self.0.sink(t)?, self.1, 0)))
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
            Fault::ForgeFrames => {
                // Every tenth frame carries other bytes under its id, in a
                // frame whose header and CRC are sound.
                self.2 += 1;
                if self.2 % 10 != 3 {
                    return self.0.add(id, len, frame);
                }
                let forged = vec![0x5a; len as usize];
                let mut out = Vec::new();
                datamover::format::frame::FrameEncoder::new(Some(3))
                    .unwrap()
                    .encode_into(id, &forged, &mut out)
                    .unwrap();
                self.0.add(id, len, out)
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
    let svc = start(
        &tgt,
        &[("vault", vault.clone())],
        &[grant(&src, "vm/a", false)],
    );
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
    // Forged frames are refused: their bytes are not their ids' chunks.
    let e = backup(&Faulty(&r, Fault::ForgeFrames), &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("frame 2 (chunk"), "{e}");
    assert!(e.to_string().contains("BLAKE3 mismatch"), "{e}");
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
            ..address(&svc, "vault", false, None)
        },
        &src,
    )
    .unwrap_or(wrong);
    assert!(backup(&wrong, &img, "vm/a").is_err());
    assert_eq!(points(&vault, "vm/a"), 1);
}

/// Finding 1 of issue "Trust": a certificate of the installation is not
/// enough. A peer needs the server's grant for the repository and the
/// disk; without one it cannot read the newest manifest, ask which chunks
/// exist or commit; a grant taken away stops it; it cannot date its point
/// nor choose the replica flag.
#[test]
fn only_granted_peers_use_a_repository_and_the_service_dates_the_point() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let ca = Ca::load_or_create(&d.path().join("ca"), "test").unwrap();
    let thief = ca
        .issue("thief", &[], datamover_server::ca::Usage::Host)
        .unwrap();
    let vault = d.path().join("vault");
    let svc = start(
        &tgt,
        &[("vault", vault.clone())],
        &[grant(&src, "vm/a", false)],
    );
    let img = d.path().join("a.raw");
    make_disk(&img, 4 * MIB, 5);
    backup(&remote(&svc, "vault", false, &src), &img, "vm/a").unwrap();

    // Same CA, no grant: no manifest, no point.
    let t = remote(&svc, "vault", false, &thief);
    let e = t.latest_meta(&"vm/a".parse().unwrap()).unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");
    let e = backup(&t, &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");
    // Granted vm/a is not granted vm/b, nor a replica update.
    let r = remote(&svc, "vault", false, &src);
    let e = backup(&r, &img, "vm/b").unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");
    let e = backup(&remote(&svc, "vault", true, &src), &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("replica"), "{e}");
    assert_eq!(points(&vault, "vm/a"), 1);

    // A peer that dates its backup in 2099 gets a point dated now.
    let cfg = src.client_config(repo_service::ALPN).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", svc.port)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let hello = repo_service::Hello {
        magic: repo_service::MAGIC.into(),
        version: repo_service::VERSION,
        repository: "vault".into(),
        disk: "vm/a".into(),
        op: repo_service::Op::Backup,
        started: Some("2099-01-01T00:00:00.000Z".into()),
        replica: false,
        task: None,
        start_as: None,
        point: None,
    };
    use repo_service::wire::{Msg, json, read_msg, write_msg};
    use std::io::Write;
    write_msg(&mut s, Msg::Hello, &json(&hello).unwrap()).unwrap();
    s.flush().unwrap();
    let (ty, b) = read_msg(&mut s).unwrap();
    assert_eq!(ty, Msg::Ready);
    let ready: repo_service::Ready = serde_json::from_slice(&b).unwrap();
    let today = chrono::Utc::now().format("%Y%m%d").to_string();
    let point = ready.point.unwrap();
    assert!(point.starts_with(&today), "{point}");
    drop(s);

    // Two grants for one disk (a task ending, the next starting): the
    // session's task picks one, and the receipt names it, signed by the
    // service's host.
    set_grants(
        &svc,
        "vault",
        vec![
            grant(&src, "vm/a", false),
            Grant {
                task: 2,
                ..grant(&src, "vm/a", false)
            },
        ],
    );
    let for_task =
        |task| RemoteStore::new(address(&svc, "vault", false, Some(task)), &src).unwrap();
    let r2 = for_task(2);
    let b = backup(&r2, &img, "vm/a").unwrap();
    let receipt = r2.last.lock().unwrap().take().unwrap().receipt.unwrap();
    assert_eq!((receipt.task, &receipt.point), (2, &b.point));
    assert_eq!(receipt.size, 4 * MIB as u64);
    assert!(datamover_control::pki::verify_signature(
        &tgt.cert_pem,
        &receipt.signed_bytes(),
        &receipt.signature
    ));
    let e = backup(&for_task(3), &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");

    // A session whose grant is withdrawn while it runs is cut off at its
    // next message, not at its commit.
    let disk_a: DiskName = "vm/a".parse().unwrap();
    let sess = r.begin(&disk_a, chrono::Utc::now()).unwrap();
    let kept = set_grants(&svc, "vault", Vec::new());
    let e = match sess.parent() {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a session without a grant got its parent"),
    };
    assert!(e.contains("not granted"), "{e}");
    drop(sess);
    set_grants(&svc, "vault", kept);

    // The grant withdrawn (the host removed, its task ended): refused.
    set_grants(&svc, "vault", Vec::new());
    let e = backup(&r, &img, "vm/a").unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");
    assert_eq!(points(&vault, "vm/a"), 2);
}

/// Finding 4: connections that never finish TLS hold no session slot and
/// are dropped at the handshake deadline; one address cannot take more
/// than its share.
#[test]
fn connections_without_a_certificate_cannot_hold_the_service() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let vault = d.path().join("vault");
    let limits = Limits {
        sessions: 2,
        handshakes: 8,
        per_address: 6,
        handshake: std::time::Duration::from_secs(1),
        ..test_limits()
    };
    let svc = start_with(
        &tgt,
        &[("vault", vault.clone())],
        &[grant(&src, "vm/a", false)],
        limits,
    );
    let img = d.path().join("a.raw");
    make_disk(&img, 4 * MIB, 6);
    // Four idle connections (more than the two sessions): a backup still
    // gets through, because they hold handshake slots, not sessions.
    let idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", svc.port)).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    backup(&remote(&svc, "vault", false, &src), &img, "vm/a").unwrap();
    // Two more fill the address's share: the next connection is closed
    // at once.
    let more: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", svc.port)).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(backup(&remote(&svc, "vault", false, &src), &img, "vm/a").is_err());
    // At the handshake deadline the service drops them all.
    let t = std::time::Instant::now();
    for mut c in idle.into_iter().chain(more) {
        use std::io::Read;
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    }
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    backup(&remote(&svc, "vault", false, &src), &img, "vm/a").unwrap();
    assert_eq!(points(&vault, "vm/a"), 2);
}

/// A migration's last step: the service starts the VM on its replicas
/// only for a migration task's grant, and only on a hypervisor host;
/// anything else is refused with the reason and starts nothing.
#[test]
fn only_a_migration_grant_starts_a_vm_and_only_on_a_hypervisor() {
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let root = d.path().join("dr");
    let svc = start(&tgt, &[("dr", root.clone())], &[grant(&src, "vm/os", true)]);
    let img = d.path().join("vm.raw");
    make_disk(&img, 4 * MIB, 3);
    let r = remote(&svc, "dr", true, &src);
    backup(&r, &img, "vm/os").unwrap();
    // A replication task's grant.
    let e = r.start_vm(&"vm/os".parse().unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("only a migration task"), "{e}");
    // A migration task's grant, on a host that is no hypervisor.
    set_grants(
        &svc,
        "dr",
        vec![Grant {
            start: true,
            ..grant(&src, "vm/os", true)
        }],
    );
    let e = r.start_vm(&"vm/os".parse().unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("no hypervisor"), "{e}");
    // A name that is no domain name.
    svc.served
        .write()
        .unwrap()
        .get_mut("dr")
        .unwrap()
        .hypervisor = Some("test:///default".into());
    let e = r
        .start_vm(&"vm/os".parse().unwrap(), Some("a/b"))
        .unwrap_err();
    assert!(e.to_string().contains("a/b"), "{e}");
    // A disk without a grant.
    let e = r.start_vm(&"vm/other".parse().unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("not granted"), "{e}");
}

/// A read grant for `id` (an instant recovery on another proxy).
fn read_grant(id: &Identity, disk: &str, point: Option<&str>) -> Grant {
    Grant {
        task: 7,
        read: true,
        point: point.map(str::to_string),
        ..grant(id, disk, false)
    }
}

#[test]
fn a_point_is_exported_through_the_service_under_a_read_grant_only() {
    use datamover::reader::PointSource;
    use std::os::unix::fs::FileExt;
    if !datamover_testkit::can_run(
        "a_point_is_exported_through_the_service_under_a_read_grant_only",
        &["qemu-img", "nbdcopy"],
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (tgt, src) = identities(d.path());
    let vault = d.path().join("vault");
    let img = d.path().join("a.raw");
    datamover_testkit::make_image(
        &img,
        64 * MIB as u64,
        &[
            (0, 8 * MIB as u64, datamover_testkit::Fill::Random(5)),
            (
                32 * MIB as u64,
                4 * MIB as u64,
                datamover_testkit::Fill::Text,
            ),
        ],
    );
    let repo = Repository::init(&vault).unwrap();
    let disk: DiskName = "vm/a".parse().unwrap();
    let back_up = || {
        let src = datamover::open_source(&img).unwrap();
        datamover::backup(&repo, src.as_ref(), &disk, &BackupOptions::default())
            .unwrap()
            .point
    };
    let first = back_up();
    change(&img, 2 * MIB, 9);
    let second = back_up();
    // A writer's grant reads nothing.
    let svc = start(
        &tgt,
        &[("vault", vault.clone())],
        &[grant(&src, "vm/a", false)],
    );
    let points =
        repo_service::RemotePoints::new(address(&svc, "vault", false, None), &src).unwrap();
    let e = points.resolve(&disk, None).unwrap_err().to_string();
    assert!(e.contains("not granted"), "{e}");
    // A read grant for the first point reads that one only.
    set_grants(
        &svc,
        "vault",
        vec![read_grant(&src, "vm/a", Some(first.as_str()))],
    );
    let e = points.resolve(&disk, None).unwrap_err().to_string();
    assert!(
        e.contains("not granted") && e.contains(first.as_str()),
        "{e}"
    );
    assert_eq!(points.resolve(&disk, Some(first.as_str())).unwrap(), first);
    // ... and writes nothing.
    let e = backup(&remote(&svc, "vault", false, &src), &img, "vm/a")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not granted"), "{e}");
    // A read grant for the disk: the newest point, a few reads fetch
    // about the chunks they touch.
    set_grants(&svc, "vault", vec![read_grant(&src, "vm/a", None)]);
    assert_eq!(points.resolve(&disk, None).unwrap(), second);
    assert_eq!(
        points.meta(&disk, &second).unwrap().disk_size,
        64 * MIB as u64
    );
    let before = points.wire_bytes();
    {
        let r = points.open_point(&disk, &second, 16 << 20).unwrap();
        let mut buf = vec![0u8; 4096];
        r.read_at(33 * MIB as u64, &mut buf).unwrap();
        let mut want = vec![0u8; 4096];
        std::fs::File::open(&img)
            .unwrap()
            .read_exact_at(&mut want, 33 * MIB as u64)
            .unwrap();
        assert_eq!(buf, want);
        // Holes cost nothing.
        r.read_at(50 * MIB as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        assert_eq!(r.stats().chunks_loaded, 1);
    }
    let spent = points.wire_bytes() - before;
    assert!(
        spent < 4 * MIB as u64,
        "{spent} bytes on the wire for one chunk of text"
    );
    // Exported: reference clients read the point byte for byte.
    let stop = AtomicBool::new(false);
    let sock = d.path().join("x.sock");
    let point: datamover::PointRef = "vm/a".parse().unwrap();
    let how = transports::export::Export {
        listen: format!("unix:{}", sock.display()),
        ..Default::default()
    };
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = s.spawn(|| {
            transports::export::export(&points, &point, &how, &stop, move |u| {
                tx.send(u.to_string()).unwrap()
            })
        });
        let uri = rx.recv().expect("the export did not start");
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", img.to_str().unwrap()])
            .arg(format!("nbd+unix:///vm/a?socket={}", sock.display()))
            .output()
            .unwrap();
        let _ = uri;
        assert!(out.status.success(), "{out:?}");
        // A damaged chunk fails its reads only.
        let r = Repository::open(&vault).unwrap();
        let m = r.read_point(&disk, &second).unwrap();
        let datamover::format::manifest::Extent::Chunk { id, .. } = m.extents[0] else {
            panic!("the first extent holds data")
        };
        let loc = r.load_index().unwrap().get(&id).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.pack_path(&loc.pack))
            .unwrap();
        let at = loc.offset + u64::from(loc.frame_len) / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
        drop(f);
        let again = points.open_point(&disk, &second, 16 << 20).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = again.read_at(0, &mut buf).unwrap_err();
        assert_eq!(e.kind(), datamover::ErrorKind::Corrupt, "{e}");
        again.read_at(33 * MIB as u64, &mut buf).unwrap();
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap().unwrap();
    });
}
