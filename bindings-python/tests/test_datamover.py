"""Tests of the Python bindings against real files, a real repository and,
where root is available, a real full filesystem."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

import datamover

IN_CI = os.environ.get("CI") in ("true", "1")


def make_image(path, size, regions):
    """A sparse image: (offset, length, kind) with kind 'random:<seed>',
    'nibbles:<seed>' (random bytes of 16 values: compressible, but work for
    zstd, where random bytes are stored raw without trying) or 'text'."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length, kind in regions:
            if kind == "text":
                line = b"Nov 25 09:52:35 web01 nginx: GET /index.html 200\n"
                data = (line * (length // len(line) + 1))[:length]
            elif kind.startswith("nibbles:"):
                data = random.Random(int(kind.split(":")[1])).randbytes(length)
                data = data.translate(bytes(b & 0x0F for b in range(256)))
            else:
                data = random.Random(int(kind.split(":")[1])).randbytes(length)
            f.seek(off)
            f.write(data)


def digest(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def env(tmp_path):
    img = tmp_path / "disk.raw"
    make_image(img, 32 << 20, [(1 << 20, 12 << 20, "random:1"), (20 << 20, 4 << 20, "text")])
    repo = datamover.Repository.init(tmp_path / "repo")
    return tmp_path, img, repo


@pytest.fixture
def big(tmp_path):
    """An image that takes about a second to back up at 'high'."""
    img = tmp_path / "big.raw"
    make_image(img, 96 << 20, [(0, 48 << 20, "nibbles:7"), (48 << 20, 48 << 20, "text")])
    return img


def test_backup_and_restore_byte_for_byte(env):
    tmp, img, repo = env
    stats = repo.backup(img, "web01/vda")
    assert stats.bytes_total == 32 << 20
    assert stats.bytes_read == 16 << 20, "holes are not read"
    assert stats.bottleneck in ("source read", "CPU", "target write")
    out = tmp / "out.raw"
    r = repo.restore("web01/vda", out)
    assert r.bytes_total == 32 << 20
    assert digest(out) == digest(img)
    assert os.stat(out).st_blocks * 512 <= os.stat(img).st_blocks * 512 + (1 << 20), "holes stay holes"


def test_points_and_stats(env):
    tmp, img, repo = env
    first = repo.backup(str(img), "web01/vda", chunking="cdc", block_size=256 << 10, compression="fast")
    second = repo.backup(img, "web01/vda", chunking="cdc", block_size=256 << 10, compression="fast")
    assert second.bytes_new == 0 and second.chunks_new == 0
    assert first.compression_ratio > 1.2
    d = first.to_dict()
    for key in ("bytes_read", "bytes_new", "bytes_stored", "dedupe_ratio", "compression_ratio",
                "seconds", "mb_per_s", "bottleneck", "point", "disk"):
        assert key in d
    # Python's report has exactly the keys of `dm backup --json`.
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "target")
    dm = os.path.join(target, "debug", "dm")
    if os.path.exists(dm):
        subprocess.run([dm, "init", str(tmp / "cli-repo")], check=True, capture_output=True)
        out = subprocess.run([dm, "backup", str(img), "--repo", str(tmp / "cli-repo"), "--name", "web01/vda",
                              "--json"], check=True, capture_output=True, text=True)
        assert sorted(json.loads(out.stdout)) == sorted(d)
        assert isinstance(d["busy_seconds"], dict) and d["failover"] is None
    elif os.environ.get("CI") == "true":
        pytest.fail(f"{dm} is missing: run cargo test first")
    points = repo.points()
    assert [p.id for p in points] == [first.point, second.point]
    p = points[0]
    assert (p.disk, p.size, p.transport, p.chunking, p.block_size) == ("web01/vda", 32 << 20, "file", "cdc", 256 << 10)
    assert p.stored_size == first.bytes_stored and p.source == str(img)
    assert p.time.tzinfo is not None and p.time <= points[1].time
    assert str(p) == f"web01/vda@{p.id}"
    assert repo.points("other/disk") == []
    # Restore by Point object and by id prefix.
    out = tmp / "a.raw"
    repo.restore(p, out)
    assert digest(out) == digest(img)
    repo.restore(f"web01/vda@{p.id[:20]}", out, force=True)
    assert digest(out) == digest(img)
    assert repo.verify(read_data=True).ok
    rep = repo.prune(keep_last=1)
    assert rep.points_removed == [str(p)] and rep.points_kept == 1


def test_progress_is_called_and_monotonic(env):
    tmp, img, repo = env
    calls = []
    repo.backup(img, "vm/d", progress=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 3
    assert all(t == 32 << 20 for _, t in calls)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and dones[-1] == 32 << 20
    rcalls = []
    repo.restore("vm/d", tmp / "o.raw", progress=lambda d, t: rcalls.append(d))
    assert rcalls and rcalls == sorted(rcalls) and rcalls[-1] == 32 << 20


def test_exception_in_callback_cancels_without_a_point(env, big):
    tmp, _, repo = env

    def boom(done, total):
        if done > 20 << 20:
            raise RuntimeError("stop right here")

    with pytest.raises(RuntimeError, match="stop right here"):
        repo.backup(big, "vm/big", progress=boom)
    assert repo.points() == []
    assert repo.verify().ok
    # The repository is intact and usable; chunks sealed before are reused.
    stats = repo.backup(big, "vm/big")
    out = tmp / "o.raw"
    repo.restore("vm/big", out)
    assert digest(out) == digest(big)
    assert stats.bytes_total == 96 << 20


def test_ctrl_c_cancels_without_a_point(env, big):
    tmp, _, repo = env
    # Python raises KeyboardInterrupt only where SIGINT has its handler; a
    # process started in the background by a non-interactive shell (CI
    # scripts, `cmd &`) inherits SIGINT ignored, and the signal is lost.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            repo.backup(big, "vm/big", compression="extreme")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
    assert repo.points() == []
    assert repo.verify().ok


def test_gil_is_released_during_backup(env, big):
    _, _, repo = env
    count = 0
    stop = threading.Event()

    def spin():
        nonlocal count
        while not stop.is_set():
            count += 1

    t = threading.Thread(target=spin)
    t.start()
    # Calibrate: the spinner's rate while this thread sleeps (GIL free).
    c0, t0 = count, time.perf_counter()
    time.sleep(0.2)
    rate = (count - c0) / (time.perf_counter() - t0)
    before = count
    stats = repo.backup(big, "vm/big", compression="high")
    during = count - before
    stop.set()
    t.join()
    assert stats.seconds > 0.05, "backup too short to judge"
    # Holding the GIL in Rust would leave the spinner only the few ms around
    # the call (~1 % of this); releasing it lets it run on the spare core.
    assert during > 0.3 * rate * stats.seconds, f"{during} iterations, rate {rate:.0f}/s, {stats.seconds:.2f} s"


def test_error_classes(env):
    tmp, img, repo = env
    with pytest.raises(FileNotFoundError, match="cannot open source"):
        repo.backup(tmp / "missing.raw", "vm/d")
    with pytest.raises(datamover.InvalidInputError, match="bad name"):
        repo.backup(img, "no-slash")
    with pytest.raises(ValueError, match="unknown chunking"):
        repo.backup(img, "vm/d", chunking="rabin")
    with pytest.raises(datamover.InvalidInputError, match="not a datamover repository"):
        datamover.Repository.open(tmp)
    with pytest.raises(datamover.InvalidInputError, match="no restore point"):
        repo.restore("vm/none", tmp / "x.raw")
    with pytest.raises(datamover.InvalidInputError, match="name its disk with --disk"):
        repo.backup("qmp+unix:///vm?socket=/run/none.sock", "vm/d")
    with pytest.raises(datamover.TransportError, match="QMP monitor listens there"):
        repo.backup("qmp+unix:///run/none.qmp", "vm/d", disk="vda")
    with pytest.raises(datamover.TransportError, match="needs a certificates directory"):
        repo.backup("nbds://127.0.0.1/disk", "vm/d")
    with pytest.raises(datamover.TransportError, match="cannot read .*ca-cert.pem"):
        repo.backup("nbds://127.0.0.1/disk", "vm/d", tls_certificates=tmp / "no-certs")
    repo.backup(img, "vm/d")
    with pytest.raises(datamover.InvalidInputError, match="--force"):
        repo.restore("vm/d", img)
    with pytest.raises(FileNotFoundError):
        repo.restore("vm/d", tmp / "no" / "such" / "dir.raw")
    # Unknown format version.
    cfg = tmp / "repo" / "config"
    text = cfg.read_text()
    cfg.write_text(text.replace('"version": 1', '"version": 7'))
    with pytest.raises(datamover.UnsupportedError, match="format version 7"):
        datamover.Repository.open(tmp / "repo")
    cfg.write_text(text)
    # Every class is a DataMoverError.
    for cls in (datamover.CorruptRepositoryError, datamover.TransportError, datamover.UnsupportedError,
                datamover.InvalidInputError, datamover.CancelledError):
        assert issubclass(cls, datamover.DataMoverError)


def test_corrupt_pack_is_reported_by_verify_and_restore(env):
    tmp, img, repo = env
    stats = repo.backup(img, "vm/d")
    packs = sorted((tmp / "repo" / "packs").rglob("*.pack"))
    with open(packs[0], "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    report = repo.verify(read_data=True)
    assert not report.ok and not report
    assert report.damaged_points == [f"vm/d@{stats.point}"]
    with pytest.raises(datamover.CorruptRepositoryError, match=r"damaged chunk .* disk offset"):
        repo.restore("vm/d", tmp / "out.raw")
    assert not (tmp / "out.raw").exists()


def can_mount():
    if os.geteuid() == 0:
        return True
    if IN_CI:
        pytest.fail("CI must run as root")
    return False


def test_full_disk_is_a_transport_error(env):
    if not can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    tmp, img, _ = env
    mnt = tmp / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        repo = datamover.Repository.init(mnt / "repo")
        with pytest.raises(datamover.TransportError, match="no space left"):
            repo.backup(img, "vm/d", compression="none")
        assert repo.points() == []
        assert repo.verify().ok
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def need_qemu_nbd():
    if subprocess.run(["which", "qemu-nbd"], capture_output=True).returncode != 0:
        if IN_CI:
            pytest.fail("qemu-nbd missing in CI")
        pytest.skip("qemu-nbd not installed")


def qemu_nbd(pid, *args):
    """qemu-nbd --fork with a pid file; stop it with stop(pid)."""
    subprocess.run(["qemu-nbd", "--fork", f"--pid-file={pid}", *args], check=True)


def stop(pid):
    """Stop a daemon by its pid file and wait until it is gone (image locks)."""
    p = int(pid.read_text())
    os.kill(p, signal.SIGTERM)
    for _ in range(500):
        if not os.path.exists(f"/proc/{p}"):
            break
        time.sleep(0.02)


def test_nbd_source_against_real_qemu_nbd(env):
    need_qemu_nbd()
    tmp, img, repo = env
    qcow = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qcow)], check=True)
    sock, pid = tmp / "nbd.sock", tmp / "nbd.pid"
    qemu_nbd(pid, "-t", "-r", "-f", "qcow2", "-k", str(sock), "-x", "disk", str(qcow))
    try:
        uri = f"nbd+unix:///disk?socket={sock}"
        stats = repo.backup(uri, "vm/nbd")
        assert stats.transport == "nbd"
        assert stats.bytes_read == 16 << 20, "only allocated extents are read over NBD"
        assert repo.points("vm/nbd")[0].source == uri
        out = tmp / "from-nbd.raw"
        repo.restore("vm/nbd", out)
        assert digest(out) == digest(img)
        with pytest.raises(datamover.TransportError, match='no export named "nope".*offers: disk'):
            repo.backup(f"nbd+unix:///nope?socket={sock}", "vm/nbd")
    finally:
        stop(pid)


def test_cbt_incremental_from_a_dirty_bitmap(env):
    need_qemu_nbd()
    tmp, img, repo = env
    qcow = tmp / "cbt.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qcow)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", str(qcow), "b0"], check=True)
    sock, pid = tmp / "cbt.sock", tmp / "cbt.pid"
    uri = f"nbd+unix:///disk?socket={sock}"

    def serve():
        qemu_nbd(pid, "-t", "-r", "-f", "qcow2", "-B", "b0", "-k", str(sock), "-x", "disk", str(qcow))

    serve()
    try:
        with pytest.raises(datamover.InvalidInputError, match="no previous point"):
            repo.backup(uri, "vm/cbt", bitmap="b0")
        full = repo.backup(uri, "vm/cbt", bitmap="b0", full_if_needed=True, timeout=20)
        assert not full.incremental and "no previous point" in full.full_reason
    finally:
        stop(pid)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 3M 64k", str(qcow)],
                   check=True, capture_output=True)
    serve()
    try:
        inc = repo.backup(uri, "vm/cbt", bitmap="b0")
    finally:
        stop(pid)
    assert inc.incremental and inc.parent == full.point
    assert inc.bytes_changed == 64 << 10 and inc.bytes_read == 1 << 20
    assert inc.to_dict()["change_tracker"] == "qemu:dirty-bitmap:b0"
    out = tmp / "cbt.raw"
    repo.restore("vm/cbt", out)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), str(out)],
                   check=True)

    # Back into a writable NBD export.
    target = tmp / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(32 << 20)], check=True)
    qemu_nbd(pid, "-t", "-f", "qcow2", "-k", str(sock), "-x", "disk", str(target))
    try:
        repo.restore("vm/cbt", uri, timeout=20)
    finally:
        stop(pid)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(qcow), str(target)],
                   check=True)


def test_running_vm_backup_through_modes(env):
    """qemu-storage-daemon as the VM: list its disks, back up the qcow2
    disk automatically (direct storage access here), write as the guest, then an NBD
    incremental that reads only that write; restores match byte for byte."""
    need_qemu_nbd()
    tmp, img, repo = env
    qcow = tmp / "vm.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qcow)], check=True)
    qmp, live, pid = tmp / "qmp.sock", tmp / "live.sock", tmp / "qsd.pid"
    subprocess.run(
        [
            "qemu-storage-daemon",
            "--chardev", f"socket,path={qmp},server=on,wait=off,id=m0",
            "--monitor", "chardev=m0",
            "--blockdev", f"driver=file,filename={qcow},node-name=f0",
            "--blockdev", "driver=qcow2,file=f0,node-name=vda",
            "--nbd-server", f"addr.type=unix,addr.path={live}",
            "--export", "type=nbd,id=guest,node-name=vda,name=vda,writable=on",
            "--pidfile", str(pid), "--daemonize",
        ],
        check=True,
    )
    try:
        address = f"qmp+unix://{qmp}?nbd-server={live}"
        disks = datamover.vm_disks(address)
        assert [(d["node"], d["device"], d["format"]) for d in disks] == [("vda", "guest", "qcow2")]

        s1 = repo.backup(address, "vm/vda", disk="vda")
        assert (s1.transport, s1.incremental) == ("san", False)
        assert s1.checkpoint and s1.checkpoint.startswith("dm-cp-")
        # No guest agent here: crash-consistent, and the run says why.
        assert s1.consistency == "crash" and "names no guest agent" in s1.consistency_reason
        assert repo.points("vm/vda")[0].consistency == "crash"
        # As the guest: 64 KiB after the first point.
        guest = f"nbd+unix:///vda?socket={live}"
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", guest],
                       check=True, capture_output=True)
        now = tmp / "now.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", guest, str(now)], check=True)

        s2 = repo.backup(address, "vm/vda", disk="vda", transport="nbd")
        assert (s2.transport, s2.incremental, s2.bytes_changed) == ("nbd", True, 65536)
        assert s2.change_tracker == f"qemu:dirty-bitmap:{s1.checkpoint}"
        assert s2.to_dict()["checkpoint"] == s2.checkpoint
        out = tmp / "out.raw"
        repo.restore("vm/vda", out)
        assert digest(out) == digest(now)
        assert datamover.vm_disks(address)[0]["checkpoints"] == [s2.checkpoint]
        assert [p.transport for p in repo.points("vm/vda")] == ["san", "nbd"]

        with pytest.raises(datamover.UnsupportedError, match="reflink"):
            repo.backup(address, "vm/vda", disk="vda", transport="storage-snapshot",
                        snapshot_provider="reflink")
        s3 = repo.backup(address, "vm/vda", disk="vda", transport="storage-snapshot",
                         snapshot_provider="reflink", failover_to_network=True)
        assert (s3.transport, s3.failover_from) == ("nbd", "storage-snapshot")
        assert "reflink" in s3.failover_reason
        with pytest.raises(datamover.UnsupportedError, match="cannot be quiesced"):
            repo.backup(address, "vm/vda", disk="vda", quiesce="required")
        with pytest.raises(datamover.InvalidInputError, match="--disk"):
            repo.backup(address, "vm/vda")
    finally:
        stop(pid)


def test_server_runs_a_job_on_its_builtin_proxy(tmp_path):
    """dm-server (built by `cargo test --workspace`) driven from Python."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    exe = os.path.join(root, "target", "debug", "dm-server")
    if not os.path.exists(exe):
        pytest.skip("target/debug/dm-server not built (run cargo test --workspace first)")
    data = tmp_path / "server"
    ds = tmp_path / "ds"  # the built-in proxy's datastore (none by default)
    ds.mkdir()
    srv = subprocess.Popen(
        [exe, "--data", str(data), "--listen", "127.0.0.1:0", "--heartbeat-ms", "200",
         "--datastore", str(ds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if (data / "server.url").exists():
                break
            time.sleep(0.05)
        url = (data / "server.url").read_text().strip()
        s = datamover.Server(url, ca=data / "ca" / "ca.pem", token_file=data / "admin.token")
        img = ds / "disk.raw"
        make_image(img, 8 << 20, [(1 << 20, 2 << 20, "random:5")])
        s.add_repository("main", str(tmp_path / "repo"))
        job = s.create_job(
            {"name": "j1", "kind": "backup", "repository": "main",
             "disks": [{"name": "web/vda", "source": str(img)}]}
        )
        assert job["retries"] == 2 and job["transport"] == "auto"
        sess = s.run_job("j1", wait=True)
        assert sess["state"] == "success", sess
        assert sess["tasks"][0]["proxy"] == "builtin"
        assert s.sessions()[0]["id"] == sess["id"]
        repo = datamover.Repository.open(tmp_path / "repo")
        out = tmp_path / "restored.raw"
        repo.restore("web/vda", out)
        assert digest(out) == digest(img)
        # A restore job runs through the (built-in) proxy too.
        back = ds / "restored-by-job.raw"
        s.create_job(
            {"name": "r1", "kind": "restore", "repository": "main",
             "disks": [{"name": "web/vda", "source": str(back)}]}
        )
        sess = s.run_job("r1", wait=True)
        assert sess["state"] == "success" and sess["kind"] == "restore", sess
        assert digest(back) == digest(img)
        # Restoring over a file that exists needs "overwrite" in the job.
        s.create_job(
            {"name": "r2", "kind": "restore", "repository": "main",
             "disks": [{"name": "web/vda", "source": str(back)}]}
        )
        sess = s.run_job("r2", wait=True)
        assert sess["state"] == "failed" and "overwrite" in sess["tasks"][0]["error"], sess
        s.create_job(
            {"name": "r3", "kind": "restore", "repository": "main", "overwrite": True,
             "disks": [{"name": "web/vda", "source": str(back)}]}
        )
        assert s.run_job("r3", wait=True)["state"] == "success"
        # Named tokens with roles; every change is in the audit log.
        t = s.create_token("auditor1", "auditor", expires_days=1)
        assert t["role"] == "auditor" and t["secret"].startswith("dmt1.") and t["expires"]
        assert any(x["name"] == "auditor1" and "secret" not in x for x in s.tokens())
        aud = datamover.Server(url, ca=data / "ca" / "ca.pem", token=t["secret"])
        assert aud.jobs()
        with pytest.raises(datamover.InvalidInputError, match="may not"):
            aud.run_job("j1")
        log = aud.audit(100)
        assert any(e["who"] == "token:admin" and e["action"] == "POST /api/v1/jobs/r3/run"
                   for e in log), log
        s.revoke_token("auditor1")
        with pytest.raises(datamover.InvalidInputError, match="not valid"):
            aud.jobs()
        # Roles: the host's installer would deploy the proxy (the server
        # hands out the dm-proxy next to it).
        h = s.add_host("h1", ["127.0.0.5"], roles=["proxy"], datastores=["/srv/images"])
        assert h["host"]["roles"] == ["proxy"] and h["enrollment_token"].startswith("dmj1.")
        assert h["host"]["datastores"] == ["/srv/images"]
        assert s.set_host_datastores("h1", [])["datastores"] == []
        with pytest.raises(datamover.InvalidInputError, match="absolute"):
            s.set_host_datastores("h1", ["/srv/../etc"])
        assert s.set_host_roles("h1", [])["roles"] == []
        # A hypervisor: its proxy reports its VMs (none enrolled here).
        kvm = s.add_host("kvm01", hypervisor="qemu:///system")
        assert kvm["host"]["hypervisor"] == "qemu:///system"
        assert s.vms() == []
        with pytest.raises(datamover.InvalidInputError, match="libvirt connection URI"):
            s.add_host("kvm02", hypervisor="not a uri")
        with pytest.raises(datamover.InvalidInputError, match="unknown variant"):
            s.set_host_roles("h1", ["mailserver"])
        # A repository held by a proxy names one the server knows.
        with pytest.raises(datamover.InvalidInputError, match="nobody"):
            s.add_repository("dr", str(tmp_path / "dr"), proxy="nobody")
        with pytest.raises(datamover.InvalidInputError, match="no job named nope"):
            s.run_job("nope")
        # Failover and failback are for replication jobs' VMs.
        with pytest.raises(datamover.InvalidInputError, match="backup job"):
            s.replica_operation("j1", "web", "failover")
        with pytest.raises(ValueError, match="failover, undo or failback"):
            s.replica_operation("j1", "web", "explode")
        assert s.operations() == []
        # Instant recovery is the proxy holding the repository's to serve.
        assert s.recoveries() == []
        with pytest.raises(datamover.InvalidInputError, match="no repository named nope"):
            s.start_recovery("nope", "web")
        with pytest.raises(datamover.InvalidInputError, match="not of VM web"):
            s.start_recovery("main", "web", points=["db/vda"])
        with pytest.raises(datamover.InvalidInputError, match="no recovery"):
            s.migrate_recovery(7, "/srv/prod")
        with pytest.raises(datamover.InvalidInputError, match="no recovery"):
            s.discard_recovery(7)
        # A point's files are read by the proxy holding the repository.
        with pytest.raises(datamover.InvalidInputError, match="not held by a proxy"):
            s.files_ls("main", "web/vda", "/")
        with pytest.raises(datamover.InvalidInputError, match="no repository named nope"):
            s.files_tar("nope", "web/vda", ["/etc"], tmp_path / "x.tar")
        with pytest.raises(datamover.InvalidInputError, match="not valid"):
            datamover.Server(url, ca=data / "ca" / "ca.pem", token="wrong").jobs()
    finally:
        srv.kill()
        srv.wait()


def test_image_files_are_read_as_their_disk(env):
    need_qemu_nbd()
    tmp, img, repo = env
    qcow = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qcow)], check=True)
    stats = repo.backup(qcow, "vm/qcow")
    assert stats.bytes_total == 32 << 20
    p = repo.points("vm/qcow")[0]
    assert p.source_kind == "qcow2"
    assert p.consistency is None, "not a running guest"
    out = tmp / "from-qcow.raw"
    repo.restore("vm/qcow", out)
    assert digest(out) == digest(img)
    # format="raw": the container's bytes, on purpose.
    repo.backup(qcow, "vm/bytes", format="raw")
    assert repo.points("vm/bytes")[0].size == os.path.getsize(qcow)
    with pytest.raises(ValueError, match="unknown image format"):
        repo.backup(qcow, "vm/x", format="iso")
    with pytest.raises(ValueError, match="unknown quiesce mode"):
        repo.backup(qcow, "vm/x", quiesce="sometimes")


def test_libvirt_front_doors_on_libvirts_test_driver(env):
    """vms() and vm_disks() through libvirt's own in-process test driver
    (test:///default, no daemon); backups of real libvirt guests are
    tested in Rust against libvirtd."""
    tmp, img, repo = env
    doms = datamover.vms("libvirt:///?uri=test:///default")
    assert [(d["name"], d["state"]) for d in doms] == [("test", "running")]
    disks = datamover.vm_disks("libvirt:///test?uri=test:///default")
    assert disks == [{"target": "vda", "format": "raw", "source": "/guest/diskimage1"}]
    with pytest.raises(datamover.InvalidInputError, match="no domain"):
        datamover.vm_disks("libvirt:///nope?uri=test:///default")
    with pytest.raises(datamover.UnsupportedError, match="libvirt VMs"):
        repo.backup_vm("qmp+unix:///run/vm.qmp", "vm")
    with pytest.raises(ValueError, match="bad libvirt address"):
        datamover.vms("libvirt:///a/b")
    repo.backup(img, "plain/vda")
    with pytest.raises(datamover.InvalidInputError, match="stores a VM definition"):
        repo.restore_vm("plain", tmp, uri="test:///default")
    # Replicas: synced (written whole, then nothing), listed; a VM starts
    # on them only from a point that stored its definition.
    replicas = tmp / "replicas"
    first = repo.replica_sync("plain", replicas)
    assert first[0]["bytes_written"] > 0 and first[0]["base"] is None
    again = repo.replica_sync("plain", replicas)
    assert again[0]["bytes_written"] == 0 and again[0]["base"] == first[0]["point"]
    assert digest(replicas / "plain" / "vda.img") == digest(img)
    listed = repo.replicas("plain", replicas)
    assert listed[0]["disk"] == "plain/vda" and listed[0]["state"].startswith("applied ")
    with pytest.raises(datamover.InvalidInputError, match="VM definition"):
        repo.failover("plain", replicas, on="libvirt:///p?uri=test:///default")
    with pytest.raises(ValueError, match="bad libvirt address"):
        repo.migrate_vm("qmp+unix:///run/vm.qmp", "libvirt:///x", replicas, vm="plain")


def test_a_point_is_exported_over_nbd(env):
    """Repository.export: a background NBD server of a point; read back
    here through a second repository's backup of it (our NBD client), and
    by nbdcopy where it is installed; writes go to an overlay."""
    tmp, img, repo = env
    repo.backup(img, "web01/vda")
    sock = tmp / "e.sock"
    with repo.export("web01/vda", f"unix:{sock}") as ex:
        assert ex.uri.startswith("nbd+unix:///web01/vda?socket=")
        other = datamover.Repository.init(tmp / "other")
        st = other.backup(ex.uri, "copy/vda")
        assert st.bytes_total == 32 << 20 and st.bytes_read == 16 << 20, "holes come as holes"
        out = tmp / "copy.raw"
        other.restore("copy/vda", out)
        assert digest(out) == digest(img)
        if shutil.which("nbdcopy"):
            out2 = tmp / "nbdcopy.raw"
            subprocess.run(["nbdcopy", ex.uri, str(out2)], check=True)
            assert digest(out2) == digest(img)
    assert not sock.exists()
    got = ex.stop()
    assert got is None  # already stopped by the with block
    ro = repo.export("web01/vda", f"unix:{tmp / 'ro.sock'}")
    with pytest.raises(datamover.InvalidInputError, match="read-only"):
        repo.restore("web01/vda", ro.uri, force=True)
    assert ro.stop()["chunks_loaded"] >= 0
    with pytest.raises(datamover.InvalidInputError, match="no restore point|not found|no point"):
        repo.export("web01/none", f"unix:{tmp / 'x.sock'}")


def test_instant_recovery_front_door(env):
    """Repository.instant_recover and the session calls: what a point
    without a VM definition, an unknown VM or session get; sessions of an
    empty directory. A real guest's recovery, migration and discard run
    through the same library calls in the Rust tests (transports and the
    CLI) against libvirtd."""
    tmp, img, repo = env
    repo.backup(img, "plain/vda")
    sessions = tmp / "sessions"
    assert datamover.instant_sessions(dir=sessions) == []
    with pytest.raises(datamover.InvalidInputError, match="stores a VM definition"):
        repo.instant_recover(["plain"], on="libvirt:///p?uri=test:///default", dir=sessions)
    with pytest.raises(datamover.InvalidInputError, match="no disk of VM nope"):
        repo.instant_recover(["nope"], dir=sessions)
    with pytest.raises(datamover.InvalidInputError, match="no instant recovery session"):
        datamover.instant_migrate("x", tmp / "prod", dir=sessions)
    with pytest.raises(datamover.InvalidInputError, match="no instant recovery session"):
        datamover.instant_discard("x", dir=sessions)
    with pytest.raises(datamover.InvalidInputError, match="cannot name"):
        datamover.instant_discard("../etc", dir=sessions)


@pytest.mark.skipif(
    not shutil.which("guestfish") or not shutil.which("mkfs.ext4"),
    reason="needs libguestfs (guestfish) and e2fsprogs",
)
def test_files_of_a_point(tmp_path):
    """Repository.files: an ext4 disk made with mkfs.ext4 -d (no mount),
    read by one libguestfs appliance: listed, copied with its mode and
    times, and written as a tar archive."""
    import os
    import tarfile

    src = tmp_path / "tree"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "a.txt").write_bytes(b"hello from a point\n")
    os.chmod(src / "dir" / "a.txt", 0o640)
    os.utime(src / "dir" / "a.txt", (1_600_000_000, 1_600_000_000))
    os.symlink("a.txt", src / "dir" / "link")
    img = tmp_path / "fs.raw"
    subprocess.run(
        ["mkfs.ext4", "-q", "-d", str(src), str(img), "32M"], check=True
    )
    repo = datamover.Repository.init(tmp_path / "repo")
    repo.backup(img, "vm/data")
    with repo.files("vm/data") as f:
        fss = f.filesystems()
        assert [(x["name"], x["fstype"]) for x in fss] == [("sda", "ext4")]
        top = f.ls()
        assert top[0]["kind"] == "filesystem"
        names = {e["name"]: e for e in f.ls("/dir")}
        assert names["a.txt"]["mode"] == 0o640 and names["a.txt"]["size"] == 19
        assert names["link"]["kind"] == "symlink" and names["link"]["target"] == "a.txt"
        out = tmp_path / "out"
        out.mkdir()
        got = f.get(["/dir"], out)
        assert got["files"] == 1 and got["symlinks"] == 1
        assert (out / "dir" / "a.txt").read_bytes() == b"hello from a point\n"
        st = os.stat(out / "dir" / "a.txt")
        assert (st.st_mode & 0o7777, int(st.st_mtime)) == (0o640, 1_600_000_000)
        assert os.readlink(out / "dir" / "link") == "a.txt"
        with pytest.raises(datamover.InvalidInputError, match="exists"):
            f.get(["/dir"], out)
        with pytest.raises(datamover.InvalidInputError, match="no such file"):
            f.ls("/nope")
        f.tar(["/dir"], tmp_path / "dir.tar")
        with tarfile.open(tmp_path / "dir.tar") as t:
            members = {m.name: m for m in t.getmembers()}
            assert set(members) == {"dir", "dir/a.txt", "dir/link"}
            assert members["dir/a.txt"].mode == 0o640
            assert t.extractfile("dir/a.txt").read() == b"hello from a point\n"
    with pytest.raises(ValueError, match="closed"):
        f.ls("/")
