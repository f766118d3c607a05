//! Network namespaces: hosts of a test cluster, each in its own
//! namespace on one bridge, deleted on drop.

use std::process::Command;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (apt install iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One network namespace per host, `hosts[0]` (the server's) holding a
/// bridge the others join with a veth each, plus a veth from the test's
/// own namespace (the admin's workstation). Host `i` has address
/// `addr(i + 1)`, the test `addr(hosts.len() + 1)`. Deleted on drop, also
/// when the test fails.
#[derive(Debug)]
pub struct Net {
    pub ns: Vec<String>,
    root_if: String,
    subnet: String,
}

impl Net {
    pub fn new(tag: &str, hosts: &[&str]) -> Net {
        let id = std::process::id() % 10_000;
        let subnet = format!(
            "10.231.{}",
            (id * 7 + u32::from(tag.bytes().next().unwrap_or(0))) % 250
        );
        let ns: Vec<String> = hosts.iter().map(|h| format!("dmt{id}{tag}{h}")).collect();
        let net = Net {
            ns: ns.clone(),
            root_if: format!("dmt{id}{tag}r"),
            subnet: subnet.clone(),
        };
        for n in &ns {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let s = &ns[0];
        ip(&["-n", s, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", s, "link", "set", "br0", "up"]);
        // Each host's veth: one end in the host's namespace, the other on
        // the bridge; the test's own end stays here.
        let ends: Vec<(Option<&String>, String)> = ns[1..]
            .iter()
            .enumerate()
            .map(|(i, n)| (Some(n), i.to_string()))
            .chain([(None, "r".to_string())])
            .collect();
        for (i, (host, end)) in ends.into_iter().enumerate() {
            let inner = format!("dmt{id}{tag}{end}");
            let outer = format!("{inner}p");
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ]);
            ip(&["link", "set", &outer, "netns", s]);
            ip(&["-n", s, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", s, "link", "set", &outer, "up"]);
            let addr = format!("{subnet}.{}/24", i + 2);
            match host {
                Some(h) => {
                    ip(&["link", "set", &inner, "netns", h]);
                    ip(&["-n", h, "addr", "add", &addr, "dev", &inner]);
                    ip(&["-n", h, "link", "set", &inner, "up"]);
                }
                None => {
                    ip(&["addr", "add", &addr, "dev", &inner]);
                    ip(&["link", "set", &inner, "up"]);
                }
            }
        }
        net
    }

    /// The address of the `i`-th host, 1-based.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{i}", self.subnet)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Root and iproute2, else skip (outside CI) or fail (in CI).
pub fn can_make_namespaces() -> bool {
    crate::can_run("network namespaces", &["ip"])
}
