"""Back up a disk image with datamover from Python, restore it, verify.

    python bindings-python/examples/backup_and_restore.py IMAGE REPO

Creates REPO if needed, backs IMAGE up as "example/disk" with a progress
line, lists the points, restores the newest next to REPO and checks it.
Ctrl-C cancels cleanly: no partial restore point is left behind.
"""

import filecmp
import pathlib
import sys

import datamover


def progress(done: int, total: int) -> None:
    print(f"\r{done * 100 // max(total, 1):3d}% of {total >> 20} MiB", end="", file=sys.stderr, flush=True)


def main(image: str, repo_path: str) -> int:
    path = pathlib.Path(repo_path)
    try:
        repo = datamover.Repository.open(path) if (path / "config").exists() else datamover.Repository.init(path)
        stats = repo.backup(image, "example/disk", progress=progress)
        print(file=sys.stderr)
        print(f"backed up {stats.bytes_total >> 20} MiB in {stats.seconds:.1f} s: new {stats.bytes_new >> 20} MiB, "
              f"stored {stats.bytes_stored >> 20} MiB, bottleneck {stats.bottleneck}")
        for p in repo.points("example/disk"):
            print(f"  {p.id}  {p.time:%Y-%m-%d %H:%M:%S}  {p.size >> 20} MiB  stored {p.stored_size >> 20} MiB  via {p.transport}")
        target = path.parent / "example-restore.raw"
        repo.restore("example/disk", target, force=True)
        same = filecmp.cmp(image, target, shallow=False)
        print(f"restored to {target}: {'identical' if same else 'DIFFERENT'}")
        report = repo.verify(read_data=True)
        print("verify:", "ok" if report else f"damaged points {report.damaged_points}")
        return 0 if same and report else 1
    except datamover.DataMoverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
