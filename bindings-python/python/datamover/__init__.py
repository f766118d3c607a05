"""datamover: back up and restore VM disks from Python.

The same library as the ``dm`` command line, through thin bindings::

    import datamover
    repo = datamover.Repository.init("/backup/repo")      # or Repository.open
    stats = repo.backup("/images/web01.raw", "web01/vda",
                        progress=lambda done, total: print(done * 100 // total, "%"))
    print(stats.bytes_new, stats.dedupe_ratio, stats.bottleneck)
    for p in repo.points("web01/vda"):
        print(p.id, p.time, p.size, p.stored_size, p.transport)
    repo.restore("web01/vda", "/tmp/web01.raw")            # newest point
    assert repo.verify(read_data=True).ok
    repo.prune(keep_last=7)

Long calls release the GIL; Ctrl-C or an exception raised in the progress
callback cancels them cleanly (no partial point is written).
"""

from ._datamover import (
    Export,
    Files,
    InstantRecovery,
    Point,
    PruneReport,
    Repository,
    Server,
    Stats,
    VerifyReport,
    __version__,
    instant_discard,
    instant_migrate,
    instant_sessions,
    vm_disks,
    vms,
)
from ._errors import (
    CancelledError,
    CorruptRepositoryError,
    DataMoverError,
    InvalidInputError,
    TransportError,
    UnsupportedError,
)

__all__ = [
    "Repository",
    "Server",
    "Export",
    "Files",
    "InstantRecovery",
    "instant_migrate",
    "instant_discard",
    "instant_sessions",
    "Stats",
    "Point",
    "VerifyReport",
    "PruneReport",
    "vm_disks",
    "vms",
    "DataMoverError",
    "CorruptRepositoryError",
    "TransportError",
    "UnsupportedError",
    "InvalidInputError",
    "CancelledError",
    "__version__",
]
