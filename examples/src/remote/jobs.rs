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
                    })
                })
                .collect::<Result<Vec<_>, Failure>>()?;
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
    }
    Ok(0)
}
