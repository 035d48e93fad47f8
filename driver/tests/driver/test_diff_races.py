"""Diff and changes of a running container whose process rearranges its tree meanwhile
(issue 11, finding 2): a directory swapped for a symlink to a host directory, in a loop,
must never get a host file's name or content into `docker diff`, `docker commit` (the
native Diff) or the naive Diff. Everything is read through directory descriptors."""

from __future__ import annotations

import os
import threading

from layer_tools import TarBuilder, make_layer, new_id, read_tar

from cvmfs_graphdriver.errors import DriverError

SECRET = "host-secret-file"
CONTENT = b"read from the host"
TRIES = 300


def test_a_directory_swapped_for_a_symlink_to_the_host_is_never_followed(drv, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / SECRET).write_bytes(CONTENT)
    base = make_layer(drv, data=TarBuilder().file("etc/hostname", b"base").bytes())
    rw = new_id()
    drv.create(rw, base, "", None, read_write=True)
    view = drv.get(rw)
    stop = threading.Event()

    def swap() -> None:  # what a process in the container can do
        real, link = os.path.join(view, "x"), os.path.join(view, "x.link")
        while not stop.is_set():
            os.makedirs(real, exist_ok=True)
            with open(os.path.join(real, "own"), "wb") as f:
                f.write(b"mine")
            os.symlink(str(host), link)
            os.rename(link, real + ".tmp")
            os.rename(real, real + ".dir")
            os.rename(real + ".tmp", real)  # now x -> the host directory
            os.unlink(real)
            os.rename(real + ".dir", real)  # and back
            os.unlink(os.path.join(real, "own"))
            os.rmdir(real)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    seen_refusals = 0
    try:
        for _ in range(TRIES):
            names = [c.path for c in drv.changes(rw, base)]
            assert not any(SECRET in n for n in names), names
            for parent in (base, ""):  # native (docker commit) and naive Diff
                out = tmp_path / "diff.tar"
                try:
                    with open(out, "wb") as f:
                        drv.diff(rw, parent, f)
                except DriverError as e:  # "changed while being archived; try again"
                    assert "try again" in str(e)
                    seen_refusals += 1
                    continue
                data = out.read_bytes()
                assert CONTENT not in data
                assert not any(SECRET in n for n in read_tar(data))
    finally:
        stop.set()
        swapper.join(10)
        drv.put(rw)
    print(f"{TRIES} tries, {seen_refusals} diffs refused as changed under us")
