//! `dm`: the datamover command line. Glue only: parse arguments, show
//! progress, print results; all logic lives in the `datamover` crate.
//!
//! Exit codes: 0 success, 1 failure (I/O, missing data), 2 bad usage or
//! input, 3 repository damaged (verify found problems, corrupt data).

use std::process::ExitCode;

mod disk_cmds;
mod output;
mod remote;
mod replica_cmds;
mod repo_cmds;

use output::Failure;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dm",
    version,
    about = "Back up and restore VM disks: dedupe, compression, verified restores"
)]
struct Cli {
    #[command(flatten)]
    server: remote::ServerArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new repository in an empty or new directory.
    Init(repo_cmds::InitArgs),
    /// Back up a disk (image file, block device, NBD export, or a running
    /// VM's disk) as a new restore point.
    Backup(disk_cmds::BackupArgs),
    /// List a running VM's disks (qmp+unix:///path/to/qmp.sock or qmp://host:port).
    VmDisks(disk_cmds::VmDisksArgs),
    /// List the VMs (libvirt domains) of a connection, with their disks.
    Vms(disk_cmds::VmsArgs),
    /// Thaw a guest a killed backup left frozen (the next backup does it too).
    VmThaw(disk_cmds::VmThawArgs),
    /// Recreate a libvirt VM from its newest points: disks restored, the
    /// domain defined from its stored definition, started.
    VmRestore(disk_cmds::VmRestoreArgs),
    /// VMs on replicas (libvirt): sync, list, failover, undo, failback.
    #[command(subcommand)]
    Replica(replica_cmds::ReplicaCmd),
    /// Quick migration of a running libvirt VM through the repository: a
    /// first pass while it runs, a final sync frozen and paused, the VM
    /// started on its replicas at the target, the source powered off.
    Migrate(replica_cmds::MigrateArgs),
    /// Serve a point over NBD (read-only, or writes to an overlay) until
    /// SIGINT or SIGTERM; prints the NBD URI to connect to.
    Export(replica_cmds::ExportArgs),
    /// Instant VM recovery (libvirt or a QEMU of ours): start a VM from its points, served
    /// by this process, its writes to an overlay; then --migrate it to
    /// production storage while it runs, or --discard it.
    InstantRecover(replica_cmds::InstantArgs),
    /// File-level restore: list or copy files out of a point (partitions,
    /// LVM, ext4/XFS/Btrfs/vfat/NTFS), read by a libguestfs appliance.
    Files(replica_cmds::FilesArgs),
    /// Restore a point (the newest without @POINT) to a file or block device.
    Restore(disk_cmds::RestoreArgs),
    /// List restore points.
    Points(repo_cmds::PointsArgs),
    /// Check the repository; with --read-data, read and check every chunk.
    Verify(repo_cmds::VerifyArgs),
    /// Managed hosts of a server (--server): add (prints the enrollment token), list, remove.
    #[command(subcommand)]
    Host(remote::HostCmd),
    /// The server's VM inventory (--server): list.
    #[command(subcommand)]
    Vm(remote::VmCmd),
    /// Proxies of a server (--server): list, set slots/modes/site, disable.
    #[command(subcommand)]
    Proxy(remote::ProxyCmd),
    /// Repositories of a server (--server).
    #[command(subcommand)]
    Repo(remote::RepoCmd),
    /// Jobs of a server (--server): create, list, run, delete.
    #[command(subcommand)]
    Job(remote::JobCmd),
    /// Instant VM recoveries through a server (--server): start, list,
    /// show, migrate, discard.
    #[command(subcommand)]
    Recovery(remote::RecoveryCmd),
    /// Sessions (job runs) of a server (--server): list, show, watch.
    #[command(subcommand)]
    Session(remote::SessionCmd),
    /// API tokens of a server (--server): create (with a role and an
    /// expiry), list, revoke.
    #[command(subcommand)]
    Token(remote::TokenCmd),
    /// The audit log of a server (--server): who changed what, when.
    Audit(remote::AuditArgs),
    /// Forget old points and free the space only they used.
    Prune(repo_cmds::PruneArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DM_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(Failure(code, msg)) => {
            eprintln!("dm: error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.cmd {
        Cmd::Init(a) => repo_cmds::init(a),
        Cmd::Backup(a) => disk_cmds::backup(a),
        Cmd::VmDisks(a) => disk_cmds::vm_disks(a),
        Cmd::Vms(a) => disk_cmds::vms(a),
        Cmd::VmThaw(a) => disk_cmds::vm_thaw(a),
        Cmd::VmRestore(a) => disk_cmds::vm_restore(a),
        Cmd::Restore(a) => disk_cmds::restore(a),
        Cmd::Replica(c) => replica_cmds::replica(c),
        Cmd::Migrate(a) => replica_cmds::migrate(a),
        Cmd::Export(a) => replica_cmds::export(a),
        Cmd::InstantRecover(a) => replica_cmds::instant_recover(a),
        Cmd::Files(a) => replica_cmds::files(&cli.server, a),
        Cmd::Points(a) => repo_cmds::points(a),
        Cmd::Verify(a) => repo_cmds::verify(a),
        Cmd::Prune(a) => repo_cmds::prune(a),
        Cmd::Host(c) => remote::host(&cli.server, c),
        Cmd::Vm(c) => remote::vm(&cli.server, c),
        Cmd::Proxy(c) => remote::proxy(&cli.server, c),
        Cmd::Repo(c) => remote::repo(&cli.server, c),
        Cmd::Job(c) => remote::job(&cli.server, c),
        Cmd::Session(c) => remote::session(&cli.server, c),
        Cmd::Recovery(c) => remote::recovery(&cli.server, c),
        Cmd::Token(c) => remote::token(&cli.server, c),
        Cmd::Audit(a) => remote::audit(&cli.server, a),
    }
}
