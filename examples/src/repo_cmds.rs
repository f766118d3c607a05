//! `dm init`, `dm points`, `dm verify`, `dm prune`: a local repository.

use std::path::PathBuf;

use clap::Args;
use datamover::{DiskName, KeepPolicy, PruneOptions, Repository};
use serde_json::json;

use crate::output::{Failure, human};

/// Arguments of `dm init`.
#[derive(Args)]
pub struct InitArgs {
    /// Repository directory.
    pub repo: PathBuf,
}

/// Create a new repository in an empty or new directory.
pub fn init(args: InitArgs) -> Result<u8, Failure> {
    let InitArgs { repo } = args;
    let r = Repository::init(&repo)?;
    println!(
        "created repository {} (id {})",
        repo.display(),
        r.config().id
    );
    Ok(0)
}

/// Arguments of `dm points`.
#[derive(Args)]
pub struct PointsArgs {
    /// Only this disk (<vm>/<disk>).
    pub name: Option<String>,
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// List restore points.
pub fn points(args: PointsArgs) -> Result<u8, Failure> {
    let PointsArgs { name, repo, json } = args;
    let disk = name.map(|n| n.parse::<DiskName>()).transpose()?;
    let r = Repository::open(&repo)?;
    let (points, bad) = r.list_points(disk.as_ref())?;
    for e in &bad {
        eprintln!("dm: warning: {e}");
    }
    if json {
        let v: Vec<_> = points
            .iter()
            .map(|p| {
                json!({"disk": p.disk.to_string(), "point": p.id.to_string(), "meta": p.meta,
                       "manifest_bytes": p.manifest_len})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if points.is_empty() {
        println!("no restore points");
    } else {
        println!(
            "{:<20} {:<28} {:<19} {:>10} {:>10} {:<16} {:<11} SOURCE",
            "DISK", "POINT", "STARTED", "SIZE", "STORED", "TRANSPORT", "CONSISTENCY"
        );
        for p in &points {
            println!(
                "{:<20} {:<28} {:<19} {:>10} {:>10} {:<16} {:<11} {}",
                p.disk.to_string(),
                p.id.to_string(),
                p.meta
                    .started
                    .get(..19)
                    .unwrap_or(&p.meta.started)
                    .replace('T', " "),
                human(p.meta.disk_size),
                human(p.meta.stats.bytes_stored),
                p.meta.transport,
                p.meta
                    .consistency
                    .as_ref()
                    .map_or("-".to_string(), |c| c.level.to_string()),
                p.meta.source.location
            );
        }
    }
    if !bad.is_empty() {
        return Ok(3);
    }
    Ok(0)
}

/// Arguments of `dm verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Read every chunk (CRC, decompression, BLAKE3).
    #[arg(long)]
    pub read_data: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Check the repository; with --read-data, read and check every chunk.
pub fn verify(args: VerifyArgs) -> Result<u8, Failure> {
    let VerifyArgs {
        repo,
        read_data,
        json,
    } = args;
    let r = Repository::open(&repo)?;
    let rep = datamover::verify(&r, read_data)?;
    if json {
        println!("{}", json!(rep));
    } else {
        for p in &rep.problems {
            println!("problem: {p}");
        }
        for d in &rep.damaged_points {
            println!("damaged point {}:", d.point);
            for p in &d.problems {
                println!("  {p}");
            }
            if d.more > 0 {
                println!("  ... and {} more", d.more);
            }
        }
        if rep.unindexed_packs > 0 {
            println!(
                "note: {} pack(s) left by interrupted backups; `dm prune` removes them",
                rep.unindexed_packs
            );
        }
        println!(
            "{}: {} points, {} packs, {} chunks{}",
            if rep.is_ok() { "ok" } else { "DAMAGED" },
            rep.points,
            rep.packs,
            rep.chunks,
            if read_data {
                format!(", {} chunks read and checked", rep.chunks_read)
            } else {
                String::new()
            }
        );
    }
    if !rep.is_ok() {
        return Ok(3);
    }
    Ok(0)
}

/// Arguments of `dm prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// Repository directory.
    #[arg(long, env = "DM_REPO")]
    pub repo: PathBuf,
    /// Keep the newest N points of each disk.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Keep the newest point of each of the last N days.
    #[arg(long)]
    pub keep_daily: Option<usize>,
    /// Keep the newest point of each of the last N weeks.
    #[arg(long)]
    pub keep_weekly: Option<usize>,
    /// Keep the newest point of each of the last N months.
    #[arg(long)]
    pub keep_monthly: Option<usize>,
    /// Show what would be removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Forget old points and free the space only they used.
pub fn prune(args: PruneArgs) -> Result<u8, Failure> {
    let PruneArgs {
        repo,
        keep_last,
        keep_daily,
        keep_weekly,
        keep_monthly,
        dry_run,
        json,
    } = args;
    let r = Repository::open(&repo)?;
    let opts = PruneOptions {
        keep: KeepPolicy {
            last: keep_last,
            daily: keep_daily,
            weekly: keep_weekly,
            monthly: keep_monthly,
        },
        dry_run,
        ..PruneOptions::default()
    };
    let rep = datamover::prune(&r, &opts)?;
    if json {
        println!("{}", json!(rep));
    } else {
        for p in &rep.points_removed {
            println!("{} {p}", if dry_run { "would forget" } else { "forgot" });
        }
        println!(
            "{}{} points kept, {} forgotten; {} packs deleted, {} repacked, {} orphan packs removed; {} freed",
            if dry_run { "dry run: " } else { "" },
            rep.points_kept,
            rep.points_removed.len(),
            rep.packs_deleted,
            rep.packs_repacked,
            rep.orphan_packs_deleted,
            human(rep.bytes_freed)
        );
    }
    Ok(0)
}
