//! `dm repo`: repositories of the server.

use super::*;

#[derive(Subcommand)]
pub enum RepoCmd {
    /// Add a repository: a directory at the same path on the proxies that
    /// write to it, or (with --proxy) a directory on one proxy, which serves
    /// it to the others over its repository service.
    Add {
        /// Name.
        name: String,
        /// Directory (created on first use).
        path: String,
        /// The proxy that holds the repository (the target of replication jobs).
        #[arg(long)]
        proxy: Option<String>,
    },
    /// List repositories.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn repo(s: &ServerArgs, c: RepoCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        RepoCmd::Add { name, path, proxy } => {
            let r: Repository = cl.add_repository(&Repository { name, path, proxy })?;
            match &r.proxy {
                Some(p) => println!("added repository {} at {} on proxy {p}", r.name, r.path),
                None => println!("added repository {} at {}", r.name, r.path),
            }
        }
        RepoCmd::List { json } => {
            let rs: Vec<Repository> = cl.repositories()?;
            if json {
                return print_json(&rs);
            }
            for r in rs {
                println!(
                    "{:<24} {:<12} {}",
                    r.name,
                    r.proxy.as_deref().unwrap_or("(shared)"),
                    r.path
                );
            }
        }
    }
    Ok(0)
}
