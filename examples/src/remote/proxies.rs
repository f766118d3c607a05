//! `dm proxy`: proxies, their slots, modes and site.

use super::*;

#[derive(Subcommand)]
pub enum ProxyCmd {
    /// List proxies with their slots, state and load.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a proxy's settings.
    Set {
        /// Proxy name.
        name: String,
        /// Task slots.
        #[arg(long)]
        slots: Option<u32>,
        /// Allowed transport modes, comma-separated (san,hotadd,storage-snapshot,nbd).
        #[arg(long, value_delimiter = ',')]
        modes: Option<Vec<String>>,
        /// Site.
        #[arg(long)]
        site: Option<String>,
        /// Take it out of service.
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        /// Put it back in service.
        #[arg(long)]
        enable: bool,
    },
}

pub fn proxy(s: &ServerArgs, c: ProxyCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    let show = |ps: &[Proxy]| {
        println!(
            "{:<20} {:<9} {:>5} {:>7} {:<8} DATASTORES",
            "PROXY", "STATE", "SLOTS", "RUNNING", "VERSION"
        );
        for p in ps {
            println!(
                "{:<20} {:<9} {:>5} {:>7} {:<8} {}",
                p.name,
                p.state.as_str(),
                p.slots,
                p.running,
                p.version,
                p.datastores.join(",")
            );
        }
    };
    match c {
        ProxyCmd::List { json } => {
            let ps: Vec<Proxy> = cl.proxies()?;
            if json {
                return print_json(&ps);
            }
            show(&ps);
        }
        ProxyCmd::Set {
            name,
            slots,
            modes,
            site,
            disable,
            enable,
        } => {
            let p: Proxy = cl.patch_proxy(
                &name,
                &ProxyPatch {
                    slots,
                    modes,
                    site,
                    disabled: if disable {
                        Some(true)
                    } else if enable {
                        Some(false)
                    } else {
                        None
                    },
                },
            )?;
            show(&[p]);
        }
    }
    Ok(0)
}
