//! A job backs up a real guest's disk: the server's task shows the point's
//! consistency (application, with the frozen time), and `dm session show`
//! prints it.

use crate::common::{Cluster, dm, dm_ok, serial};
use datamover_control::api::{Session, State};
use datamover_testkit::guest::GUEST_TOOLS;
use datamover_testkit::{Guest, GuestImage, can_run};

#[test]
fn a_job_backs_up_a_running_guest_quiesced_and_the_session_shows_it() {
    let _s = serial();
    if !can_run(
        "a_job_backs_up_a_running_guest_quiesced_and_the_session_shows_it",
        GUEST_TOOLS,
    ) {
        return;
    }
    let c = Cluster::start(&[]);
    // The guest's disk lies in the built-in proxy's datastore: direct
    // storage access reads the qcow2 there.
    let img = c.ds("vm1.qcow2");
    GuestImage::get().copy_disk(&img);
    let g = Guest::boot(&c.path(""), "vm1", &img, "qcow2");
    c.dm_repo_add("main", &c.path("repo"));
    c.create_job(serde_json::json!({
        "name": "vm1", "kind": "backup", "repository": "main", "quiesce": "required",
        "disks": [{"name": "vm1/root", "source": g.spec(), "disk": "vblk0"}],
    }));
    let s: Session = c.run_job("vm1");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    let t = &s.tasks[0];
    assert_eq!(t.mode.as_deref(), Some("san"), "{t:#?}");
    let cons = t.consistency.clone().expect("consistency");
    assert_eq!(
        cons.level,
        datamover::ConsistencyLevel::Application,
        "{cons:?}"
    );
    assert!(cons.frozen_ms.is_some_and(|ms| ms < 10_000), "{cons:?}");
    assert_eq!(
        g.agent("guest-fsfreeze-status", serde_json::json!({})),
        "thawed"
    );
    let out = dm(&c)
        .args(["session", "show", &s.id.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("application-consistent"), "{text}");

    // A job with an unknown quiesce mode is refused.
    let e = c
        .api()
        .post::<_, serde_json::Value>(
            "/api/v1/jobs",
            &serde_json::json!({
                "name": "bad", "kind": "backup", "repository": "main", "quiesce": "sometimes",
                "disks": [{"name": "vm1/root", "source": g.spec(), "disk": "vblk0"}],
            }),
        )
        .unwrap_err();
    assert!(e.to_string().contains("unknown quiesce"), "{e}");
}

#[test]
fn a_job_backs_up_a_libvirt_domain_and_dm_lists_its_vms() {
    let _s = serial();
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh"]);
    if !can_run(
        "a_job_backs_up_a_libvirt_domain_and_dm_lists_its_vms",
        &tools,
    ) {
        return;
    }
    // The built-in proxy's host is a hypervisor: its VMs enter the inventory.
    let c = Cluster::start(&["--hypervisor", "qemu:///system"]);
    // libvirt's QEMU user reads the image and writes its console log here.
    let dir = c.path("lv");
    std::fs::create_dir_all(&dir).unwrap();
    for d in [c.path(""), dir.clone()] {
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let _libvirtd = datamover_testkit::guest::Libvirtd::ensure(&dir);
    let img = dir.join("lv.qcow2");
    GuestImage::get().copy_disk(&img);
    let dom = format!("dm-srv-{}", std::process::id());
    let g = Guest::libvirt(&dir, &dom, &img, "qcow2", &[]);

    let out = dm(&c).args(["vms", "--json"]).output().unwrap();
    let vms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let me = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == dom.as_str())
        .unwrap_or_else(|| panic!("{dom} not in {vms}"));
    assert_eq!(me["state"], "running");
    assert_eq!(me["disks"][0]["target"], "vda");
    let out = dm(&c).args(["vm-disks", &g.spec()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("vda\tqcow2\t"), "{text}");

    c.dm_repo_add("main", &c.path("repo"));
    c.create_job(serde_json::json!({
        "name": "lv", "kind": "backup", "repository": "main",
        "disks": [{"name": "lv/vda", "source": g.spec(), "disk": "vda"}],
    }));
    let s: Session = c.run_job("lv");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    let t = &s.tasks[0];
    assert_eq!(t.mode.as_deref(), Some("nbd"), "{t:#?}");
    assert_eq!(
        t.consistency.as_ref().map(|c| c.level),
        Some(datamover::ConsistencyLevel::Application),
        "{t:#?}"
    );
    // The point keeps the domain's definition.
    let out = dm(&c)
        .args(["points", "--json", "--repo"])
        .arg(c.path("repo"))
        .output()
        .unwrap();
    let points: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let def = points[0]["meta"]["vm_definition"]
        .as_str()
        .unwrap_or_default();
    assert!(def.contains(&format!("<name>{dom}</name>")), "{points}");

    // `dm backup --all-disks`: the whole VM at one instant, a point per disk.
    let repo2 = c.path("repo2");
    assert!(dm(&c).arg("init").arg(&repo2).status().unwrap().success());
    let repo2s = repo2.display().to_string();
    let out = dm_ok(
        &c,
        [
            "backup",
            &g.spec(),
            "--name",
            "whole",
            "--all-disks",
            "--json",
            "--repo",
            &repo2s,
        ],
    );
    let runs: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    assert_eq!(runs[0]["disk"], "whole/vda");
    assert_eq!(runs[0]["consistency"]["level"], "application", "{runs}");
    // `dm vm-restore`: the VM defined again from its point (not started here).
    let again = format!("{dom}-again");
    let dirs = dir.display().to_string();
    dm_ok(
        &c,
        [
            "vm-restore",
            "whole",
            "--name",
            &again,
            "--no-start",
            "--repo",
            &repo2s,
            "--to",
            &dirs,
        ],
    );
    let info = datamover_testkit::guest::virsh(&["domblklist", &again]).unwrap();
    let _ = datamover_testkit::guest::virsh(&["undefine", &again]);
    assert!(info.contains(&format!("{again}-vda.raw")), "{info}");

    // The inventory: the domain as the hypervisor's proxy reports it, and a
    // job naming the whole VM gets a task per disk.
    let t = std::time::Instant::now();
    let inventory = loop {
        let out = dm(&c).args(["vm", "list", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v.as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == dom.as_str()))
        {
            break v;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "{dom} not in the inventory: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let me = inventory
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == dom.as_str())
        .unwrap();
    assert_eq!(
        (me["state"].as_str(), me["disks"][0]["target"].as_str()),
        (Some("running"), Some("vda"))
    );
    c.create_job(serde_json::json!({
        "name": "whole", "kind": "backup", "repository": "main", "vms": [{"name": dom}],
    }));
    let s: Session = c.run_job("whole");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    let names: Vec<String> = s.tasks.iter().map(|t| t.disk.to_string()).collect();
    assert_eq!(names, [format!("{dom}/vda")]);
}

/// A libvirt VM replicated by a job to a repository another proxy holds;
/// the VM fails over to its replicas there (`dm job failover`, run by that
/// proxy through its host's hypervisor), the guest writes, and the VM
/// fails back to the original (`dm job failback`): the original boots
/// with the guest's writes.
#[test]
fn a_replicated_libvirt_vm_fails_over_and_back_through_the_server() {
    let _s = serial();
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh", "qemu-nbd"]);
    if !can_run(
        "a_replicated_libvirt_vm_fails_over_and_back_through_the_server",
        &tools,
    ) {
        return;
    }
    let mut c = Cluster::start(&["--no-builtin-proxy", "--heartbeat-ms", "200"]);
    let dir = c.path("lv");
    let drdir = c.path("drsite");
    for d in [c.path(""), dir.clone(), drdir.clone()] {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let _libvirtd = datamover_testkit::guest::Libvirtd::ensure(&dir);
    c.add_proxy("src", &[&dir], 1);
    c.add_proxy("dr", &[&drdir], 1);
    // Both hosts are hypervisors (here the same libvirtd).
    for h in ["src", "dr"] {
        dm_ok(&c, ["host", "set", h, "--hypervisor", "qemu:///system"]);
    }
    let img = dir.join("app.qcow2");
    GuestImage::get().copy_disk(&img);
    let dom = format!("dm-dr-{}", std::process::id());
    let data = dir.join("data.qcow2");
    datamover_testkit::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", data.to_str().unwrap(), "32M"],
    );
    let g = Guest::libvirt(&dir, &dom, &img, "qcow2", &[&data]);
    let before = g.sh(
        "dd if=/dev/urandom of=/root/before bs=1M count=2 status=none && sync && sha256sum /root/before | cut -d' ' -f1",
    );
    let repo = drdir.join("repo");
    dm_ok(
        &c,
        [
            "repo",
            "add",
            "drrepo",
            &repo.display().to_string(),
            "--proxy",
            "dr",
        ],
    );
    let t = std::time::Instant::now();
    let on_src = |c: &Cluster| {
        let v: serde_json::Value =
            serde_json::from_slice(&dm_ok(c, ["vm", "list", "--json"])).unwrap_or_default();
        v.as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["name"] == dom.as_str() && x["host"] == "src")
        })
    };
    while !on_src(&c) {
        assert!(t.elapsed().as_secs() < 60, "{dom} not in src's inventory");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    c.create_job(serde_json::json!({
        "name": "rep", "kind": "replication", "repository": "drrepo",
        "vms": [{"name": dom, "host": "src"}], "proxies": ["src"], "retries": 0,
    }));
    let s: Session = c.run_job("rep");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    let replica = repo.join("replicas").join(&dom).join("vda.img");
    assert_eq!(
        s.tasks[0].replica.as_deref(),
        Some(replica.to_str().unwrap())
    );
    // Both disks of the VM in one backup: one freeze, one checkpoint.
    assert_eq!(s.tasks.len(), 2, "{s:#?}");
    assert_eq!(s.tasks[0].consistency, s.tasks[1].consistency, "{s:#?}");
    let r = datamover::Repository::open(&repo).unwrap();
    let cps: Vec<Option<String>> = s
        .tasks
        .iter()
        .map(|t| {
            r.point_meta(&t.disk, t.point.as_ref().unwrap())
                .unwrap()
                .meta
                .checkpoint
        })
        .collect();
    assert_eq!(cps[0], cps[1]);
    assert!(
        cps[0]
            .as_deref()
            .unwrap_or("")
            .starts_with("dm-cp-vda_vdb-"),
        "{cps:?}"
    );

    // The disaster: the original is gone. Failover on the DR proxy's host.
    datamover_testkit::guest::virsh(&["destroy", &dom]).unwrap();
    let out = dm(&c)
        .args(["job", "failover", "rep", &dom, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    let op: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(op["proxy"], "dr");
    let replica_dom = format!("{dom}-replica");
    assert_eq!(op["result"]["domain"], replica_dom.as_str(), "{op}");
    let r = Guest::libvirt_running(&dir, &replica_dom);
    assert_eq!(r.sh("sha256sum /root/before | cut -d' ' -f1"), before);
    let after = r.sh(
        "dd if=/dev/urandom of=/root/after bs=1M count=3 status=none && sync && sha256sum /root/after | cut -d' ' -f1",
    );
    // Replication does not write under the failed-over VM.
    assert_eq!(
        datamover::replica::read_state(&replica).unwrap().state,
        "failover"
    );

    // Failback onto the original (shut off), which starts with the writes.
    let out = dm(&c)
        .args([
            "job",
            "failback",
            "rep",
            &dom,
            "--to",
            &format!("libvirt:///{dom}?uri=qemu:///system"),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    let op: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(op["state"], "done", "{op}");
    let written = op["result"]["disks"][0]["bytes_written"].as_u64().unwrap();
    let size = op["result"]["disks"][0]["disk_size"].as_u64().unwrap();
    assert!(written >= 3 << 20 && written < size / 8, "{op}");
    drop(r);
    assert!(datamover_testkit::guest::virsh(&["domstate", &replica_dom]).is_err());
    let o = Guest::libvirt_running(&dir, &dom);
    assert_eq!(o.sh("sha256sum /root/after | cut -d' ' -f1"), after);
    assert_eq!(o.sh("sha256sum /root/before | cut -d' ' -f1"), before);
    let listed = String::from_utf8_lossy(&dm_ok(&c, ["job", "operations"])).to_string();
    assert!(
        listed.contains("failover") && listed.contains("failback"),
        "{listed}"
    );
    // Replication goes on from the failback's point.
    let s: Session = c.run_job("rep");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());

    // Quick migration to the DR host: a first pass, the guest frozen and
    // paused, the final sync, the VM started there by the DR proxy's
    // repository service, the source powered off.
    let mig = drdir.join("mig");
    dm_ok(
        &c,
        [
            "repo",
            "add",
            "migrepo",
            &mig.display().to_string(),
            "--proxy",
            "dr",
        ],
    );
    let moved = format!("{dom}-moved");
    c.create_job(serde_json::json!({
        "name": "mig", "kind": "migration", "repository": "migrepo", "retries": 0,
        "vms": [{"name": dom, "host": "src", "start_as": moved}], "proxies": ["src"],
    }));
    let s: Session = c.run_job("mig");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    assert_eq!(
        datamover_testkit::guest::virsh(&["domstate", &dom]).unwrap(),
        "shut off"
    );
    let m = Guest::libvirt_running(&dir, &moved);
    assert_eq!(m.sh("sha256sum /root/after | cut -d' ' -f1"), after);
    let img = mig.join("replicas").join(&dom).join("vda.img");
    assert_eq!(
        datamover::replica::read_state(&img).unwrap().state,
        "failover"
    );
    drop(m);
    drop(o);
    drop(g);
}

/// A VM backed up by a job is recovered instantly by the proxy holding
/// the repository (`dm recovery start`), the guest sees its data and
/// writes, is moved to production storage while it runs (`dm recovery
/// migrate`, progress in the recovery), and a second recovery is
/// discarded; operators may look but not start one.
#[test]
fn a_vm_is_recovered_instantly_through_the_server_migrated_and_discarded() {
    let _s = serial();
    let mut tools = GUEST_TOOLS.to_vec();
    tools.extend(["libvirtd", "virtlogd", "virsh", "debugfs"]);
    if !can_run(
        "a_vm_is_recovered_instantly_through_the_server_migrated_and_discarded",
        &tools,
    ) {
        return;
    }
    let mut c = Cluster::start(&["--no-builtin-proxy", "--heartbeat-ms", "200"]);
    let dir = c.path("lv");
    for d in [c.path(""), dir.clone()] {
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let _libvirtd = datamover_testkit::guest::Libvirtd::ensure(&dir);
    c.add_proxy("kvm", &[&dir], 1);
    dm_ok(&c, ["host", "set", "kvm", "--hypervisor", "qemu:///system"]);
    let img = dir.join("app.qcow2");
    GuestImage::get().copy_disk(&img);
    let dom = format!("dm-ir-srv-{}", std::process::id());
    let g = Guest::libvirt(&dir, &dom, &img, "qcow2", &[]);
    let before = g.sh(
        "dd if=/dev/urandom of=/root/before bs=1M count=2 status=none && sync && sha256sum /root/before | cut -d' ' -f1",
    );
    let repo = dir.join("repo");
    dm_ok(
        &c,
        [
            "repo",
            "add",
            "main",
            &repo.display().to_string(),
            "--proxy",
            "kvm",
        ],
    );
    c.create_job(serde_json::json!({
        "name": "b", "kind": "backup", "repository": "main",
        "disks": [{"name": format!("{dom}/vda"), "source": g.spec(), "disk": "vda"}],
    }));
    let s: Session = c.run_job("b");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());
    drop(g);

    let json = |out: Vec<u8>| -> serde_json::Value { serde_json::from_slice(&out).unwrap() };
    let r = json(dm_ok(&c, ["recovery", "start", "main", &dom, "--json"]));
    assert_eq!(r["state"], "serving", "{r}\n{}", c.logs());
    assert_eq!(r["proxy"], "kvm");
    let name = format!("{dom}-instant");
    assert_eq!(r["session"]["name"], name.as_str(), "{r}");
    let id = r["id"].as_u64().unwrap().to_string();
    let v = Guest::libvirt_running(&dir, &name);
    assert_eq!(v.sh("sha256sum /root/before | cut -d' ' -f1"), before);
    let after = v.sh(
        "dd if=/dev/urandom of=/root/after bs=1M count=3 status=none && sync && sha256sum /root/after | cut -d' ' -f1",
    );
    // A second recovery of the same domain is refused while it serves.
    let out = dm(&c)
        .args(["recovery", "start", "main", &dom])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Migration only into the proxy's datastores.
    let out = dm(&c)
        .args(["recovery", "migrate", &id, "--to", "/etc/dm-x", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = json(out.stdout);
    assert_eq!(r["state"], "serving", "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("datastore"),
        "{r}"
    );
    let prod = dir.join("prod");
    let out = dm(&c)
        .args([
            "recovery",
            "migrate",
            &id,
            "--to",
            prod.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    let r = json(out.stdout);
    assert_eq!(r["state"], "migrated", "{r}");
    assert_eq!(r["percent"], 100, "{r}");
    assert!(r["session"]["downtime_ms"].as_u64().is_some(), "{r}");
    let image = prod.join(format!("{name}-vda.raw"));
    assert_eq!(
        r["session"]["disks"][0]["migrated_to"],
        image.to_str().unwrap(),
        "{r}"
    );
    assert_eq!(v.sh("sha256sum /root/after | cut -d' ' -f1"), after);
    drop(v);
    let sum = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "debugfs -R 'cat /root/after' {} 2>/dev/null | sha256sum | cut -d' ' -f1",
            image.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sum.stdout).trim(), after);

    // A recovery discarded: its VM gone, nothing left on the proxy.
    let other = format!("{dom}-d");
    let r = json(dm_ok(
        &c,
        [
            "recovery",
            "start",
            "main",
            &dom,
            "--on",
            &format!("libvirt:///{other}?uri=qemu:///system"),
            "--json",
        ],
    ));
    assert_eq!(r["state"], "serving", "{r}\n{}", c.logs());
    let id2 = r["id"].as_u64().unwrap().to_string();
    let r = json(dm_ok(&c, ["recovery", "discard", &id2, "--json"]));
    assert_eq!(r["state"], "discarded", "{r}");
    assert!(datamover_testkit::guest::virsh(&["domstate", &other]).is_err());
    let left: Vec<_> = std::fs::read_dir(c.path("instant-kvm")).unwrap().collect();
    assert!(
        left.is_empty(),
        "{left:?}: {:?}\n{}",
        std::fs::read_dir(c.path(&format!("instant-kvm/{other}")))
            .map(|d| d.map(|e| e.map(|e| e.file_name())).collect::<Vec<_>>()),
        c.logs()
    );
    let listed = String::from_utf8_lossy(&dm_ok(&c, ["recovery", "list"])).to_string();
    assert!(
        listed.contains("migrated") && listed.contains("discarded"),
        "{listed}"
    );
    let out = dm(&c).args(["recovery", "discard", &id2]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an ended recovery: {out:?}");
    let _ = datamover_testkit::guest::virsh(&["destroy", &name]);
    let _ = datamover_testkit::guest::virsh(&["undefine", &name]);

    // Another proxy as the mount server: it reads the point from kvm's
    // repository service, under a read grant for the recovery's disk.
    c.add_proxy("kvm2", &[&dir], 1);
    dm_ok(
        &c,
        ["host", "set", "kvm2", "--hypervisor", "qemu:///system"],
    );
    let out = dm(&c)
        .args(["recovery", "start", "main", &dom, "--proxy", "kvm2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "disks not named: {out:?}");
    let far = format!("{dom}-r");
    let r = json(dm_ok(
        &c,
        [
            "recovery",
            "start",
            "main",
            &dom,
            "--proxy",
            "kvm2",
            "--point",
            &format!("{dom}/vda"),
            "--on",
            &format!("libvirt:///{far}?uri=qemu:///system"),
            "--json",
        ],
    ));
    assert_eq!(r["state"], "serving", "{r}\n{}", c.logs());
    assert_eq!(r["proxy"], "kvm2");
    assert!(
        r["session"]["repo"]
            .as_str()
            .unwrap()
            .starts_with("dmrs://"),
        "{r}"
    );
    let id3 = r["id"].as_u64().unwrap().to_string();
    let v = Guest::libvirt_running(&dir, &far);
    assert_eq!(v.sh("sha256sum /root/before | cut -d' ' -f1"), before);
    let r = json(dm_ok(&c, ["recovery", "discard", &id3, "--json"]));
    assert_eq!(r["state"], "discarded", "{r}");
    drop(v);
    assert!(datamover_testkit::guest::virsh(&["domstate", &far]).is_err());
    let left: Vec<_> = std::fs::read_dir(c.path("instant-kvm2")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let v = datamover::verify(&datamover::Repository::open(&repo).unwrap(), true).unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
}

/// A point's files through the server: listed and downloaded as a tar
/// archive (`dm files … --server-repo`), read by the proxy holding the
/// repository in its libguestfs appliance; an operator may not.
#[test]
fn a_points_files_are_listed_and_downloaded_through_the_server() {
    let _s = serial();
    if !can_run(
        "a_points_files_are_listed_and_downloaded_through_the_server",
        &["guestfish", "mkfs.ext4", "tar"],
    ) {
        return;
    }
    let mut c = Cluster::start(&["--no-builtin-proxy", "--heartbeat-ms", "200"]);
    let ds = c.path("ds");
    std::fs::create_dir_all(&ds).unwrap();
    c.add_proxy("p1", &[&ds], 1);
    let tree = c.path("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/motd"), b"served by the proxy\n").unwrap();
    let img = ds.join("root.raw");
    datamover_testkit::run(
        "mkfs.ext4",
        &[
            "-q",
            "-d",
            tree.to_str().unwrap(),
            img.to_str().unwrap(),
            "16M",
        ],
    );
    dm_ok(
        &c,
        [
            "repo",
            "add",
            "main",
            &ds.join("repo").display().to_string(),
            "--proxy",
            "p1",
        ],
    );
    c.create_job(serde_json::json!({
        "name": "b", "kind": "backup", "repository": "main",
        "disks": [{"name": "vm/root", "source": img.display().to_string()}],
    }));
    let s: Session = c.run_job("b");
    assert_eq!(s.state, State::Success, "{s:#?}\n{}", c.logs());

    let out = dm(&c)
        .args([
            "files",
            "vm/root",
            "ls",
            "/etc",
            "--server-repo",
            "main",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "motd", "{v}");
    assert_eq!(v[0]["size"], 20, "{v}");
    let tar = c.path("etc.tar");
    dm_ok(
        &c,
        [
            "files",
            "vm/root",
            "get",
            "/etc",
            "--tar",
            tar.to_str().unwrap(),
            "--server-repo",
            "main",
        ],
    );
    let x = c.path("x");
    std::fs::create_dir_all(&x).unwrap();
    datamover_testkit::run(
        "tar",
        &["-xf", tar.to_str().unwrap(), "-C", x.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read(x.join("etc/motd")).unwrap(),
        b"served by the proxy\n"
    );
    // A missing path: the proxy's clear error, through the server.
    let out = dm(&c)
        .args(["files", "vm/root", "ls", "/nope", "--server-repo", "main"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no such file"),
        "{err}"
    );
    // A point's files are its data: not for an operator's token.
    let op = json_of(dm_ok(
        &c,
        ["token", "create", "op1", "--role", "operator", "--json"],
    ));
    let out = dm(&c)
        .env("DM_TOKEN", op["secret"].as_str().unwrap())
        .args(["files", "vm/root", "ls", "/", "--server-repo", "main"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("may not"), "{err}");
}

fn json_of(b: Vec<u8>) -> serde_json::Value {
    serde_json::from_slice(&b).unwrap()
}
