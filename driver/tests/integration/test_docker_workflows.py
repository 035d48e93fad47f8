"""What a Docker user does with `dockerd --experimental -s <plugin>` backed by our daemon.

Every test drives a real private dockerd through the `docker` CLI (or the Engine API
where the CLI only prints rounded numbers) and checks what the user would see: output,
exit codes, files in containers and images, `docker diff`/`export`/`save` contents,
disk space given back, containers surviving daemon and driver restarts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Dict, List

import pytest
from dockerutil import (
    api_get,
    build,
    container_ids,
    driver_home,
    home_usage,
    image_exists,
    image_ids,
    inspect,
    layer_dirs,
    mount_points,
    mounts_below,
    tar_files,
    unique_base,
)
from harness import Dockerd, running

pytestmark = pytest.mark.docker

BUSYBOX_SIZE = os.path.getsize("/bin/busybox") if os.path.exists("/bin/busybox") else 0


def run(d: Dockerd, *args: str, check: bool = True):
    """`docker run --rm --network none ...` in the foreground."""
    return d.docker("run", "--rm", "--network", "none", *args, check=check)


def status_rows(d: Dockerd) -> Dict[str, str]:
    return {k: v for k, v in d.info()["DriverStatus"]}


def layer_count(d: Dockerd, image: str) -> int:
    return len(inspect(d, image)[0]["RootFS"]["Layers"])


# ----------------------------------------------------------------------------- docker info


def test_info_reports_driver_and_status(docker_clean):
    d = docker_clean
    plugin = d.storage_driver
    info = d.info()
    assert info["Driver"] == plugin
    rows = {k: v for k, v in info["DriverStatus"]}
    home = driver_home(d)
    assert rows["Driver Home"] == home
    assert rows["Backing Filesystem"] and not rows["Backing Filesystem"].startswith("unknown"), rows
    assert rows["Supports d_type"] == "true"
    assert rows["Native Overlay Diff"] in ("true", "false")
    assert int(rows["Layers"]) == len(layer_dirs(home)) >= 1  # busybox at least
    assert int(rows["Mounted Layers"]) == len([p for p in mounts_below(home)])
    assert rows["Driver Version"]

    text = d.out("info")
    assert f"Storage Driver: {plugin}\n" in text
    for key in ("Backing Filesystem", "Supports d_type", "Layers", "Driver Home"):
        assert f"  {key}: {rows[key]}\n" in text, key


# ----------------------------------------------------------------------------- run / exec


def test_run_prints_output_and_returns_exit_codes(docker_clean, busybox):
    d = docker_clean
    r = run(d, busybox, "sh", "-c", "echo hello; echo oops >&2; head -1 /etc/passwd")
    assert r.returncode == 0
    assert r.stdout.decode() == "hello\nroot:x:0:0:root:/root:/bin/sh\n"
    assert r.stderr.decode() == "oops\n"

    assert run(d, busybox, "sh", "-c", "exit 7", check=False).returncode == 7
    assert run(d, busybox, "false", check=False).returncode == 1
    r = run(d, busybox, "/no/such/program", check=False)
    assert r.returncode == 127, r.stderr
    assert b"no such file or directory" in r.stderr.lower()

    # Each container starts from the image, not from what the previous one wrote.
    run(d, busybox, "sh", "-c", "echo scribble > /etc/passwd")
    assert run(d, busybox, "head", "-1", "/etc/passwd").stdout.startswith(b"root:x:0:0")


def test_exec_into_running_container(docker_clean, busybox):
    d = docker_clean
    with running(d, busybox, "sh", "-c", "echo from-main > /tmp/main; exec sleep 1000") as cid:
        deadline = time.monotonic() + 20
        while d.docker("exec", cid, "test", "-e", "/tmp/main", check=False).returncode:
            assert time.monotonic() < deadline, "the container's main process never wrote"
            time.sleep(0.1)
        assert d.out("exec", cid, "cat", "/tmp/main") == "from-main\n"
        d.docker("exec", cid, "sh", "-c", "echo from-exec > /root/x && rm /etc/group")
        assert d.out("exec", cid, "cat", "/root/x") == "from-exec\n"
        assert d.docker("exec", cid, "test", "-e", "/etc/group", check=False).returncode == 1
        assert d.docker("exec", cid, "sh", "-c", "exit 3", check=False).returncode == 3
        assert inspect(d, cid)[0]["State"]["Running"] is True
        assert inspect(d, cid)[0]["GraphDriver"]["Name"] == d.storage_driver


# ----------------------------------------------------------------------------- commit / build


def test_commit_keeps_additions_and_deletions(docker_clean, busybox):
    d = docker_clean
    tag = "cgdtest/commit:1"
    with running(d, busybox, "sleep", "1000") as cid:
        d.docker("exec", cid, "sh", "-c",
                 "rm /etc/group && rm -rf /var && mkdir -p /opt/app && echo v1 > /opt/app/conf")
        d.docker("commit", "-c", 'CMD ["cat", "/opt/app/conf"]', cid, tag)
    assert layer_count(d, tag) == layer_count(d, busybox) + 1
    assert run(d, tag).stdout == b"v1\n"
    r = run(d, tag, "sh", "-c", "test -e /etc/group; echo $?; test -e /var; echo $?; "
            "head -1 /etc/passwd")
    assert r.stdout.decode() == "1\n1\nroot:x:0:0:root:/root:/bin/sh\n"

    # A commit of a commit: delete something the first one added, change another file.
    with running(d, tag, "sleep", "1000") as cid:
        d.docker("exec", cid, "sh", "-c", "rm -rf /opt/app && echo v2 > /etc/motd")
        d.docker("stop", "-t", "0", cid)
        d.docker("commit", cid, "cgdtest/commit:2")
    r = run(d, "cgdtest/commit:2", "sh", "-c", "ls -A /opt; cat /etc/motd")
    assert r.stdout == b"v2\n"


def test_build_with_run_steps_that_write_and_delete(docker_clean, busybox, scratch):
    d = docker_clean
    tag = "cgdtest/build:1"
    containers = container_ids(d)
    dockerfile = f"""FROM {busybox}
RUN mkdir -p /app/data/sub && echo one > /app/data/sub/f && echo keep > /app/keep \\
    && echo gone > /app/tmpfile
RUN rm -rf /app/data /app/tmpfile /etc/group /var/empty && echo two >> /app/keep
RUN mkdir /app/data && echo new > /app/data/g
COPY hello.txt /app/hello.txt
CMD ["cat", "/app/keep"]
"""
    build(d, os.path.join(scratch, "ctx"), tag, dockerfile, {"hello.txt": b"hello from COPY\n"})
    assert container_ids(d) == containers, "the build left intermediate containers"
    assert layer_count(d, tag) == layer_count(d, busybox) + 4

    assert run(d, tag).stdout == b"keep\ntwo\n"
    r = run(d, tag, "sh", "-c",
            "ls -A /app; ls -A /app/data; cat /app/data/g /app/hello.txt; "
            "test -e /etc/group; echo group=$?; test -e /var/empty; echo empty=$?; ls -A /var")
    assert r.stdout.decode() == (
        "data\nhello.txt\nkeep\n"  # /app/tmpfile gone
        "g\n"  # the re-created /app/data does not show the deleted sub/
        "new\nhello from COPY\n"
        "group=1\nempty=1\n"
    )


# ----------------------------------------------------------------------------- diff / export

DIFF_SCRIPT = (
    "echo x >> /etc/passwd; rm /etc/group; touch /new; mkdir -p /d1/d2; echo y > /d1/d2/f; "
    "rm -rf /var/empty; chmod 700 /tmp; mkdir /root/sub; rm /bin/yes; ln -s /new /link; "
    "mv /bin/uname /bin/uname2"
)
# What overlay2 reports for DIFF_SCRIPT (its order is readdir order, so compare sorted).
DIFF_EXPECTED = sorted("""\
C /bin
A /bin/uname2
D /bin/uname
D /bin/yes
A /new
C /root
A /root/sub
C /tmp
C /var
D /var/empty
A /d1
A /d1/d2
A /d1/d2/f
C /etc
C /etc/passwd
D /etc/group
A /link""".splitlines())


def _exited_container(d: Dockerd, image: str, script: str) -> str:
    cid = d.out("run", "-d", "--network", "none", image, "sh", "-c", script).strip()
    assert d.out("wait", cid).strip() == "0", d.out("logs", cid)
    return cid


def test_diff_lists_exact_changes(docker_clean, busybox):
    d = docker_clean
    cid = _exited_container(d, busybox, DIFF_SCRIPT)
    assert sorted(d.out("diff", cid).splitlines()) == DIFF_EXPECTED
    # The same for a running container (its layer is mounted while we ask).
    with running(d, busybox, "sh", "-c", DIFF_SCRIPT + "; exec sleep 1000") as rid:
        deadline = time.monotonic() + 20
        while d.docker("exec", rid, "test", "-e", "/bin/uname2", check=False).returncode:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert sorted(d.out("diff", rid).splitlines()) == DIFF_EXPECTED
    # A fresh container has no changes at all (its init layer is not shown).
    fresh = d.out("create", "--network", "none", busybox, "true").strip()
    assert d.out("diff", fresh) == ""


def test_export_contains_the_changes(docker_clean, busybox):
    d = docker_clean
    cid = _exited_container(d, busybox, DIFF_SCRIPT)
    files = tar_files(d.docker("export", cid).stdout)
    assert files["d1/d2/f"] == b"y\n"
    assert files["new"] == b""
    assert "link" in files
    assert files["etc/passwd"].endswith(b"\nx\n")
    assert files["bin/busybox"][:4] == b"\x7fELF"
    assert "bin/uname2" in files
    for gone in ("etc/group", "var/empty", "bin/yes", "bin/uname"):
        assert gone not in files, gone
    assert not [n for n in files if os.path.basename(n).startswith(".wh.")]


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(docker_clean, scratch):
    d = docker_clean
    base = unique_base(d, scratch, "cgdtest/saveload-base:1")
    tag = "cgdtest/saveload:1"
    build(d, os.path.join(scratch, "ctx"), tag,
          f"FROM {base}\nRUN echo saved > /saved && rm /etc/group && rm -rf /var\n"
          "RUN mkdir -p /deep/er && echo deep > /deep/er/f\n")
    image_id = inspect(d, tag)[0]["Id"]
    archive = os.path.join(scratch, "image.tar")
    d.docker("save", "-o", archive, tag)
    d.docker("rmi", tag, base)
    assert not image_exists(d, tag) and not image_exists(d, base)

    # The saved layers are what the driver reproduced: check the middle one by hand.
    with open(archive, "rb") as f:
        saved = f.read()
    files = tar_files(saved)
    manifest = json.loads(files["manifest.json"])
    assert manifest[0]["RepoTags"] == [tag]
    layer_tars = manifest[0]["Layers"]
    assert len(layer_tars) == 3
    middle = tar_files(files[layer_tars[1]])
    assert middle["saved"] == b"saved\n"
    assert "etc/.wh.group" in middle and ".wh.var" in middle

    out = d.out("load", "-i", archive)
    assert f"Loaded image: {tag}" in out
    assert inspect(d, tag)[0]["Id"] == image_id
    r = run(d, tag, "sh", "-c", "cat /saved /deep/er/f; test -e /etc/group; echo $?; "
            "test -e /var; echo $?")
    assert r.stdout.decode() == "saved\ndeep\n1\n1\n"


# ----------------------------------------------------------------------------- registry


def test_push_rmi_pull_run(docker_clean, registry, scratch):
    d = docker_clean
    home = driver_home(d)
    layers_before = layer_dirs(home)
    base = unique_base(d, scratch, "cgdtest/pushpull-base:1")
    local = "cgdtest/pushpull:1"
    build(d, os.path.join(scratch, "ctx"), local,
          f"FROM {base}\nRUN mkdir -p /srv/www && echo pushed > /srv/www/index.html "
          "&& rm -rf /root\nRUN echo second > /second && chmod 4755 /second\n")
    image_id = inspect(d, local)[0]["Id"]
    ref = f"{registry.address}/cgdtest/pushpull:1"
    d.docker("tag", local, ref)
    d.docker("push", ref)
    d.docker("rmi", ref, local, base)
    assert not image_exists(d, ref)
    assert layer_dirs(home) == layers_before, "rmi left the image's layers behind"

    out = d.out("pull", ref)
    assert "Pull complete" in out
    assert inspect(d, ref)[0]["Id"] == image_id
    r = run(d, ref, "sh", "-c",
            "cat /srv/www/index.html /second; test -e /root; echo $?; stat -c %a /second")
    assert r.stdout.decode() == "pushed\nsecond\n1\n4755\n"


def test_parallel_pulls_of_multi_layer_images(docker_clean, registry, scratch):
    d = docker_clean
    images: List[str] = []
    sums: Dict[str, str] = {}
    check = "cat /l1 /l2 /l3 /etc/image-id | sha256sum; ls /gone 2>&1 | wc -l"
    for i in range(3):
        base = unique_base(d, scratch, f"cgdtest/par-base{i}:1")
        local = f"cgdtest/par{i}:1"
        build(d, os.path.join(scratch, f"ctx{i}"), local,
              f"FROM {base}\n"
              "RUN head -c 1500000 /dev/urandom > /l1 && mkdir /gone && touch /gone/x\n"
              "RUN head -c 1500000 /dev/urandom > /l2 && rm -rf /gone\n"
              "RUN head -c 1500000 /dev/urandom > /l3\n")
        assert layer_count(d, local) == 4
        ref = f"{registry.address}/cgdtest/par{i}:1"
        d.docker("tag", local, ref)
        d.docker("push", ref)
        sums[ref] = run(d, ref, "sh", "-c", check).stdout.decode()
        d.docker("rmi", ref, local, base)
        images.append(ref)

    errors: List[BaseException] = []

    def pull(ref: str) -> None:
        try:
            d.docker("pull", ref)
        except BaseException as e:  # noqa: B902 (reported by the main thread)
            errors.append(e)

    home = driver_home(d)
    applying: List[int] = []  # layers being applied at once, sampled while the pulls run
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            applying.append(sum(os.path.exists(os.path.join(home, n, ".applying"))
                                for n in layer_dirs(home)))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=pull, args=(ref,)) for ref in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    sampler.join()
    assert not errors, errors
    # dockerd applies the layers of different images at the same time: a server that
    # handled one call at a time would never have two layers half-applied.
    assert max(applying) >= 2, f"layers were applied one at a time ({max(applying)})"
    for ref in images:
        assert layer_count(d, ref) == 4
        assert run(d, ref, "sh", "-c", check).stdout.decode() == sums[ref]
    assert not [n for n in layer_dirs(home)
                if os.path.exists(os.path.join(home, n, ".applying"))]
    assert home_usage(home).staging == 0


# ----------------------------------------------------------------------------- disk usage


def test_system_df_sizes_are_plausible(docker_clean, busybox):
    d = docker_clean
    mib3 = 3 * 1024 * 1024
    cid = _exited_container(d, busybox, f"head -c {mib3} /dev/zero > /blob")
    df = api_get(d, "/system/df")
    images = {tuple(i["RepoTags"] or []): i for i in df["Images"]}
    bb = images[(busybox,)]
    assert BUSYBOX_SIZE <= bb["Size"] <= BUSYBOX_SIZE + 64 * 1024, bb
    assert df["LayersSize"] >= bb["Size"]
    (ctr,) = [c for c in df["Containers"] if c["Id"] == cid]
    assert mib3 <= ctr["SizeRw"] <= mib3 + 64 * 1024, ctr
    assert ctr["SizeRootFs"] == ctr["SizeRw"] + bb["Size"]

    # The same numbers, as the CLI prints them.
    assert d.out("ps", "-a", "-s", "--filter", f"id={cid}", "--format",
                 "{{.Size}}").startswith("3.15MB (virtual ")
    rows = dict(line.split("\t", 1) for line in d.out(
        "system", "df", "--format", "{{.Type}}\t{{.Size}}").splitlines())
    assert rows["Images"] not in ("0B", "0") and rows["Containers"] not in ("0B", "0"), rows


def test_rm_and_rmi_give_the_disk_back(docker_clean, scratch):
    d = docker_clean
    home = driver_home(d)
    before = home_usage(home)
    base = unique_base(d, scratch, "cgdtest/space-base:1")
    tag = "cgdtest/space:1"
    build(d, os.path.join(scratch, "ctx"), tag,
          f"FROM {base}\nRUN head -c 2000000 /dev/urandom > /blob1\n"
          "RUN head -c 2000000 /dev/urandom > /blob2 && rm /blob1\n")
    cid = _exited_container(d, tag, "head -c 1000000 /dev/urandom > /blob3")
    during = home_usage(home)
    # 3 image layers, plus the container's layer and its init layer
    assert during.layers == before.layers + 5, (before, during)
    assert during.links == before.links + 5, (before, during)
    assert during.bytes >= before.bytes + BUSYBOX_SIZE + 5_000_000, (before, during)

    d.docker("rm", cid)
    mid = home_usage(home)
    assert mid.layers == before.layers + 3
    assert during.bytes - mid.bytes >= 1_000_000
    d.docker("rmi", tag, base)
    after = home_usage(home)
    assert after == before, f"before: {before}; after: {after}"


# ----------------------------------------------------------------------------- restarts


def test_moby_plugin_e2e_survives_dockerd_restart(docker_clean, busybox):
    """moby's integration/plugin/graphdriver test, step by step."""
    d = docker_clean
    name = "cgd-e2e-hello"
    d.docker("run", "--name", name, "--network", "none", busybox, "sh", "-c",
             "echo hello > /hello")
    images = image_ids(d)
    d.restart()
    assert d.info()["Driver"] == d.storage_driver
    (c,) = inspect(d, name)
    assert c["GraphDriver"]["Name"] == d.storage_driver
    assert d.out("diff", name) == "A /hello\n"
    assert image_ids(d) == images
    d.docker("rm", name)
    assert d.docker("inspect", name, check=False).returncode != 0


def test_dockerd_restart_keeps_containers_and_their_files(docker_clean, busybox):
    d = docker_clean
    home = driver_home(d)
    with running(d, "--stop-timeout", "1", busybox, "sh", "-c",
                 "echo state > /state; exec sleep 1000") as cid:
        deadline = time.monotonic() + 20
        while d.docker("exec", cid, "test", "-e", "/state", check=False).returncode:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        d.restart()
        # Without live-restore dockerd stops its containers on the way down; the driver
        # is asked to unmount everything (Cleanup) and nothing stays mounted.
        (c,) = inspect(d, cid)
        assert c["State"]["Running"] is False
        assert mounts_below(home) == []
        d.docker("start", cid)
        assert d.out("exec", cid, "cat", "/state") == "state\n"
        assert run(d, busybox, "true").returncode == 0


@pytest.fixture
def driver_revived(driver_proc):
    """Make sure the session's driver is serving again after a test that killed it."""
    yield driver_proc
    if driver_proc.proc is None or driver_proc.proc.poll() is not None:
        driver_proc.start()


def test_driver_kill9_and_restart_under_a_running_container(docker_clean, busybox,
                                                            driver_revived, scratch):
    d, drv = docker_clean, driver_revived
    home = driver_home(d)
    with running(d, busybox, "sh", "-c", "echo before > /before; exec sleep 1000") as cid:
        deadline = time.monotonic() + 20
        while d.docker("exec", cid, "test", "-e", "/before", check=False).returncode:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (c,) = inspect(d, cid)
        merged, pid = c["GraphDriver"]["Data"]["MergedDir"], c["State"]["Pid"]
        assert merged in mount_points()

        drv.kill9()
        # The container does not notice: its overlay stays mounted in the host namespace
        # and its process keeps reading its files (seen here through the kernel, since
        # dockerd itself needs the driver to answer for `docker exec`).
        assert merged in mount_points()
        os.kill(pid, 0)
        with open(f"/proc/{pid}/root/before") as f:
            assert f.read() == "before\n"
        drv.start()

        (c,) = inspect(d, cid)
        assert c["State"]["Running"] is True
        assert c["GraphDriver"]["Name"] == d.storage_driver
        assert d.out("exec", cid, "sh", "-c", "echo after > /after; cat /before /after; "
                     "ls /bin/busybox") == "before\nafter\n/bin/busybox\n"
        rows = status_rows(d)
        assert int(rows["Mounted Layers"]) == len(mounts_below(home)) == 1, rows
        assert sorted(d.out("diff", cid).splitlines()) == ["A /after", "A /before"]

        d.docker("stop", "-t", "0", cid)
        assert merged not in mount_points(), "stopping the container left its layer mounted"
        assert mounts_below(home) == []
        assert status_rows(d)["Mounted Layers"] == "0"

        d.docker("commit", cid, "cgdtest/after-kill:1")
        r = run(d, "cgdtest/after-kill:1", "cat", "/before", "/after")
        assert r.stdout == b"before\nafter\n"

        d.docker("start", cid)
        assert d.out("exec", cid, "cat", "/after") == "after\n"
    assert d.docker("inspect", cid, check=False).returncode != 0
    assert mounts_below(home) == []
    build(d, os.path.join(scratch, "ctx"), "cgdtest/after-kill:2",
          "FROM cgdtest/after-kill:1\nRUN rm /before\n")
    assert run(d, "cgdtest/after-kill:2", "ls", "/before", check=False).returncode != 0

