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
