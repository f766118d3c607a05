//! `dm job`: create, list, run (and wait for) and delete jobs.

use super::sessions::{finish, watch};
use super::*;

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum JobCmd {
    /// Create a job: backup (default), copy, replication, migration or restore.
    Create {
        /// Job name.
        name: String,
        /// Kind: backup, copy (one-off full), replication (replica images
        /// on the repository's proxy), migration (replicate, pause the VM,
        /// final sync), restore.
        #[arg(long, default_value = "backup")]
        kind: String,
        /// Repository (the target; for restore jobs, the source).
        #[arg(long)]
        repo: String,
        /// A disk: NAME=SOURCE (vm/disk=/path/img.raw, =nbd://…, =qmp+unix:///…);
        /// for restore jobs NAME=DESTINATION (a path or nbd:// export); repeat.
        #[arg(long = "disk", required_unless_present = "vm")]
        disks: Vec<String>,
        /// A whole VM of the inventory (`dm vm list`): each of its disks is
        /// a task per run; VM:vdb,vdc leaves those disks out; repeat.
        #[arg(long = "vm")]
        vm: Vec<String>,
        /// Migration jobs: VM=NAME, the VM's domain name on the target
        /// (default: its own); repeat.
        #[arg(long = "start-as")]
        start_as: Vec<String>,
        /// Restore jobs: NAME=POINT, the point to restore (default the newest); repeat.
        #[arg(long = "point")]
        points: Vec<String>,
        /// For VM sources: NAME=NODE, the VM's disk node for disk NAME; repeat.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// For VM sources: NAME=HOST, the VM host (HotAdd placement); repeat.
        #[arg(long = "vm-host")]
        vm_hosts: Vec<String>,
        /// Proxies the job may use; repeat (default: any).
        #[arg(long = "proxy")]
        proxies: Vec<String>,
        /// Transport mode: auto, san, hotadd, nbd, storage-snapshot.
        #[arg(long, default_value = "auto")]
        transport: String,
        /// Fall back to network mode.
        #[arg(long)]
        failover_to_network: bool,
        /// Retries of a failed task.
        #[arg(long, default_value_t = 2)]
        retries: u32,
        /// Run every N minutes.
        #[arg(long)]
        every_minutes: Option<u32>,
        /// Restore jobs: write over destinations that exist (files,
        /// devices); without it they are refused.
        #[arg(long)]
        overwrite: bool,
        /// VM disks: quiesce the guest through its agent: auto, required, off.
        #[arg(long, default_value = "auto", value_parser = ["auto", "required", "off"])]
        quiesce: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a job now; with --wait, show its progress until it ends.
    Run {
        /// Job name.
        name: String,
        /// Watch the session until it ends (exit 1 if it failed).
        #[arg(long)]
        wait: bool,
        /// Print JSON (the session).
        #[arg(long)]
        json: bool,
    },
    /// Delete a job.
    Delete {
        /// Job name.
        name: String,
    },
    /// Start a VM on the replicas of a replication (or migration) job,
    /// on the host of the proxy holding them.
    Failover(ReplicaArgs),
    /// Stop and remove a failed-over VM; its writes are dropped at the
    /// next replication.
    UndoFailover(ReplicaArgs),
    /// Move a failed-over VM's changes back to the original VM (shut off)
    /// and start it; the replica VM is removed.
    Failback {
        #[command(flatten)]
        args: ReplicaArgs,
        /// The original VM: libvirt:///DOMAIN?uri=… (default: where the
        /// inventory shows it).
        #[arg(long)]
        to: Option<String>,
    },
    /// Recent failovers, undos and failbacks, newest first.
    Operations {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which VM of which job, and how.
#[derive(Args)]
pub struct ReplicaArgs {
    /// Job name.
    pub job: String,
    /// The VM.
    pub vm: String,
    /// The replica VM: libvirt:///NAME[?uri=…] (default
    /// libvirt:///VM-replica on the holding host's hypervisor).
    #[arg(long)]
    pub on: Option<String>,
    /// Do not start the VM.
    #[arg(long)]
    pub no_start: bool,
    /// Return once the operation is queued.
    #[arg(long)]
    pub no_wait: bool,
    /// Print JSON (the operation).
    #[arg(long)]
    pub json: bool,
}

/// Ask for an operation on a VM's replicas; wait for its end unless told
/// not to (exit 1 if it failed).
fn replica_op(
    cl: &Client,
    a: ReplicaArgs,
    action: ReplicaAction,
    to: Option<String>,
) -> Result<u8, Failure> {
    let mut op = cl.replica_operation(
        &a.job,
        &ReplicaRequest {
            action,
            vm: a.vm.clone(),
            on: a.on,
            to,
            start: !a.no_start,
        },
    )?;
    if !a.no_wait {
        op = cl.wait_operation(op.id, || Ok::<(), Failure>(()))?;
    }
    if a.json {
        print_json(&op)?;
    } else {
        println!(
            "operation {}: {} of VM {} on {}: {}{}",
            op.id,
            action.name(),
            op.vm,
            op.proxy,
            op.state,
            op.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        if let Some(r) = &op.result {
            println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        }
    }
    Ok(u8::from(op.state == "failed"))
}

pub fn job(s: &ServerArgs, c: JobCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        JobCmd::Create {
            name,
            kind,
            repo,
            disks,
            points,
            nodes,
            vm_hosts,
            proxies,
            transport,
            failover_to_network,
            retries,
            every_minutes,
            overwrite,
            quiesce,
            vm,
            start_as,
            json,
        } => {
            let nodes = pairs("node", &nodes)?;
            let hosts = pairs("vm-host", &vm_hosts)?;
            let points = pairs("point", &points)?;
            let kind: JobKind = serde_json::from_value(serde_json::Value::String(kind.clone()))
                .map_err(|_| {
                    Failure(
                        2,
                        format!(
                            "--kind {kind:?}: use backup, copy, replication, migration or restore"
                        ),
                    )
                })?;
            let disks = disks
                .iter()
                .map(|d| {
                    let (n, src) = d
                        .split_once('=')
                        .ok_or_else(|| Failure(2, format!("--disk {d:?}: expected NAME=SOURCE")))?;
                    Ok(JobDisk {
                        name: n.parse()?,
                        source: src.into(),
                        disk: nodes.get(n).cloned(),
                        vm_host: hosts.get(n).cloned(),
                        point: points.get(n).cloned(),
                        start_as: None,
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
            let renames = pairs("start-as", &start_as)?;
            let j: Job = cl.create_job(&JobSpec {
                name,
                kind,
                repository: repo,
                disks,
                proxies,
                transport,
                failover_to_network,
                retries,
                every_minutes,
                overwrite,
                quiesce,
                vms: vm
                    .iter()
                    .map(|v| {
                        let (name, exclude) = v.split_once(':').unwrap_or((v, ""));
                        JobVm {
                            name: name.to_string(),
                            start_as: renames.get(name).cloned(),
                            host: None,
                            exclude: exclude
                                .split(',')
                                .filter(|x| !x.is_empty())
                                .map(str::to_string)
                                .collect(),
                        }
                    })
                    .collect(),
            })?;
            if json {
                return print_json(&j);
            }
            println!(
                "created {} job {} ({} disk(s), repository {})",
                j.spec.kind.as_str(),
                j.spec.name,
                j.spec.disks.len(),
                j.spec.repository
            );
        }
        JobCmd::List { json } => {
            let js: Vec<Job> = cl.jobs()?;
            if json {
                return print_json(&js);
            }
            println!(
                "{:<24} {:<8} {:>5} {:<16} LAST RUN",
                "JOB", "KIND", "DISKS", "REPOSITORY"
            );
            for j in js {
                println!(
                    "{:<24} {:<8} {:>5} {:<16} {}",
                    j.spec.name,
                    j.spec.kind.as_str(),
                    j.spec.disks.len(),
                    j.spec.repository,
                    j.last_run.as_deref().unwrap_or("-")
                );
            }
        }
        JobCmd::Run { name, wait, json } => {
            let sess: Session = cl.run_job(&name)?;
            if wait {
                let end = watch(&cl, sess.id, json)?;
                return finish(&end, json);
            }
            if json {
                return print_json(&sess);
            }
            println!(
                "job {name}: session {} started ({} task(s))",
                sess.id,
                sess.tasks.len()
            );
        }
        JobCmd::Delete { name } => {
            cl.delete_job(&name)?;
            println!("deleted job {name}");
        }
        JobCmd::Failover(a) => return replica_op(&cl, a, ReplicaAction::Failover, None),
        JobCmd::UndoFailover(a) => return replica_op(&cl, a, ReplicaAction::Undo, None),
        JobCmd::Failback { args, to } => {
            return replica_op(&cl, args, ReplicaAction::Failback, to);
        }
        JobCmd::Operations { json } => {
            let ops = cl.operations()?;
            if json {
                return print_json(&ops);
            }
            println!(
                "{:>4} {:<16} {:<9} {:<16} {:<8} CREATED",
                "ID", "JOB", "ACTION", "VM", "STATE"
            );
            for o in ops {
                println!(
                    "{:>4} {:<16} {:<9} {:<16} {:<8} {}",
                    o.id,
                    o.job,
                    o.action.name(),
                    o.vm,
                    o.state,
                    o.created
                );
            }
        }
    }
    Ok(0)
}
