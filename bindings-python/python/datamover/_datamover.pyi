"""Type stubs for the compiled part of datamover."""

import datetime
import os
import pathlib
from typing import Any, Callable, Literal, Optional, Union

__version__: str

ProgressCallback = Callable[[int, int], object]
"""Called with (bytes done, bytes total) from a worker thread; raising an
exception in it cancels the run and re-raises that exception."""

class Stats:
    """Figures of one backup or restore (the keys of ``dm backup --json``)."""

    disk: str
    point: str
    transport: str
    bytes_total: int
    bytes_read: int
    bytes_zero: int
    bytes_new: int
    bytes_stored: int
    chunks: int
    chunks_new: int
    dedupe_ratio: float
    compression_ratio: float
    seconds: float
    mb_per_s: float
    bottleneck: Literal["source read", "CPU", "target write"]
    threads: int
    incremental: bool
    parent: Optional[str]
    bytes_changed: Optional[int]
    change_tracker: Optional[str]
    full_reason: Optional[str]
    checkpoint: Optional[str]
    """VM backups: the checkpoint (dirty bitmap) this point started."""
    failover_from: Optional[str]
    """VM backups: the mode that failed when the run fell back to NBD."""
    failover_reason: Optional[str]
    consistency: Optional[Literal["application", "crash"]]
    consistency_reason: Optional[str]
    frozen_ms: Optional[int]
    notes: list[str]
    """VM backups: what the run decided and why (modes not used, ...)."""
    def to_dict(self) -> dict[str, object]:
        """All figures as a dict: exactly the keys of ``dm backup --json``
        (``busy_seconds`` per stage, ``failover`` as ``{from, to, reason}``
        or ``None``)."""

def vm_disks(address: str, *, timeout: float = 60.0) -> list[dict[str, object]]:
    """A running VM's disks: node, device, format, file, size, backing,
    checkpoints (QMP); target, format, source (``libvirt:///DOMAIN``)."""

def vms(address: str = "libvirt:///") -> list[dict[str, object]]:
    """The libvirt domains of a connection: name, state, disks."""

def instant_migrate(
    name: str,
    to: Union[str, os.PathLike[str]],
    *,
    dir: Optional[Union[str, os.PathLike[str]]] = None,
    format: Literal["raw", "qcow2"] = "raw",
) -> dict[str, Any]:
    """Copy instant recovery session ``name``'s disks to images in ``to``
    while its VM runs, switch the VM to them (paused for the switch only)
    and define it there; the session as it ended."""

def instant_discard(
    name: str, *, dir: Optional[Union[str, os.PathLike[str]]] = None
) -> dict[str, Any]:
    """Power off session ``name``'s VM and drop its writes."""

def instant_sessions(
    *, dir: Optional[Union[str, os.PathLike[str]]] = None
) -> list[dict[str, Any]]:
    """The instant recovery sessions (name, state, percent, disks, ...)."""

class Point:
    """One restore point of a disk. ``str(point)`` is ``"vm/disk@id"``."""

    id: str
    disk: str
    time: datetime.datetime
    size: int
    stored_size: int
    source: str
    source_kind: str
    transport: str
    chunking: Literal["fixed", "cdc"]
    block_size: int
    compression: str
    consistency: Optional[Literal["application", "crash"]]
    consistency_reason: Optional[str]
    frozen_ms: Optional[int]

class VerifyReport:
    """What ``Repository.verify`` found; truthy when nothing is wrong."""

    ok: bool
    points: int
    packs: int
    chunks: int
    chunks_read: int
    problems: list[str]
    damaged_points: list[str]
    details: list[tuple[str, list[str]]]
    unindexed_packs: int
    def __bool__(self) -> bool: ...

class PruneReport:
    """What ``Repository.prune`` did (or would do with ``dry_run``)."""

    points_kept: int
    points_removed: list[str]
    packs_deleted: int
    packs_repacked: int
    orphan_packs_deleted: int
    chunks_removed: int
    bytes_freed: int

class Repository:
    """A datamover repository (a local directory)."""

    @staticmethod
    def init(path: Union[str, os.PathLike[str]]) -> "Repository":
        """Create a new repository in an empty or new directory."""
    @staticmethod
    def open(path: Union[str, os.PathLike[str]]) -> "Repository":
        """Open an existing repository."""
    @property
    def path(self) -> pathlib.Path:
        """The repository's directory."""
    @property
    def id(self) -> str:
        """The repository's id."""
    def backup(
        self,
        source: Union[str, os.PathLike[str]],
        name: str,
        *,
        chunking: Literal["fixed", "cdc"] = "fixed",
        block_size: int = 1048576,
        compression: Literal["none", "fast", "optimal", "high", "extreme"] = "optimal",
        threads: int = 0,
        progress: Optional[ProgressCallback] = None,
        bitmap: Optional[str] = None,
        full_if_needed: bool = False,
        timeout: float = 60.0,
        tls_certificates: Optional[Union[str, os.PathLike[str]]] = None,
        disk: Optional[str] = None,
        transport: Literal["auto", "san", "hotadd", "nbd", "storage-snapshot"] = "auto",
        failover_to_network: bool = False,
        snapshot_provider: Literal["auto", "reflink", "qcow2-internal"] = "auto",
        quiesce: Literal["auto", "required", "off"] = "auto",
        format: str = "auto",
    ) -> Stats:
        """Back up ``source`` (a path, block device, ``file://`` or NBD URI)
        as a new point of ``name`` ("vm/disk"). With ``bitmap`` the backup is
        incremental: only what that QEMU dirty bitmap marks changed since the
        previous point is read; ``full_if_needed`` reads the whole disk when
        no incremental is possible instead of raising.

        A running VM (``qmp+unix:///path/qmp.sock`` or ``qmp://host:port``)
        is backed up with ``disk`` naming its node or device: the disk is
        snapshotted, read through ``transport`` ("auto": san > hotadd >
        nbd), and incremental from its checkpoint after the first point;
        ``failover_to_network`` falls back to NBD when the mode cannot read
        the disk (``Stats.failover_from`` says so)."""
    def backup_vm(
        self,
        source: str,
        vm: str,
        *,
        disks: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        quiesce: Literal["auto", "required", "off"] = "auto",
        compression: str = "optimal",
        threads: int = 0,
        progress: Optional[Callable[[int, int], object]] = None,
        full_if_needed: bool = True,
        timeout: float = 60.0,
    ) -> list[Stats]:
        """Back up several disks of a running libvirt VM at one instant
        (one freeze, one backup job, one checkpoint), each as "VM/TARGET"."""
    def export(
        self,
        point: Union[str, Point],
        listen: str,
        *,
        writable: Optional[Union[str, os.PathLike[str]]] = None,
        tls_certificates: Optional[Union[str, os.PathLike[str]]] = None,
        cache_mib: int = 64,
    ) -> Export:
        """Serve a point over NBD at ``listen`` ("unix:PATH" or
        "HOST:PORT") until stopped; writes go to the overlay ``writable``."""
    def files(self, point: Union[str, Point], *, appliance_mib: int = 512) -> Files:
        """A point's files, read by a libguestfs appliance."""
    def instant_recover(
        self,
        points: list[str],
        *,
        on: str = "libvirt:///",
        dir: Optional[Union[str, os.PathLike[str]]] = None,
        cache_mib: int = 64,
    ) -> InstantRecovery:
        """Start the VM the points name ("vm/disk[@id]" or "vm") from the
        repository as domain ``on``; returns once it runs."""
    def replica_sync(
        self, vm: str, replicas: Union[str, os.PathLike[str]]
    ) -> list[dict[str, Any]]:
        """Bring the VM's replicas (REPLICAS/VM/DISK.img) to its newest
        points; only what differs is written."""
    def replicas(
        self, vm: str, replicas: Union[str, os.PathLike[str]]
    ) -> list[dict[str, Any]]: ...
    def failover(
        self,
        vm: str,
        replicas: Union[str, os.PathLike[str]],
        *,
        on: str = "libvirt:///",
        start: bool = True,
    ) -> dict[str, Any]:
        """Start the VM on its replicas (libvirt domain VM-replica unless
        ``on`` names one)."""
    def undo_failover(
        self, vm: str, replicas: Union[str, os.PathLike[str]], *, on: str = "libvirt:///"
    ) -> dict[str, Any]: ...
    def failback(
        self,
        vm: str,
        replicas: Union[str, os.PathLike[str]],
        to: str,
        *,
        on: str = "libvirt:///",
        start: bool = True,
    ) -> dict[str, Any]:
        """The replica VM's changes onto the original VM ``to`` (shut off),
        which is started; the replica VM is removed."""
    def migrate_vm(
        self,
        source: str,
        to: str,
        replicas: Union[str, os.PathLike[str]],
        *,
        vm: Optional[str] = None,
        quiesce: Literal["auto", "required", "off"] = "auto",
    ) -> dict[str, Any]:
        """Quick migration of a running libvirt VM through this
        repository and the replicas."""
    def restore_vm(
        self,
        vm: str,
        to: Union[str, os.PathLike[str]],
        *,
        uri: str = "qemu:///system",
        name: Optional[str] = None,
        start: bool = True,
    ) -> list[pathlib.Path]:
        """Recreate a libvirt VM from its newest points (disks restored,
        domain defined from the stored definition, started)."""
    def restore(
        self,
        point: Union[str, Point],
        target: Union[str, os.PathLike[str]],
        *,
        force: bool = False,
        progress: Optional[ProgressCallback] = None,
        timeout: float = 60.0,
        tls_certificates: Optional[Union[str, os.PathLike[str]]] = None,
    ) -> Stats:
        """Restore a point ("vm/disk" = newest, "vm/disk@id-prefix", or a
        Point) to a new sparse file, an existing block device, or a writable
        NBD export (``nbd://…``, ``nbd+unix://…``)."""
    def points(self, name: Optional[str] = None) -> list[Point]:
        """Restore points, oldest first per disk."""
    def verify(self, read_data: bool = False) -> VerifyReport:
        """Check structure; with ``read_data`` every chunk too."""
    def prune(
        self,
        *,
        keep_last: Optional[int] = None,
        keep_daily: Optional[int] = None,
        keep_weekly: Optional[int] = None,
        keep_monthly: Optional[int] = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Forget points outside the keep rules and free their space."""

class Files:
    """A point's files (``Repository.files``), read by one libguestfs
    appliance until ``close()``; a context manager. Paths are
    ``/FILESYSTEM/PATH`` (with one filesystem, ``/PATH``)."""

    def filesystems(self) -> list[dict[str, Any]]: ...
    def ls(self, path: str = "/") -> list[dict[str, Any]]: ...
    def get(
        self, paths: list[str], to: Union[str, os.PathLike[str]]
    ) -> dict[str, Any]:
        """Copy files, symlinks and directories into ``to`` with mode,
        owner, times and extended attributes."""
    def tar(
        self, paths: list[str], file: Union[str, os.PathLike[str]]
    ) -> dict[str, Any]:
        """Write them as a tar archive (PAX xattrs) to the new ``file``."""
    def close(self) -> None: ...
    def __enter__(self) -> "Files": ...
    def __exit__(self, *args: object) -> bool: ...

class InstantRecovery:
    """A VM running from its points (``Repository.instant_recover``),
    served by a background thread; a context manager."""

    name: str
    """The session's (and the domain's) name."""
    session: dict[str, Any]
    """The session as it started."""
    def stop(self) -> Optional[dict[str, Any]]:
        """Stop serving (the VM is powered off unless it was migrated or
        discarded); the session as it ended, or None when stopped already."""
    def __enter__(self) -> "InstantRecovery": ...
    def __exit__(self, *args: object) -> bool: ...

class Export:
    """A point served over NBD (``Repository.export``); a context manager."""

    uri: str
    """The NBD URI clients connect to."""
    def stop(self) -> Optional[dict[str, int]]:
        """Stop serving; what it read (chunks_loaded, bytes_loaded, hits),
        or None when it was stopped already."""
    def __enter__(self) -> "Export": ...
    def __exit__(self, *args: object) -> bool: ...

class Server:
    """A dm-server through its REST API (the same calls as ``dm --server``).

    Answers are the API's JSON as dicts and lists (see the server's
    OpenAPI document). Refusals and bad input raise ``InvalidInputError``;
    an unreachable server raises ``TransportError``.
    """

    def __init__(
        self,
        url: str,
        *,
        ca: str | os.PathLike[str],
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> None: ...
    def proxies(self) -> list[dict[str, Any]]: ...
    def vms(self) -> list[dict[str, Any]]: ...
    def set_proxy(self, name: str, **settings: Any) -> dict[str, Any]: ...
    def hosts(self) -> list[dict[str, Any]]: ...
    def add_host(
        self,
        name: str,
        addresses: list[str] = ...,
        *,
        roles: list[str] = ...,
        datastores: list[str] = ...,
        hypervisor: Optional[str] = None,
    ) -> dict[str, Any]: ...
    def set_host_roles(self, name: str, roles: list[str]) -> dict[str, Any]: ...
    def remove_host(self, name: str) -> None: ...
    def repositories(self) -> list[dict[str, Any]]: ...
    def add_repository(self, name: str, path: str, *, proxy: str | None = None) -> dict[str, Any]: ...
    def jobs(self) -> list[dict[str, Any]]: ...
    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]: ...
    def run_job(self, name: str, *, wait: bool = False) -> dict[str, Any]: ...
    def replica_operation(
        self,
        job: str,
        vm: str,
        action: Literal["failover", "undo", "failback"],
        *,
        on: Optional[str] = None,
        to: Optional[str] = None,
        start: bool = True,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Failover, undo or failback of a replication job's VM, run by the
        proxy holding its replicas; with wait, the ended operation."""
    def operations(self) -> list[dict[str, Any]]: ...
    def start_recovery(
        self,
        repository: str,
        vm: str,
        *,
        points: Optional[list[str]] = None,
        on: Optional[str] = None,
        proxy: Optional[str] = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Instant VM recovery by the proxy holding the repository, or by
        `proxy` reading the points from the holder's repository service
        (name each disk in `points`); with wait, returns once it serves
        (or failed)."""
    def files_ls(
        self, repository: str, point: str, path: str = "/"
    ) -> list[dict[str, Any]]:
        """List a point's files, read by the proxy holding the repository."""
    def files_tar(
        self,
        repository: str,
        point: str,
        paths: list[str],
        file: Union[str, os.PathLike[str]],
    ) -> int:
        """Download a tar archive of a point's files to the new ``file``."""
    def recoveries(self) -> list[dict[str, Any]]: ...
    def recovery(self, id: int) -> dict[str, Any]: ...
    def migrate_recovery(
        self,
        id: int,
        to: str,
        *,
        format: Literal["raw", "qcow2"] = "raw",
        wait: bool = True,
    ) -> dict[str, Any]:
        """Move a recovered VM to images in ``to`` (a directory in the
        proxy's datastores) while it runs; with wait, until migrated or
        the migration failed (``error``, it serves on)."""
    def discard_recovery(self, id: int, *, wait: bool = True) -> dict[str, Any]:
        """Power a recovered VM off and drop its writes."""
    def session(self, id: int) -> dict[str, Any]: ...
    def sessions(self, limit: int = 20) -> list[dict[str, Any]]: ...
