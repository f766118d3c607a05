//! `dm token` (API tokens with roles and expiry) and `dm audit` (who
//! changed what, when).

use super::*;
use datamover_control::api::{NewToken, TokenRole};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token; prints its secret (shown only this once).
    Create {
        /// Token name (the audit log names it).
        name: String,
        /// admin (everything), operator (reads, runs jobs, creates restore
        /// jobs) or auditor (reads everything, changes nothing).
        #[arg(long)]
        role: TokenRole,
        /// Days until it expires (1-3650).
        #[arg(long, default_value_t = 90)]
        expires_days: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (names, roles, expiry; never secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it stops working at once.
    Revoke {
        /// Token name.
        name: String,
    },
}

pub fn token(s: &ServerArgs, c: TokenCmd) -> Result<u8, Failure> {
    let cl = s.client()?;
    match c {
        TokenCmd::Create {
            name,
            role,
            expires_days,
            json,
        } => {
            let t = cl.create_token(&NewToken {
                name,
                role,
                expires_days: Some(expires_days),
            })?;
            if json {
                return print_json(&t);
            }
            println!(
                "token {} ({}), expires {}:",
                t.token.name,
                t.token.role.as_str(),
                t.token.expires.as_deref().unwrap_or("never")
            );
            println!("{}", t.secret);
        }
        TokenCmd::List { json } => {
            let ts = cl.tokens()?;
            if json {
                return print_json(&ts);
            }
            println!("{:<24} {:<9} {:<21} EXPIRES", "TOKEN", "ROLE", "CREATED");
            for t in ts {
                println!(
                    "{:<24} {:<9} {:<21} {}",
                    t.name,
                    t.role.as_str(),
                    t.created,
                    t.expires.as_deref().unwrap_or("never")
                );
            }
        }
        TokenCmd::Revoke { name } => {
            cl.revoke_token(&name)?;
            println!("token {name} revoked");
        }
    }
    Ok(0)
}

/// `dm audit`: the newest entries of the audit log.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// How many entries (newest first).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn audit(s: &ServerArgs, a: AuditArgs) -> Result<u8, Failure> {
    let es = s.client()?.audit(a.limit)?;
    if a.json {
        return print_json(&es);
    }
    println!(
        "{:<6} {:<21} {:<24} {:<6} ACTION",
        "ID", "AT", "WHO", "STATUS"
    );
    for e in es {
        println!(
            "{:<6} {:<21} {:<24} {:<6} {}",
            e.id, e.at, e.who, e.status, e.action
        );
    }
    Ok(0)
}
