//! `dm recovery`: instant VM recoveries through a server: the proxy
//! holding the repository (or another one, reading the points from the
//! holder's repository service) starts the VM from its points and serves
//! it.

use super::*;
use datamover_control::api::{Recovery, RecoveryMigrate, RecoveryRequest};

/// `dm recovery` subcommands.
#[derive(Subcommand)]
pub enum RecoveryCmd {
    /// Start a VM from its points (each disk's newest, or --point), on
    /// the hypervisor of the proxy holding the repository (or of
    /// --proxy); waits until it serves (or fails) unless --no-wait.
    Start {
        /// The repository (held by a proxy).
        repo: String,
        /// The VM.
        vm: String,
        /// A point to start from: VM/DISK[@POINT] (repeat; default: each
        /// disk's newest).
        #[arg(long = "point")]
        points: Vec<String>,
        /// The domain: libvirt:///NAME[?uri=…] (default
        /// libvirt:///VM-instant on the proxy's hypervisor), or
        /// qmp[:///NAME] for a QEMU of the proxy's own.
        #[arg(long)]
        on: Option<String>,
        /// The proxy to serve it (default: the one holding the
        /// repository); another one reads the points from the holder's
        /// repository service, only the chunks it reads (name each disk
        /// with --point VM/DISK[@POINT]).
        #[arg(long)]
        proxy: Option<String>,
        /// Return at once.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The recoveries, newest first.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One recovery, with its session.
    Show {
        /// Recovery id.
        id: u64,
    },
    /// Move a recovered VM to production storage while it runs (a
    /// directory in the proxy's datastores); waits for the end with the
    /// progress unless --no-wait.
    Migrate {
        /// Recovery id.
        id: u64,
        /// The directory of the new images.
        #[arg(long)]
        to: String,
        /// raw or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Return at once.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Power a recovered VM off and drop its writes.
    Discard {
        /// Recovery id.
        id: u64,
        /// Return at once.
        #[arg(long)]
        no_wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn line(r: &Recovery) -> String {
    let domain = r
        .session
        .as_ref()
        .and_then(|s| s["name"].as_str())
        .unwrap_or("-");
    let state = if r.state == "migrating" {
        format!("{} {}%", r.state, r.percent)
    } else {
        r.state.clone()
    };
    format!(
        "{:>4} {:<12} {:<16} {:<24} {:<14} {:<10} {}",
        r.id,
        r.repository,
        r.vm,
        domain,
        state,
        r.proxy,
        r.error.as_deref().unwrap_or("")
    )
}

/// Print the recovery; exit 1 when it failed or holds an error.
fn finish(r: &Recovery, json: bool) -> Result<u8, Failure> {
    if json {
        print_json(r)?;
    } else {
        println!("{}", line(r));
    }
    Ok(u8::from(r.state == "failed" || r.error.is_some()))
}

/// Wait until `until` holds or it ended; the migration's progress goes to
/// stderr.
fn wait(cl: &Client, id: u64, until: impl Fn(&Recovery) -> bool) -> Result<Recovery, Failure> {
    let mut shown = None;
    cl.wait_recovery(id, until, |r| {
        if r.state == "migrating" && shown != Some(r.percent) {
            shown = Some(r.percent);
            eprintln!("recovery {id}: migrating {}%", r.percent);
        }
        Ok::<(), Failure>(())
    })
}

pub fn recovery(s: &ServerArgs, c: RecoveryCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        RecoveryCmd::Start {
            repo,
            vm,
            points,
            on,
            proxy,
            no_wait,
            json,
        } => {
            let mut r = cl.create_recovery(&RecoveryRequest {
                repository: repo,
                vm,
                points,
                on,
                proxy,
            })?;
            if !no_wait {
                r = wait(&cl, r.id, Recovery::serves)?;
            }
            finish(&r, json)
        }
        RecoveryCmd::List { json } => {
            let all = cl.recoveries()?;
            if json {
                return print_json(&all);
            }
            println!(
                "{:>4} {:<12} {:<16} {:<24} {:<14} {:<10} ERROR",
                "ID", "REPOSITORY", "VM", "DOMAIN", "STATE", "PROXY"
            );
            for r in &all {
                println!("{}", line(r));
            }
            Ok(0)
        }
        RecoveryCmd::Show { id } => print_json(&cl.recovery(id)?),
        RecoveryCmd::Migrate {
            id,
            to,
            format,
            no_wait,
            json,
        } => {
            let mut r = cl.migrate_recovery(id, &RecoveryMigrate { to, format })?;
            if !no_wait {
                // Until it ended, or the migration failed (it serves on).
                r = wait(&cl, id, Recovery::control_failed)?;
            }
            finish(&r, json)
        }
        RecoveryCmd::Discard { id, no_wait, json } => {
            let mut r = cl.discard_recovery(id)?;
            if !no_wait {
                r = wait(&cl, id, Recovery::control_failed)?;
            }
            finish(&r, json)
        }
    }
}
