//! `dm host`: managed hosts and their roles.

use super::*;

#[derive(Subcommand)]
pub enum HostCmd {
    /// Add a managed host; prints its one-time enrollment token for
    /// `dm-installer` (or `dm-proxy run` by hand).
    Add {
        /// Host name.
        name: String,
        /// An address the host is reached at (put in its certificate); repeat.
        #[arg(long)]
        address: Vec<String>,
        /// A role: `proxy` (its installer deploys and runs dm-proxy); repeat.
        #[arg(long)]
        role: Vec<HostRole>,
        /// A directory its proxy may read disks from and restore into
        /// (SAN mode); repeat. Without one the proxy gets no path tasks.
        #[arg(long)]
        datastore: Vec<String>,
        /// Make it a hypervisor: the libvirt connection its proxy lists and
        /// backs up VMs through (qemu:///system: the host's own libvirtd).
        #[arg(long, value_name = "URI")]
        hypervisor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a host's roles (its installer follows within a poll) or
    /// its proxy's datastores.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["roles", "datastores", "hypervisor"])))]
    Set {
        /// Host name.
        name: String,
        /// Its roles from now on, comma-separated (`proxy`); `--roles ''` takes all away.
        #[arg(long, value_delimiter = ',')]
        roles: Option<Vec<String>>,
        /// Its proxy's datastores from now on, comma-separated;
        /// `--datastores ''` takes all away.
        #[arg(long, value_delimiter = ',')]
        datastores: Option<Vec<String>>,
        /// Its libvirt connection from now on; `--hypervisor ''`: no longer one.
        #[arg(long, value_name = "URI")]
        hypervisor: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List hosts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a host: its certificate stops working, its tasks are re-queued.
    Remove {
        /// Host name.
        name: String,
    },
}

fn roles_text(h: &Host) -> String {
    if h.roles.is_empty() {
        "-".into()
    } else {
        h.roles
            .iter()
            .map(HostRole::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub fn host(s: &ServerArgs, c: HostCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        HostCmd::Add {
            name,
            address,
            role,
            datastore,
            hypervisor,
            json,
        } => {
            let r: HostAdded = cl.add_host(&NewHost {
                name,
                addresses: address,
                roles: role,
                datastores: datastore,
                hypervisor,
            })?;
            if json {
                return print_json(&r);
            }
            println!("added host {}", r.host.name);
            println!("enrollment token (one use, expires {}):", r.expires);
            println!("{}", r.enrollment_token);
            println!(
                "on the host: dm-installer run --server {} --token <token>",
                cl.base()
            );
        }
        HostCmd::Set {
            name,
            roles,
            datastores,
            hypervisor,
            json,
        } => {
            let roles = roles
                .map(|rs| {
                    rs.iter()
                        .filter(|r| !r.is_empty())
                        .map(|r| r.parse::<HostRole>().map_err(|e| Failure(2, e)))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let datastores =
                datastores.map(|ds| ds.into_iter().filter(|d| !d.is_empty()).collect());
            let h: Host = cl.patch_host(
                &name,
                &HostPatch {
                    roles,
                    datastores,
                    hypervisor,
                },
            )?;
            if json {
                return print_json(&h);
            }
            println!(
                "host {}: roles {}, datastores {}",
                h.name,
                roles_text(&h),
                if h.datastores.is_empty() {
                    "-".into()
                } else {
                    h.datastores.join(",")
                }
            );
        }
        HostCmd::List { json } => {
            let hs: Vec<Host> = cl.hosts()?;
            if json {
                return print_json(&hs);
            }
            println!(
                "{:<20} {:<9} {:<8} {:<30} ADDRESSES",
                "HOST", "ENROLLED", "ROLES", "INSTALLED"
            );
            for h in hs {
                let installed = match &h.installer {
                    None => "-".to_string(),
                    Some(i) if i.report.components.is_empty() => "nothing".into(),
                    Some(i) => i
                        .report
                        .components
                        .iter()
                        .map(|c| {
                            let run = match (c.pid, &c.error) {
                                (Some(p), _) => format!("pid {p}"),
                                (None, Some(_)) => "failed".into(),
                                (None, None) => "stopped".into(),
                            };
                            format!("{} {} ({run})", c.name, &c.sha256[..c.sha256.len().min(12)])
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                println!(
                    "{:<20} {:<9} {:<8} {:<30} {}",
                    h.name,
                    if h.enrolled { "yes" } else { "no" },
                    roles_text(&h),
                    installed,
                    h.addresses.join(",")
                );
                if !h.datastores.is_empty() {
                    println!("  datastores: {}", h.datastores.join(", "));
                }
                if let Some(t) = &h.cert_expires {
                    println!("  certificate until: {t} (renewed by the host)");
                }
                if let Some(e) = h
                    .installer
                    .as_ref()
                    .and_then(|i| i.report.components.iter().find_map(|c| c.error.as_ref()))
                {
                    println!("  last problem: {e}");
                }
            }
        }
        HostCmd::Remove { name } => {
            cl.remove_host(&name)?;
            println!("removed host {name}");
        }
    }
    Ok(0)
}
