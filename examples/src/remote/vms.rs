//! `dm vm`: the server's VM inventory, as the hypervisors report it.

use super::*;

/// `dm vm` subcommands.
#[derive(Subcommand)]
pub enum VmCmd {
    /// The VMs of every hypervisor (`dm host add --hypervisor`), with
    /// their disks, as their proxies last reported them (every 30 s).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn vm(s: &ServerArgs, c: VmCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        VmCmd::List { json } => {
            let vms = cl.vms()?;
            if json {
                return print_json(&vms);
            }
            println!(
                "{:<16} {:<24} {:<10} {:<20} DISKS",
                "HOST", "VM", "STATE", "SEEN"
            );
            for v in vms {
                let disks: Vec<String> = v
                    .disks
                    .iter()
                    .map(|d| format!("{} ({})", d.target, d.format))
                    .collect();
                println!(
                    "{:<16} {:<24} {:<10} {:<20} {}",
                    v.host,
                    v.name,
                    v.state,
                    v.seen.get(..19).unwrap_or(&v.seen),
                    disks.join(", ")
                );
            }
        }
    }
    Ok(0)
}
