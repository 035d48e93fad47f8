"""Thin images end to end (issue 3): a real dockerd using our plugin, a real local
registry and the real `cvmfs-thin` tool.

The repositories are the `cvmfs` session fixture's (harness.CvmfsRepos): test.repo and
ducc.repo live on a real CernVM-FS stratum 0 on this machine (scripts/cvmfs.sh) and the
driver reads them through real client mounts at `<cvmfs.root>/<repo>`; `cvmfs-thin
--store cvmfs:test.repo` publishes into the real server, and DUCC-shaped trees made by
hand are published as DUCC publishes them (`cvmfs.put_tree`: `cvmfs_server ingest`).
dir.repo is a plain directory tree, the `dir:` store's own case. Without CernVM-FS the
fixture falls back, loudly, to directories standing in for the repositories (CI
refuses that).

Issue 3's test list, and where it is covered: convert / push / pull / run / same view
as the source / build and commit on top / push and pull the results
(test_convert_push_pull_run_build_commit); a hand-made DUCC tree with literal `.wh.*`
files (test_ducc_tree_with_literal_whiteout_files); every malicious descriptor refused,
nothing mounted (test_malicious_descriptor_is_refused_at_pull,
test_symlink_out_of_the_repository_is_refused); a missing layer
(test_missing_layer_fails_with_the_documented_message); `--flat` vs per-layer
(test_flat_and_per_layer_give_the_same_view). The other tests cover the rest of the
issue: deep images, Status/GetMetadata, the `cvmfs:` store, re-runs, `cvmfs-thin`'s
errors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence

import pytest
from dockerutil import build, driver_home, layer_dirs
from harness import Dockerd, busybox_rootfs, export_manifest

from cvmfs_graphdriver.publish import records

pytestmark = pytest.mark.docker

KIB = 1024
MB = 1000 * 1000

# ---------------------------------------------------------------------------- helpers


ROOT_CONFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "conftest.py")


@pytest.fixture(scope="module", autouse=True)
def _publisher_extra(request) -> None:
    """The tests/conftest.py `need` (skip locally, fail in CI): `import conftest` here
    would find integration/conftest.py, so take the registered plugin."""
    root = next(p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__file__", None) == ROOT_CONFTEST)
    root.need(importlib.util.find_spec("docker") is not None,
              "cvmfs-thin needs the docker SDK (pip install 'cvmfs-graphdriver[publisher]')")


def cvmfs_thin(d: Dockerd, *args: str, check: bool = True,
               env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run the real `cvmfs-thin` against the daemon that uses our driver."""
    r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver.publish.cli", *args],
                       env={**os.environ, "DOCKER_HOST": d.host, **(env or {})},
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"cvmfs-thin {' '.join(args[:3])} failed ({r.returncode}):\n"
                             f"{r.stderr[-3000:]}\n{r.stdout[-2000:]}")
    return r


def overlay_mounts(d: Dockerd) -> List[str]:
    """Overlay mounts under the driver home, as the kernel lists them."""
    home = driver_home(d).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            fstype = fields[fields.index("-") + 1]
            if fstype == "overlay" and fields[4].startswith(home):
                out.append(fields[4])
    return sorted(out)


def sh(d: Dockerd, image: str, script: str, *opts: str) -> str:
    return d.out("run", "--rm", "--network", "none", *opts, image, "sh", "-c", script)


def image_size(d: Dockerd, ref: str) -> int:
    return int(d.out("image", "inspect", "--format", "{{.Size}}", ref).strip())


def image_id(d: Dockerd, ref: str) -> str:
    return d.out("image", "inspect", "--format", "{{.Id}}", ref).strip()


def diff_ids(d: Dockerd, ref: str) -> List[str]:
    layers = json.loads(d.out("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref))
    return [x.split(":", 1)[1] for x in layers]


def export_of(d: Dockerd, image: str) -> Dict[str, tuple]:
    cid = d.out("create", "--network", "none", image, "true").strip()
    try:
        return export_manifest(d.docker("export", cid).stdout)
    finally:
        d.docker("rm", "-f", cid, check=False)


def as_published(cvmfs, view: Dict[str, tuple]) -> Dict[str, tuple]:
    """A container view as it comes back from a repository. CernVM-FS splits hard links
    (`cvmfs_server publish`/`ingest` store each name as its own file, nlink 1), so on
    real CVMFS a hard link reads as a copy of its target; nothing else may differ."""
    if not cvmfs.real:
        return view
    return {name: (view[entry[6]] if entry[0] == "1" else entry) for name, entry in view.items()}


def assert_same_view(a: Dict[str, tuple], b: Dict[str, tuple], what: str) -> None:
    if a == b:
        return
    lines = [f"{what}: container views differ"]
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            lines.append(f"  {name!r}:\n    first:  {a.get(name)}\n    second: {b.get(name)}")
    raise AssertionError("\n".join(lines[:40]))


def descriptor_tar(data: bytes) -> bytes:
    """A layer tar holding only thin.json with `data`: what `docker import` turns into a
    one-layer image (the driver sees it in ApplyDiff, as it would on a pull)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("thin.json")
        ti.size, ti.mode = len(data), 0o644
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def descriptor(*urls: str, version: str = "1.0") -> bytes:
    return json.dumps({"version": version, "layers": [
        {"digest": hashlib.sha256(u.encode()).hexdigest(), "url": u} for u in urls]}).encode()


def import_thin(d: Dockerd, data: bytes, tag: str, check: bool = True):
    return d.docker("import", "-c", 'CMD ["/bin/sh"]', "-", tag, input=descriptor_tar(data),
                    check=check)


def new_hex(name: str) -> str:
    return hashlib.sha256(f"{name}-{uuid.uuid4()}".encode()).hexdigest()


def ducc_layer_in(store: str, repo: str, name: str, fill: Callable[[str], None]) -> str:
    """A layer in DUCC's shape, `.layers/<hex[:2]>/<hex>/layerfs`, made by `fill(layerfs)`
    in a writable view of the repository. No `.metadata` index: the driver must find the
    literal `.wh.*` files itself."""
    h = new_hex(name)
    fs = os.path.join(store, ".layers", h[:2], h, "layerfs")
    os.makedirs(fs)
    os.chmod(fs, 0o755)
    fill(fs)
    return f"cvmfs://{repo}/.layers/{h[:2]}/{h}/layerfs"


def ducc_layers(cvmfs, repo: str, specs: Sequence[tuple]) -> List[str]:
    """Layers (name, fill) published as DUCC publishes them (`cvmfs_server ingest`, in
    one go); their URLs."""
    with tempfile.TemporaryDirectory() as tree:
        urls = [ducc_layer_in(tree, repo, name, fill) for name, fill in specs]
        cvmfs.put_tree(repo, ".layers", os.path.join(tree, ".layers"))
    return urls


def ducc_layer(cvmfs, repo: str, name: str, fill: Callable[[str], None]) -> str:
    return ducc_layers(cvmfs, repo, [(name, fill)])[0]


def put(root: str, rel: str, content: Optional[str] = "", mode: Optional[int] = None,
        owner: Optional[tuple] = None) -> None:
    """A file (content str) or directory (content None) at root/rel, parents made 0755."""
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if content is None:
        os.makedirs(path, exist_ok=True)
    else:
        with open(path, "w") as f:
            f.write(content)
    if mode is not None:
        os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)


# ---------------------------------------------------------------------------- the source

SOURCE_TAG = "cgd-thin-src:1"

# Three layers over busybox: files, directories deleted, an opaque directory (rm -rf and
# mkdir in one step), a deleted and recreated directory, odd modes and owners, and MBs of
# random data so the source weighs many MB while its thin image weighs almost nothing.
SOURCE_DOCKERFILE = """\
FROM busybox:test
RUN set -e; mkdir -p /data/keep /data/gone-tree/sub /data/opq/old /data/sticky /data/owned; \\
    echo keep > /data/keep/file; echo gone > /data/gone-file; echo z > /data/gone-tree/sub/z; \\
    echo old > /data/opq/old/f; echo old2 > /data/opq/f; \\
    chmod 1777 /data/sticky; echo v > /data/sticky/victim; echo s > /data/sticky/stay; \\
    echo o > /data/owned/o; chown -R 1234:5678 /data/owned; chmod 0750 /data/owned; \\
    ln -s ../keep/file /data/owned/link; ln /data/keep/file /data/keep/hard; \\
    dd if=/dev/urandom of=/data/big1 bs=1024 count=3072 2>/dev/null
RUN set -e; rm /data/gone-file /data/sticky/victim /bin/yes; rm -rf /data/gone-tree; \\
    rm -rf /data/opq; mkdir /data/opq; echo new > /data/opq/new; \\
    dd if=/dev/urandom of=/data/big2 bs=1024 count=3072 2>/dev/null
RUN set -e; echo {nonce} > /data/id; rm /data/big1; \\
    mkdir /data/gone-tree; echo back > /data/gone-tree/back
ENV FOO=bar
WORKDIR /data/keep
LABEL org.example.thin=yes
EXPOSE 8080/tcp
USER root
CMD ["/bin/sh", "-c", "echo from-cmd in $PWD FOO=$FOO"]
"""


@pytest.fixture(scope="module")
def source(dockerd: Dockerd, busybox: str, tmp_path_factory) -> str:
    ctx = str(tmp_path_factory.mktemp("thin-src"))
    build(dockerd, ctx, SOURCE_TAG, SOURCE_DOCKERFILE.format(nonce=uuid.uuid4()))
    return SOURCE_TAG


@pytest.fixture(scope="module")
def source_view(dockerd: Dockerd, source: str) -> Dict[str, tuple]:
    view = export_of(dockerd, source)
    # The comparison means something only if the source has what the Dockerfile made.
    assert "data/opq/new" in view and "data/opq/f" not in view and "data/opq/old" not in view
    assert "data/gone-tree/back" in view and "data/gone-tree/sub" not in view
    assert "data/gone-file" not in view and "bin/yes" not in view and "data/big1" not in view
    assert view["data/sticky"][1] == oct(0o41777) and view["data/owned"][2:4] == (1234, 5678)
    return view


def convert(d: Dockerd, cvmfs, src: str, tag: str, *extra: str, repo: str = "test.repo",
            env: Optional[Dict[str, str]] = None, check: bool = True):
    """`cvmfs-thin convert` into the repository (a cvmfs: store on the real stratum 0),
    then the driver's client sees the new revision at once."""
    r = cvmfs_thin(d, "convert", src, *cvmfs.store_args(repo), "--tag", tag, *extra,
                   env=env, check=check)
    cvmfs.refresh(repo)
    return r


# The view every container of the source (or of a faithful thin image) must show.
SOURCE_CHECK = """\
set -e
test ! -e /thin.json
test ! -e /data/gone-file; test ! -e /data/gone-tree/sub; test ! -e /data/sticky/victim
test ! -e /bin/yes; test ! -e /data/big1
test "$(ls -A /data/opq)" = new; test "$(cat /data/opq/new)" = new
test "$(ls -A /data/gone-tree)" = back
test "$(stat -c %a /data/sticky)" = 1777; test "$(ls -A /data/sticky)" = stay
test "$(stat -c '%a %u %g' /data/owned)" = "750 1234 5678"
test "$(cat /data/owned/link)" = keep
test "$(stat -c %s /data/big2)" = 3145728
test -z "$(find / -xdev -name '.wh.*')"
echo ok
"""


# ---------------------------------------------------------------------------- 1: round trip


def test_convert_push_pull_run_build_commit(docker_clean: Dockerd, registry, cvmfs, source,
                                            source_view, tmp_path):
    d = docker_clean
    thin_tag = f"{registry.address}/thin/x:1"
    assert sh(d, source, SOURCE_CHECK).strip() == "ok"

    r = convert(d, cvmfs, source, thin_tag, "--push")
    assert f"thin image {thin_tag}" in r.stdout and "4 layer(s) in cvmfs://test.repo" in r.stdout
    assert "layer 4/4" in r.stderr and "pushed" in r.stderr  # progress output
    for h in diff_ids(d, source):
        fs = os.path.join(cvmfs.root, "test.repo", ".layers", h[:2], h, "layerfs")
        assert os.path.isdir(fs), f"layer {h} not published where the driver looks ({fs})"

    # Remove every local copy of the thin image; pull it back from the registry.
    thin_id = image_id(d, thin_tag)
    d.docker("rmi", thin_tag)
    assert d.docker("image", "inspect", thin_id, check=False).returncode != 0
    d.docker("pull", thin_tag)
    assert image_id(d, thin_tag) == thin_id

    src_size, thin_size = image_size(d, source), image_size(d, thin_tag)
    assert src_size > 8 * MB, src_size
    assert thin_size < 64 * KIB, f"pulled thin image is {thin_size} bytes"
    cfg = json.loads(d.out("image", "inspect", "--format", "{{json .Config}}", thin_tag))
    src_cfg = json.loads(d.out("image", "inspect", "--format", "{{json .Config}}", source))
    assert cfg["Env"] == src_cfg["Env"] + ["CVMFS_IMAGE=true"] and "FOO=bar" in cfg["Env"]
    for key in ("Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels"):
        assert cfg.get(key) == src_cfg.get(key), key
    assert d.out("run", "--rm", "--network", "none", thin_tag) == \
        "from-cmd in /data/keep FOO=bar\n"

    # It runs, and its containers see exactly what containers of the source see.
    assert sh(d, thin_tag, SOURCE_CHECK).strip() == "ok"
    assert sh(d, thin_tag, "cat /data/id") == sh(d, source, "cat /data/id")
    assert_same_view(export_of(d, thin_tag), as_published(cvmfs, source_view),
                     "thin image vs its source")

    # Regular layers on top: docker build FROM the thin image ...
    built_tag = f"{registry.address}/thin/built:1"
    build(d, str(tmp_path / "ctx"), built_tag, textwrap.dedent(f"""\
        FROM {thin_tag}
        RUN set -e; rm /data/keep/file /data/big2 /etc/group; rm -rf /data/opq; \\
            echo built > /data/built; echo more > /data/sticky/added; mkdir /data/newdir
        """))
    # ... and docker commit of a container started from it.
    committed_tag = f"{registry.address}/thin/committed:1"
    d.docker("run", "--name", "cgd-thin-commit", "--network", "none", thin_tag, "sh", "-c",
             "set -e; rm -rf /data/gone-tree /data/owned; rm /data/id; "
             "echo c > /data/committed; echo c2 > /data/opq/c2")
    d.docker("commit", "cgd-thin-commit", committed_tag)
    d.docker("rm", "cgd-thin-commit")

    for tag in (built_tag, committed_tag):
        d.docker("push", tag)
    d.docker("rmi", built_tag, committed_tag, thin_tag)
    for tag in (built_tag, committed_tag):
        assert d.docker("image", "inspect", tag, check=False).returncode != 0
        d.docker("pull", tag)

    built = sh(d, built_tag, textwrap.dedent("""\
        set -e
        test ! -e /data/keep/file; test ! -e /data/big2; test ! -e /etc/group
        test ! -e /data/opq; test ! -e /thin.json
        test "$(cat /data/built)" = built; test -d /data/newdir
        test "$(cat /data/keep/hard)" = keep; test "$(cat /etc/passwd | head -c 4)" = root
        test "$(ls -A /data/sticky)" = "added
        stay"
        test "$(stat -c %a /data/sticky)" = 1777
        test -z "$(find / -xdev -name '.wh.*')"
        echo ok
        """))
    assert built.strip() == "ok"
    committed = sh(d, committed_tag, textwrap.dedent("""\
        set -e
        test ! -e /data/gone-tree; test ! -e /data/owned; test ! -e /data/id
        test "$(cat /data/committed)" = c
        test "$(ls -A /data/opq)" = "c2
        new"
        test "$(stat -c %s /data/big2)" = 3145728
        test -z "$(find / -xdev -name '.wh.*')"
        echo ok
        """))
    assert committed.strip() == "ok"
    # The results still stand on the thin layer: kilobytes below the new layer.
    assert len(diff_ids(d, built_tag)) == 2 and len(diff_ids(d, committed_tag)) == 2


# ---------------------------------------------------------------------------- 2: DUCC tree


def _ducc_base(fs: str) -> None:
    busybox_rootfs(fs)
    put(fs, "data", None, 0o751)
    put(fs, "data/keep/f", "keep")
    put(fs, "data/gone", "gone")
    put(fs, "data/gone-dir/x", "x")
    put(fs, "data/opq/old/f", "old")
    put(fs, "data/opq/f2", "old2")
    put(fs, "data/sticky", None, 0o1777)
    put(fs, "data/sticky/victim", "victim")
    put(fs, "data/sticky/stay", "stay")
    put(fs, "data/owned", None, 0o750, (1234, 5678))
    put(fs, "data/owned/o1", "o1", owner=(1234, 5678))
    put(fs, "data/owned/o2", "o2", owner=(1234, 5678))
    put(fs, "data/.wh.never-existed", "")  # a marker in the base layer: hidden too
    put(fs, ".cvmfscatalog", "")  # what `cvmfs_server ingest --catalog` leaves at the root
    os.chmod(os.path.join(fs, "data"), 0o751)


def _ducc_middle(fs: str) -> None:
    put(fs, "data", None, 0o751)
    put(fs, "data/.wh.gone", "")
    put(fs, "data/.wh.gone-dir", "")
    put(fs, "data/opq/.wh..wh..opq", "")
    put(fs, "data/opq/new", "new")
    put(fs, "data/sticky", None, 0o1777)
    put(fs, "data/sticky/.wh.victim", "")
    put(fs, "data/owned", None, 0o750, (1234, 5678))
    put(fs, "data/owned/.wh.o1", "")
    put(fs, "data/added", "added")
    put(fs, ".cvmfscatalog", "")
    put(fs, "data/opq/.cvmfscatalog", "")  # a nested catalog
    os.chmod(os.path.join(fs, "data"), 0o751)
    os.chmod(os.path.join(fs, "data/sticky"), 0o1777)


def _ducc_top(fs: str) -> None:
    put(fs, "data", None, 0o751)
    put(fs, "data/keep/.wh.f", "")
    put(fs, "data/.wh.added", "")
    put(fs, "data/gone-dir/back", "back")
    put(fs, "etc/.wh.group", "")
    put(fs, ".cvmfscatalog", "")
    os.chmod(os.path.join(fs, "data"), 0o751)


DUCC_CHECK = """\
set -e
test -z "$(find / -xdev -name '.wh.*')"
test -z "$(find / -xdev -name '.cvmfscatalog')"
test "$(ls -A /data)" = "gone-dir
keep
opq
owned
sticky"
test "$(stat -c %a /data)" = 751
test "$(ls -A /data/keep)" = ""
test "$(cat /data/gone-dir/back)" = back; test "$(ls -A /data/gone-dir)" = back
test "$(ls -A /data/opq)" = new; test "$(cat /data/opq/new)" = new
test "$(stat -c %a /data/sticky)" = 1777; test "$(ls -A /data/sticky)" = stay
test "$(cat /data/sticky/stay)" = stay
test "$(stat -c '%a %u %g' /data/owned)" = "750 1234 5678"; test "$(ls -A /data/owned)" = o2
test "$(stat -c '%a %u %g' /data/owned/o2)" = "644 1234 5678"; test "$(cat /data/owned/o2)" = o2
test ! -e /etc/group; test "$(head -c 4 /etc/passwd)" = root
md5sum /bin/busybox
"""


def test_ducc_tree_with_literal_whiteout_files(docker_clean: Dockerd, cvmfs):
    d = docker_clean
    urls = ducc_layers(cvmfs, "ducc.repo", (("base", _ducc_base), ("middle", _ducc_middle),
                                             ("top", _ducc_top)))
    tag = "cgd-thin-ducc:1"
    args = ["make", "--tag", tag, "--cmd", '["/bin/sh"]', "--check-root", cvmfs.root,
            "--env", "DUCC=1"]
    for u in urls:
        args += ["--layer", u]
    cvmfs_thin(d, *args)
    assert sh(d, tag, "echo $DUCC $CVMFS_IMAGE") == "1 true\n"
    out = sh(d, tag, DUCC_CHECK)
    with open("/bin/busybox", "rb") as f:
        assert out.split()[0] == hashlib.md5(f.read()).hexdigest()
    # A second container uses the cached masks and sees the same.
    assert sh(d, tag, DUCC_CHECK) == out
    # The repository tree itself is untouched: the literal markers are still there.
    middle = os.path.join(cvmfs.root, "ducc.repo", urls[1].split("ducc.repo/", 1)[1])
    assert sorted(os.listdir(os.path.join(middle, "data"))) == [
        ".wh.gone", ".wh.gone-dir", "added", "opq", "owned", "sticky"]
    assert os.path.isfile(os.path.join(middle, "data/opq/.wh..wh..opq"))


def test_older_descriptor_forms_run(docker_clean: Dockerd, cvmfs):
    """`cvmfs://REPO/layers/<hex>` URLs and `repo`/`digest` fields (the first CVMFS graph
    driver's descriptors), delivered through ApplyDiff as on a pull."""
    d = docker_clean
    h = new_hex("older")
    with tempfile.TemporaryDirectory() as fs:
        busybox_rootfs(fs)
        put(fs, "form", "older\n")
        os.chmod(fs, 0o755)
        cvmfs.put_tree("test.repo", f"layers/{h}", fs)
    forms = {
        "url": {"digest": h, "url": f"cvmfs://test.repo/layers/{h}"},
        "repo": {"digest": f"sha256:{h}", "repo": "test.repo"},
    }
    for name, layer in forms.items():
        tag = f"cgd-thin-older:{name}"
        import_thin(d, json.dumps({"version": "1", "layers": [layer]}).encode(), tag)
        assert sh(d, tag, "cat /form; ls /thin.json 2>&1 || true") == \
            "older\nls: /thin.json: No such file or directory\n"


def test_layer_with_an_opaque_root_hides_everything_below(docker_clean: Dockerd, cvmfs):
    d = docker_clean

    def base(fs: str) -> None:
        busybox_rootfs(fs)
        put(fs, "old/f", "old")

    def replacement(fs: str) -> None:
        busybox_rootfs(fs)
        put(fs, ".wh..wh..opq", "")
        put(fs, "new/f", "new")

    urls = ducc_layers(cvmfs, "ducc.repo", [("opqroot-1", base), ("opqroot-2", replacement),
                                            ("opqroot-3", lambda fs: put(fs, "top", "top"))])
    tag = "cgd-thin-opqroot:1"
    cvmfs_thin(d, "make", "--layer", urls[0], "--layer", urls[1], "--layer", urls[2],
               "--tag", tag)
    assert sh(d, tag, "set -e; test ! -e /old; cat /new/f /top; "
                      "test -z \"$(find / -xdev -name '.wh.*')\"") == "newtop"


def test_thin_layer_over_a_regular_parent(docker_clean: Dockerd, cvmfs, busybox, tmp_path):
    """A layer whose tar holds thin.json is thin wherever it sits: over busybox, its CVMFS
    layer's literal `.wh.` file deletes a file of the regular parent."""
    d = docker_clean
    url = ducc_layer(cvmfs, "ducc.repo", "over-parent",
                     lambda fs: (put(fs, "etc/.wh.group", ""), put(fs, "from-cvmfs", "cv")))
    tag = "cgd-thin-over-parent:1"
    build(d, str(tmp_path / "ctx"), tag, f"FROM {busybox}\nCOPY thin.json /\n",
          {"thin.json": descriptor(url)})
    assert sh(d, tag, "set -e; test ! -e /etc/group; test ! -e /thin.json; cat /from-cvmfs; "
                      "test \"$(head -c 4 /etc/passwd)\" = root; "
                      "test -z \"$(find / -xdev -name '.wh.*')\"") == "cv"


# ---------------------------------------------------------------------------- 3, 4: refusals


MALICIOUS = {
    "bad-json": (b'{"version": "1.0", "layers": [', "thin.json is not valid JSON"),
    "version": (descriptor("cvmfs://test.repo/a", version="2.0"),
                "thin.json version '2.0' is not supported"),
    "http": (descriptor("http://test.repo/a"), "unsupported URL 'http://test.repo/a' "
                                              "(scheme 'http')"),
    "repo": (descriptor("cvmfs://evil.example.org/a"),
             "repository evil.example.org is not allowed on this node"),
    "dotdot": (descriptor("cvmfs://test.repo/.layers/../../../etc"),
               "climbs out of the repository with '..'"),
    "no-repo": (descriptor("cvmfs:///etc"), "invalid repository name ''"),
    "too-many": (descriptor(*[f"cvmfs://test.repo/l/{i}" for i in range(126)]),
                 "thin.json lists 126 layers; at most 125"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_descriptor_is_refused_at_pull(docker_clean: Dockerd, case):
    d = docker_clean
    data, words = MALICIOUS[case]
    home = driver_home(d)
    mounts_before, layers_before = overlay_mounts(d), layer_dirs(home)
    r = import_thin(d, data, f"cgd-thin-evil:{case}", check=False)
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, f"import of a {case} descriptor succeeded"
    assert "thin image layer that cannot be used" in err and words in err, err
    assert d.docker("image", "inspect", f"cgd-thin-evil:{case}", check=False).returncode != 0
    assert overlay_mounts(d) == mounts_before
    assert layer_dirs(home) == layers_before, "the refused layer was left in the driver home"


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
def test_thin_json_that_is_not_a_regular_file_is_refused(docker_clean: Dockerd, kind):
    """A layer tar's `thin.json` that is a directory, a symlink (to a host file) or a FIFO
    (whose open would block the pull forever) is refused quickly and clearly."""
    d = docker_clean
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("thin.json")
        ti.mode = 0o644
        ti.type = {"directory": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                   "fifo": tarfile.FIFOTYPE}[kind]
        ti.linkname = "/etc/passwd" if kind == "symlink" else ""
        tf.addfile(ti)
    home = driver_home(d)
    mounts_before, layers_before = overlay_mounts(d), layer_dirs(home)
    r = d.docker("import", "-", f"cgd-thin-odd:{kind}", input=buf.getvalue(), check=False,
                 timeout=60)
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, f"a layer whose thin.json is a {kind} was accepted"
    assert "thin image layer that cannot be used" in err and "thin.json" in err, err
    assert "internal error" not in err, err
    assert overlay_mounts(d) == mounts_before and layer_dirs(home) == layers_before


def load_archive(layers: Sequence[bytes], tag: str) -> bytes:
    """A `docker load` archive of an image made of the given layer tars (base first)."""
    diff_ids = [hashlib.sha256(t).hexdigest() for t in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [f"sha256:{h}" for h in diff_ids]}}).encode()
    files = {f"{h}/layer.tar": t for h, t in zip(diff_ids, layers)}
    files["config.json"] = config
    files["manifest.json"] = json.dumps([{"Config": "config.json", "RepoTags": [tag],
                                          "Layers": [f"{h}/layer.tar" for h in diff_ids]}]
                                        ).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_a_layer_deleting_thin_json_is_a_regular_layer(docker_clean: Dockerd, cvmfs):
    """A whiteout of /thin.json (a char 0:0 device in the applied layer) says the layer
    deletes the file: it is no descriptor, and the image pulls and runs."""
    d = docker_clean
    url = ducc_layer(cvmfs, "ducc.repo", "wh-thin", busybox_rootfs)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, body in ((".wh.thin.json", b""), ("hello", b"hello\n")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(body), 0o644
            tf.addfile(ti, io.BytesIO(body))
    tag = "cgd-thin-wh-descriptor:1"
    d.docker("load", "-q", input=load_archive([descriptor_tar(descriptor(url)), buf.getvalue()],
                                              tag))
    assert sh(d, tag, "cat /hello; ls /thin.json 2>&1 || true; ls /bin/busybox") == \
        "hello\nls: /thin.json: No such file or directory\n/bin/busybox\n"


@pytest.fixture
def evil_links(cvmfs):
    """Symlinks inside test.repo's tree that point out of the repository."""
    rel = f".evil/{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)
        os.symlink("/etc", os.path.join(base, "etc"))
        os.symlink("../../../", os.path.join(base, "up"))  # climbs out of the repository
        os.symlink("/", os.path.join(base, "root"))
        cvmfs.put_tree("test.repo", rel, base)
    yield f"cvmfs://test.repo/{rel}"
    cvmfs.delete("test.repo", rel)


@pytest.mark.parametrize("path", ["etc", "up", "root/etc"])
def test_symlink_out_of_the_repository_is_refused(docker_clean: Dockerd, busybox, evil_links,
                                                  path):
    d = docker_clean
    tag = f"cgd-thin-symlink:{path.replace('/', '-')}"
    import_thin(d, descriptor(f"{evil_links}/{path}"), tag)  # the descriptor itself is fine
    before = overlay_mounts(d)
    r = d.docker("run", "--rm", "--network", "none", tag, "/bin/sh", "-c", "true", check=False)
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0, "a layer outside the repository was stacked into a container"
    assert f"thin layer {evil_links}/{path} resolves to" in err, err
    assert "outside repository test.repo; refusing to mount it" in err, err
    assert overlay_mounts(d) == before
    assert sh(d, busybox, "echo alive").strip() == "alive"


def test_missing_layer_fails_with_the_documented_message(docker_clean: Dockerd, busybox, cvmfs):
    d = docker_clean
    h = new_hex("missing")
    url = f"cvmfs://test.repo/.layers/{h[:2]}/{h}/layerfs"
    tag = "cgd-thin-missing:1"
    import_thin(d, descriptor(url), tag)
    before = overlay_mounts(d)
    r = d.docker("run", "--rm", "--network", "none", tag, "/bin/sh", "-c", "true", check=False)
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0
    assert f"thin layer {url} is missing" in err, err
    assert "not (or no longer) published in test.repo" in err
    assert "cvmfs_config probe test.repo" in err
    assert overlay_mounts(d) == before
    assert d.out("ps", "-aq", "--filter", f"ancestor={tag}").strip() == ""
    assert sh(d, busybox, "echo alive").strip() == "alive"

    # `cvmfs-thin inspect` prints the descriptor and names the missing layer.
    r = cvmfs_thin(d, "inspect", tag, "--cvmfs-root", cvmfs.root, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f'"url": "{url}"' in r.stdout
    assert f"layer 1: MISSING {url}" in r.stdout and "1 of 1 layers are missing" in r.stdout


def test_layer_removed_after_pull_then_restored(docker_clean: Dockerd, busybox, cvmfs,
                                                tmp_path):
    """A layer that disappears from the repository (unpublished, client broken) makes the
    next start fail cleanly; once it is back, the same image runs again."""
    d = docker_clean
    url, top = ducc_layers(cvmfs, "ducc.repo", [
        ("vanishing", busybox_rootfs),
        ("vanishing-top", lambda fs: put(fs, "etc/.wh.group", ""))])
    rel = url.split("ducc.repo/", 1)[1]
    saved = tmp_path / "saved"
    shutil.copytree(os.path.join(cvmfs.root, "ducc.repo", rel), saved, symlinks=True)
    tag = "cgd-thin-vanish:1"
    cvmfs_thin(d, "make", "--layer", url, "--layer", top, "--tag", tag)
    assert sh(d, tag, "test ! -e /etc/group && echo ok").strip() == "ok"
    cid = d.out("create", "--network", "none", tag, "true").strip()
    cvmfs.delete("ducc.repo", rel)
    try:
        before = overlay_mounts(d)
        r = d.docker("run", "--rm", "--network", "none", tag, "true", check=False)
        assert r.returncode != 0 and f"thin layer {url} is missing" in r.stderr.decode()
        r = d.docker("start", cid, check=False)
        assert r.returncode != 0 and f"thin layer {url} is missing" in r.stderr.decode()
        assert overlay_mounts(d) == before
        # `docker inspect` still works without touching CVMFS: it shows the planned
        # stack (the layer's path in the repository, missing or not).
        data = json.loads(d.out("inspect", "--format", "{{json .GraphDriver.Data}}", cid))
        assert os.path.join(cvmfs.root, "ducc.repo", url.split("ducc.repo/", 1)[1]) in \
            data["LowerDir"].split(":"), data
        assert data["CVMFSRepositories"] == "ducc.repo" and "LowerDirError" not in data
        assert _repo_row(d, "ducc.repo")[0] >= 1  # docker info needs no CVMFS access
    finally:
        cvmfs.put_tree("ducc.repo", rel, str(saved))
    assert sh(d, tag, "test ! -e /etc/group && echo ok").strip() == "ok"
    d.docker("start", "-a", cid)


def test_missing_repository_names_it(docker_clean: Dockerd, busybox, cvmfs):
    """The repository itself is not mounted (CVMFS client down): the error says which
    repository and how to check the client; regular images keep working."""
    d = docker_clean
    url = ducc_layer(cvmfs, "ducc.repo", "norepo", busybox_rootfs)
    tag = "cgd-thin-norepo:1"
    cvmfs_thin(d, "make", "--layer", url, "--tag", tag)
    cvmfs.unmount("ducc.repo")
    try:
        before = overlay_mounts(d)
        r = d.docker("run", "--rm", "--network", "none", tag, "true", check=False)
        err = r.stderr.decode(errors="replace")
        assert r.returncode != 0
        assert "CVMFS repository ducc.repo is not available" in err, err
        assert "cvmfs_config probe ducc.repo" in err
        assert overlay_mounts(d) == before
        assert sh(d, busybox, "echo alive").strip() == "alive"
    finally:
        cvmfs.mount("ducc.repo")
    assert sh(d, tag, "echo back").strip() == "back"


# ---------------------------------------------------------------------------- 5: --flat


def test_flat_and_per_layer_give_the_same_view(docker_clean: Dockerd, cvmfs, source,
                                               source_view):
    d = docker_clean
    convert(d, cvmfs, source, "cgd-thin-layers:1")
    r = convert(d, cvmfs, source, "cgd-thin-flat:1", "--flat")
    assert "1 layer(s) in cvmfs://test.repo" in r.stdout
    flat = json.loads(cvmfs_thin(d, "inspect", "cgd-thin-flat:1", "--cvmfs-root",
                                 cvmfs.root).stdout.split("\nlayer 1:")[0])
    assert len(flat["layers"]) == 1 and "/.flat/" in flat["layers"][0]["url"]
    per_layer, flat_view = export_of(d, "cgd-thin-layers:1"), export_of(d, "cgd-thin-flat:1")
    assert_same_view(flat_view, per_layer, "--flat vs per-layer thin image")
    assert_same_view(flat_view, as_published(cvmfs, source_view),
                     "--flat thin image vs its source")
    assert sh(d, "cgd-thin-flat:1", SOURCE_CHECK).strip() == "ok"


# ---------------------------------------------------------------------------- 6: deep


DEEP = 125


def test_deep_thin_image(docker_clean: Dockerd, cvmfs):
    """125 CVMFS layers (dockerd's own cap), every odd one from 3 on deleting the file of
    the layer below with a literal `.wh.` file: with the masks that makes ~250 lower
    directories, which only fit in one page of mount options as short links."""
    d = docker_clean
    specs: List[tuple] = [("deep-1", busybox_rootfs)]
    expected = set()
    for k in range(2, DEEP + 1):
        def fill(fs: str, k: int = k) -> None:
            put(fs, f"deep/f{k:03d}", f"{k}\n")
            if k >= 3 and k % 2 == 1:
                put(fs, f"deep/.wh.f{k - 1:03d}", "")
        specs.append((f"deep-{k}", fill))
        expected.add(f"f{k:03d}")
        if k >= 3 and k % 2 == 1:
            expected.discard(f"f{k - 1:03d}")
    urls = ducc_layers(cvmfs, "ducc.repo", specs)
    tag = "cgd-thin-deep:1"
    args = ["make", "--tag", tag, "--cmd", '["/bin/sh"]']
    for u in urls:
        args += ["--layer", u]
    cvmfs_thin(d, *args)
    out = sh(d, tag, "ls -A /deep; echo ---; cat /deep/f125 /deep/f003; "
                     "find / -xdev -name '.wh.*'")
    listing, rest = out.split("---\n")
    assert set(listing.split()) == expected
    assert rest.split() == ["125", "3"]
    # The mount really stacked every layer and mask: far more than one page of options
    # if the lower directories were given by their full paths.
    cid = d.out("create", "--network", "none", tag, "true").strip()
    lowers = json.loads(d.out("inspect", "--format", "{{json .GraphDriver.Data}}",
                              cid))["LowerDir"].split(":")
    d.docker("rm", cid)
    assert len(lowers) >= 2 * DEEP - 4, len(lowers)
    assert len(":".join(lowers)) > 3 * 4096
    # And a regular layer on top of the 125 still works (docker commit).
    d.docker("run", "--name", "cgd-thin-deep", "--network", "none", tag, "sh", "-c",
             "rm /deep/f125; echo top > /deep/top")
    d.docker("commit", "cgd-thin-deep", "cgd-thin-deep:2")
    assert sh(d, "cgd-thin-deep:2", "ls /deep | wc -l; cat /deep/top").split() == \
        [str(len(expected)), "top"]


# ---------------------------------------------------------------------------- 7: reporting


def _repo_row(d: Dockerd, repo: str) -> tuple:
    rows = dict(json.loads(d.out("info", "--format", "{{json .DriverStatus}}")))
    m = re.fullmatch(r"(\d+) thin layers, (\d+) mounted layers on them",
                     rows.get(f"Repository {repo}", ""))
    assert m, f"no 'Repository {repo}' row in docker info: {rows}"
    return int(m.group(1)), int(m.group(2))


def test_info_and_inspect_name_the_repositories(docker_clean: Dockerd, cvmfs, source):
    d = docker_clean
    tag = "cgd-thin-report:1"
    convert(d, cvmfs, source, tag)
    thin_layers, mounted = _repo_row(d, "test.repo")
    assert thin_layers >= 1
    cid = d.out("run", "-d", "--network", "none", tag, "sleep", "300").strip()
    try:
        assert _repo_row(d, "test.repo") == (thin_layers, mounted + 1)
        data = json.loads(d.out("inspect", "--format", "{{json .GraphDriver.Data}}", cid))
        assert data["CVMFSRepositories"] == "test.repo"
        assert data["LowerDir"].count(os.path.join(cvmfs.root, "test.repo")) >= 4
        info = d.out("info")
        assert re.search(r"Repository test\.repo: \d+ thin layers, \d+ mounted layers on them",
                         info), info
        img = json.loads(d.out("image", "inspect", "--format", "{{json .GraphDriver.Data}}",
                               tag))
        assert img["CVMFSRepositories"] == "test.repo"
        assert img["ThinLayers"].count("cvmfs://test.repo/.layers/") == 4
    finally:
        d.docker("rm", "-f", cid)
    assert _repo_row(d, "test.repo") == (thin_layers, mounted)


# ---------------------------------------------------------------------------- 8: cvmfs: store


RECORDER = """\
#!{python}
# Wraps the real `cvmfs_server`: records each ingest's arguments and input stream, then
# hands the same stream to the real one. RECORDER_FAIL_FROM=N fails ingest N and later
# ones before they reach the server; RECORDER_HANG=1 opens a transaction and hangs, as an
# ingest stuck on the repository would.
import json, os, subprocess, sys, time
real = os.environ["REAL_CVMFS_SERVER"]
args = sys.argv[1:]
if args[:1] != ["ingest"]:
    os.execv(real, [real, *args])
log = os.environ["RECORDER_LOG"]
n = len([x for x in os.listdir(log) if x.endswith(".json")])
data = sys.stdin.buffer.read()
with open(os.path.join(log, "%03d.tar" % n), "wb") as f:
    f.write(data)
with open(os.path.join(log, "%03d.json" % n), "w") as f:
    json.dump(args, f)
if os.environ.get("RECORDER_HANG"):
    subprocess.run([real, "transaction", args[-1]], check=True, stdout=subprocess.DEVNULL)
    print("recorder: hanging inside the transaction", flush=True)
    time.sleep(3600)
fail_from = int(os.environ.get("RECORDER_FAIL_FROM", "-1"))
if 0 <= fail_from <= n:
    print("recorder: simulated publish failure", flush=True)
    sys.exit(3)
sys.exit(subprocess.run([real, *args], input=data).returncode)
"""


@pytest.fixture
def recorder(cvmfs, tmp_path) -> Callable[..., Dict[str, str]]:
    """The environment that puts RECORDER in front of the real cvmfs_server."""
    from harness import need
    need(cvmfs.real, "the cvmfs: store runs on a real CVMFS stratum 0 (scripts/cvmfs.sh)")
    bindir, log = tmp_path / "bin", tmp_path / "log"
    bindir.mkdir()
    log.mkdir()
    script = bindir / "cvmfs_server"
    script.write_text(RECORDER.format(python=sys.executable))
    script.chmod(0o755)

    def env(**extra: str) -> Dict[str, str]:
        return {"PATH": f"{bindir}:{os.environ['PATH']}", "RECORDER_LOG": str(log),
                "REAL_CVMFS_SERVER": shutil.which("cvmfs_server") or "cvmfs_server", **extra}
    env.log = str(log)  # type: ignore[attr-defined]
    env.script = str(script)  # type: ignore[attr-defined]
    return env


def _calls(log: str) -> List[tuple]:
    out = []
    for name in sorted(os.listdir(log)):
        if name.endswith(".json"):
            with open(os.path.join(log, name)) as f:
                argv = json.load(f)
            with open(os.path.join(log, name[:-5] + ".tar"), "rb") as f:
                out.append((argv, f.read()))
    return out


def _tar_names(data: bytes) -> List[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [m.name.rstrip("/") for m in tf]


INGEST = ["ingest", "--keep-ownership", "--tar_file", "-", "--base_dir"]
RECORD_INGEST = ["ingest", "--tar_file", "-", "--base_dir", records.RECORDS_DIR, "test.repo"]


def _expected_calls(hexes: Sequence[str]) -> List[List[str]]:
    out = []
    for h in hexes:
        base = f".layers/{h[:2]}/{h}"
        out.append([*INGEST, f"{base}/.metadata", "test.repo"])
        out.append([*INGEST, f"{base}/layerfs", "--catalog", "test.repo"])
    return out


def in_transaction(repo: str) -> bool:
    return os.path.exists(f"/var/spool/cvmfs/{repo}/in_transaction.lock")


def test_cvmfs_store_publishes_through_cvmfs_server_ingest(docker_clean: Dockerd, cvmfs,
                                                           busybox, recorder, tmp_path):
    d = docker_clean
    src = "cgd-thin-ingest-src:1"
    build(d, str(tmp_path / "ctx"), src, textwrap.dedent(f"""\
        FROM {busybox}
        RUN set -e; mkdir -p /c8/d/e; echo {uuid.uuid4()} > /c8/id; echo a > /c8/a; \\
            echo f > /c8/d/e/f; mkdir /c8/opq; echo old > /c8/opq/old; \\
            mkdir /c8/owned; echo o > /c8/owned/o; chown -R 1234:5678 /c8/owned
        RUN set -e; rm /c8/a; rm -rf /c8/d; echo b > /c8/b; rm -rf /c8/opq; mkdir /c8/opq
        """))
    hexes = diff_ids(d, src)
    present = cvmfs.publisher_view("test.repo")
    missing = [h for h in hexes if not os.path.isdir(f"{present}/.layers/{h[:2]}/{h}/layerfs")]
    assert hexes[1:] == missing[-2:]  # the two new layers at least (busybox may be there)
    tag = "cgd-thin-ingest:1"
    args = ["convert", src, *cvmfs.store_args("test.repo"), "--tag", tag]

    # A failing server step: the first missing layer is published, the second fails,
    # and the repository is not left in a transaction.
    r = cvmfs_thin(d, *args, check=False, env=recorder(RECORDER_FAIL_FROM="3"))
    assert r.returncode == 1, r.stderr
    failed = _expected_calls(missing)[3]
    assert f"cvmfs-thin: error: `cvmfs_server {' '.join(failed)}` failed with exit code 3" \
        in r.stderr, r.stderr
    assert "the transaction was not published; test.repo is not left in a transaction" \
        in r.stderr
    assert "simulated publish failure" in r.stderr
    assert not in_transaction("test.repo")
    assert d.docker("image", "inspect", tag, check=False).returncode != 0
    first_run = _calls(recorder.log)
    assert [argv for argv, _ in first_run] == _expected_calls(missing)[:4]

    # The rerun skips what was published and finishes; its last ingest is the image's
    # record (records.py), in a transaction of its own.
    r = cvmfs_thin(d, *args, env=recorder())
    cvmfs.refresh("test.repo")
    n = len(hexes)
    k = hexes.index(missing[0])
    assert f"layer {k + 1}/{n} {missing[0][:12]}: already in the store, skipped" in r.stderr
    assert f"({len(missing) - 1} published, {n - len(missing) + 1} already there)" in r.stdout
    calls = _calls(recorder.log)
    assert [argv for argv, _ in calls[len(first_run):]] == \
        _expected_calls(missing[1:]) + [RECORD_INGEST]
    assert _tar_names(calls[-1][1]) == [os.path.basename(records.record_path(tag))]
    calls = calls[:-1]

    # Every stream is a valid tar with what the layer holds.
    ok_calls = first_run[:2] + calls[len(first_run):]
    for h, (meta_call, fs_call) in zip(missing, zip(ok_calls[::2], ok_calls[1::2])):
        assert meta_call[0][5].endswith(f"{h}/.metadata") and fs_call[0][5].endswith(h + "/layerfs")
        assert sorted(_tar_names(meta_call[1])) == ["origin.json", "whiteouts.json"]
        # The layerfs stream is the layer tar itself, byte for byte (its digest is h).
        assert hashlib.sha256(fs_call[1]).hexdigest() == h
    top_names = set(_tar_names(calls[-1][1]))
    assert {"c8/.wh.a", "c8/.wh.d", "c8/opq/.wh..wh..opq", "c8/b"} <= top_names, top_names
    with tarfile.open(fileobj=io.BytesIO(calls[-2][1]), mode="r:") as tf:
        f = tf.extractfile("whiteouts.json")
        index = json.loads(f.read() if f else b"")
    assert sorted(index["deleted"]) == ["c8/a", "c8/d"] and index["opaque"] == ["c8/opq"]

    # Through the client: the layers as ingest stores them (literal .wh. files, a
    # .cvmfscatalog at the root, the image's owners kept), and they run as the source.
    top_fs = f"{cvmfs.root}/test.repo/.layers/{hexes[-1][:2]}/{hexes[-1]}/layerfs"
    assert os.path.isfile(f"{top_fs}/c8/.wh.a") and os.path.isfile(f"{top_fs}/.cvmfscatalog")
    mid = f"{cvmfs.root}/test.repo/.layers/{hexes[1][:2]}/{hexes[1]}/layerfs/c8/owned/o"
    assert (os.stat(mid).st_uid, os.stat(mid).st_gid) == (1234, 5678)
    out = sh(d, tag, "set -e; test ! -e /c8/a; test ! -e /c8/d; test \"$(cat /c8/b)\" = b; "
                     "test -z \"$(ls -A /c8/opq)\"; test -z \"$(find / -xdev -name '.wh.*')\"; "
                     "test ! -e /.cvmfscatalog; stat -c '%u %g' /c8/owned/o; cat /c8/id")
    assert out == "1234 5678\n" + sh(d, src, "cat /c8/id")
    src_view = as_published(cvmfs, export_of(d, src))
    assert_same_view(export_of(d, tag), src_view, "cvmfs: store thin image vs source")

    # --flat into the cvmfs: store: one ingest of the flattened tree, no whiteouts in it.
    done = len(_calls(recorder.log))
    cvmfs_thin(d, *args[:-1], "cgd-thin-ingest:flat", "--flat", env=recorder())
    cvmfs.refresh("test.repo")
    (argv, stream), (record_argv, _) = _calls(recorder.log)[done:]
    assert record_argv == RECORD_INGEST
    key = image_id(d, src).split(":", 1)[1]
    assert argv == [*INGEST, f".flat/{key[:2]}/{key}", "--catalog", "test.repo"]
    names = _tar_names(stream)
    assert "c8/b" in names and "bin/busybox" in names and "c8/a" not in names
    assert not [n for n in names if ".wh." in n], names
    assert_same_view(export_of(d, "cgd-thin-ingest:flat"), src_view,
                     "--flat cvmfs: store thin image vs source")


def test_cvmfs_store_never_leaves_a_transaction(docker_clean: Dockerd, cvmfs, busybox,
                                               recorder, tmp_path):
    """A server step that hangs is stopped and its transaction aborted; a publisher killed
    inside a transaction has it aborted by the next run; a second publisher is refused
    (or waits with --wait); a transaction somebody else opened is left alone, refused."""
    d = docker_clean
    src = "cgd-thin-txn-src:1"
    build(d, str(tmp_path / "ctx"), src, f"FROM {busybox}\nRUN echo {uuid.uuid4()} > /id\n")
    args = ["convert", src, *cvmfs.store_args("test.repo"), "--tag", "cgd-thin-txn:1"]
    assert not in_transaction("test.repo")

    # 1. A step that hangs inside its transaction: stopped at --step-timeout, aborted.
    r = cvmfs_thin(d, *args, "--step-timeout", "5", check=False, env=recorder(RECORDER_HANG="1"))
    assert r.returncode == 1, r.stderr
    assert "did not finish in 5 s (--step-timeout) and was stopped" in r.stderr, r.stderr
    assert "test.repo is not left in a transaction" in r.stderr
    assert not in_transaction("test.repo")

    # 2. A publisher killed inside its transaction; meanwhile a second one is refused,
    # naming the first; a third waits (--wait) and, once the first is dead, aborts the
    # transaction it left and publishes.
    cmd = [sys.executable, "-m", "cvmfs_graphdriver.publish.cli", *args]
    env = {**os.environ, "DOCKER_HOST": d.host, **recorder(RECORDER_HANG="1")}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        wait_for = time.monotonic() + 120
        while not in_transaction("test.repo"):
            assert first.poll() is None and time.monotonic() < wait_for, first.stderr
            time.sleep(0.2)
        r = cvmfs_thin(d, *args, check=False)
        assert r.returncode == 1
        assert f"another cvmfs-thin (pid {first.pid} on " in r.stderr, r.stderr
        assert "is publishing into test.repo: retry when it is done, or pass --wait" in r.stderr
        third = subprocess.Popen([*cmd, "--wait", "120"], env={**os.environ, "DOCKER_HOST": d.host},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert third.poll() is None, third.communicate()
        os.killpg(first.pid, signal.SIGKILL)  # cvmfs-thin; the hung step is in its own group
        subprocess.run(["pkill", "-9", "-f", f"{recorder.script} ingest"], check=False)
        out, err = third.communicate(timeout=300)
        assert third.returncode == 0, err
        assert f"waiting up to 120 s for another cvmfs-thin (pid {first.pid} on " in err, err
        assert "test.repo: aborting the transaction an interrupted cvmfs-thin left open" in err
        assert "(1 published, 1 already there)" in out, out
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not in_transaction("test.repo")
    cvmfs.refresh("test.repo")
    assert sh(d, "cgd-thin-txn:1", "cat /id") == sh(d, src, "cat /id")

    # 3. A transaction opened by hand is not cvmfs-thin's to abort.
    cvmfs.server("transaction", "test.repo")
    try:
        r = cvmfs_thin(d, "convert", busybox, *cvmfs.store_args("test.repo"), "--tag", "x:1",
                       check=False)
        assert r.returncode == 1
        assert "test.repo is in a transaction cvmfs-thin did not open" in r.stderr, r.stderr
        assert "cvmfs_server abort test.repo" in r.stderr
        assert in_transaction("test.repo")
    finally:
        cvmfs.server("abort", "-f", "test.repo")


@pytest.mark.parametrize("args, words", [
    (["convert", "cgd-thin-no-such-image:1", "--store", "dir:/tmp", "--repo", "test.repo",
      "--tag", "x:1"], "image cgd-thin-no-such-image:1 is not local and cannot be pulled"),
    (["convert", "busybox:test", "--store", "s3:bucket", "--tag", "x:1"],
     "unknown store 's3:bucket': use dir:PATH or cvmfs:REPOSITORY"),
    (["convert", "busybox:test", "--store", "dir:/tmp", "--tag", "x:1"],
     "--repo is required with a dir: store"),
    (["convert", "busybox:test", "--store", "dir:/tmp", "--repo", "bad repo", "--tag", "x:1"],
     "invalid repository name 'bad repo'"),
    (["convert", "busybox:test", "--store", "cvmfs:test.repo", "--repo", "other.repo",
      "--tag", "x:1"], "--repo other.repo differs from the store's repository test.repo"),
    (["make", "--layer", "cvmfs://test.repo/../etc", "--tag", "x:1"], "'..'"),
    (["make", "--layer", "http://test.repo/a", "--tag", "x:1"], "unsupported URL"),
    (["make", "--layer", "cvmfs://test.repo/nowhere", "--tag", "x:1", "--check-root", "/"],
     "CVMFS repository test.repo is not available at /test.repo"),
    (["make", "--layer", "cvmfs://test.repo/a", "--tag", "x:1", "--cmd", "/bin/sh"],
     "--cmd must be a JSON list"),
    (["inspect", "busybox:test"], "busybox:test is not a thin image"),
])
def test_cvmfs_thin_failures_are_explained(docker_clean: Dockerd, args, words):
    r = cvmfs_thin(docker_clean, *args, check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("cvmfs-thin: error: ") and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cvmfs_thin_without_an_engine(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cvmfs_graphdriver.publish.cli",
                        "--docker-host", f"unix://{tmp_path}/none.sock", "inspect", "x:1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"cannot reach the Docker engine at unix://{tmp_path}/none.sock" in r.stderr


def test_convert_an_image_that_is_only_in_a_registry(docker_clean: Dockerd, cvmfs, registry,
                                                     busybox, tmp_path):
    d = docker_clean
    local = "cgd-thin-remote-src:1"
    build(d, str(tmp_path / "ctx"), local, f"FROM {busybox}\nRUN echo {uuid.uuid4()} > /id\n")
    remote = f"{registry.address}/thin/remote-src:1"
    d.docker("tag", local, remote)
    d.docker("push", remote)
    d.docker("rmi", remote)
    convert(d, cvmfs, remote, "cgd-thin-remote:1")
    assert sh(d, "cgd-thin-remote:1", "cat /id") == sh(d, local, "cat /id")


def test_cvmfs_store_without_cvmfs_server(docker_clean: Dockerd, cvmfs, busybox, tmp_path):
    d = docker_clean
    src = "cgd-thin-noserver:1"
    build(d, str(tmp_path / "ctx"), src, f"FROM {busybox}\nRUN echo {uuid.uuid4()} > /id\n")
    r = cvmfs_thin(d, "convert", src, "--store", "cvmfs:test.repo", "--cvmfs-root", "/cvmfs",
                   "--tag", "cgd-thin-noserver:thin", check=False,
                   env={"CVMFS_SERVER": str(tmp_path / "no-such-cvmfs_server")})
    assert r.returncode == 1
    assert "not found: the cvmfs: store runs on a CVMFS publisher node" in r.stderr, r.stderr


# ---------------------------------------------------------------------------- 9: resume


def test_rerun_after_interruption(docker_clean: Dockerd, cvmfs, busybox, tmp_path):
    d = docker_clean
    src = "cgd-thin-resume:1"
    build(d, str(tmp_path / "ctx"), src, textwrap.dedent(f"""\
        FROM {busybox}
        RUN echo {uuid.uuid4()} > /id; rm /etc/group
        """))
    convert(d, cvmfs, busybox, "cgd-thin-resume:base", repo="dir.repo")  # the layer below
    top = diff_ids(d, src)[-1]
    parent = os.path.join(cvmfs.stores["dir.repo"], ".layers", top[:2])
    with open("/proc/sys/kernel/pid_max") as f:
        dead_pid = int(f.read()) + 1  # no process can have it: the run that left it died
    stale = os.path.join(parent, f".{top}.partial-{dead_pid}")
    put(stale, "layerfs/id", "half written")
    tag = "cgd-thin-resume:thin"

    r = convert(d, cvmfs, src, tag, repo="dir.repo")
    assert "1 published" in r.stdout, r.stdout
    assert not os.path.exists(stale), "the stale partial directory was left behind"
    assert [x for x in os.listdir(parent) if ".partial-" in x] == []
    assert os.path.isfile(os.path.join(parent, top, "layerfs", "id"))
    first = image_id(d, tag)
    d.docker("rmi", tag)

    r = convert(d, cvmfs, src, tag, repo="dir.repo")
    assert "(0 published, 2 already there)" in r.stdout, r.stdout
    assert r.stderr.count("already in the store, skipped") == 2
    assert image_id(d, tag) == first
    assert sh(d, tag, "test ! -e /etc/group; cat /id") == sh(d, src, "cat /id")
    r = cvmfs_thin(d, "inspect", tag, "--cvmfs-root", cvmfs.root)
    desc = json.loads(r.stdout.split("\nlayer 1:")[0])
    assert [la["digest"] for la in desc["layers"]] == diff_ids(d, src)
    assert "all 2 layers present" in r.stdout


# ---------------------------------------------------------------------------- driver restart


@pytest.fixture
def driver_back(driver_proc):
    """The session's driver, serving again after a test that killed it."""
    yield driver_proc
    if driver_proc.proc is None or driver_proc.proc.poll() is not None:
        driver_proc.start()


def test_driver_restart_under_a_running_thin_container(docker_clean: Dockerd, cvmfs, source,
                                                       driver_back):
    d = docker_clean
    tag = "cgd-thin-restart:1"
    convert(d, cvmfs, source, tag)
    before = overlay_mounts(d)
    cid = d.out("run", "-d", "--network", "none", tag, "sleep", "300").strip()
    try:
        merged = json.loads(d.out("inspect", "--format", "{{json .GraphDriver.Data}}",
                                  cid))["MergedDir"]
        assert merged in overlay_mounts(d)
        thin_layers, mounted = _repo_row(d, "test.repo")
        driver_back.kill9()
        driver_back.start()
        assert _repo_row(d, "test.repo") == (thin_layers, mounted)
        assert d.out("exec", cid, "sh", "-c", SOURCE_CHECK).strip() == "ok"
        d.docker("stop", "-t", "0", cid)
        assert overlay_mounts(d) == before, "stopping the container left its layer mounted"
        d.docker("start", cid)
        assert d.out("exec", cid, "cat", "/data/opq/new") == "new\n"
    finally:
        d.docker("rm", "-f", cid)
    assert overlay_mounts(d) == before
    assert sh(d, tag, SOURCE_CHECK).strip() == "ok"


# ---------------------------------------------------------------------------- repeated layers


def test_image_with_repeated_identical_layers(docker_clean: Dockerd, cvmfs, busybox, tmp_path):
    """Real images can hold the same layer twice (an ADD repeated after a step that
    changed its files, schema-1 images full of empty layers): the thin image then names
    one CVMFS directory twice, and overlayfs refuses to stack one directory twice."""
    d = docker_clean
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("added")
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
        tf.addfile(ti)
        body = f"{uuid.uuid4()}\n".encode()
        ti = tarfile.TarInfo("added/f")
        ti.size, ti.mode, ti.mtime = len(body), 0o644, 1_600_000_000
        tf.addfile(ti, io.BytesIO(body))
    src = "cgd-thin-repeat:1"
    build(d, str(tmp_path / "ctx"), src, textwrap.dedent(f"""\
        FROM {busybox}
        ADD same.tar /
        RUN echo changed > /added/f; rm /etc/group
        ADD same.tar /
        """), {"same.tar": buf.getvalue()})
    ids = diff_ids(d, src)
    assert len(ids) == 4 and ids[1] == ids[3], ids
    tag = "cgd-thin-repeat:thin"
    convert(d, cvmfs, src, tag)
    assert sh(d, tag, "test ! -e /etc/group; cat /added/f") == sh(d, src, "cat /added/f")
    assert_same_view(export_of(d, tag), as_published(cvmfs, export_of(d, src)),
                     "thin image with repeated layers")


def test_hostile_published_whiteout_index_writes_nothing_outside(docker_clean: Dockerd, cvmfs,
                                                                 tmp_path):
    """`.metadata/whiteouts.json` comes from the repository: names in it that climb out
    ('..', absolute) must never make the driver create anything outside its masks."""
    d = docker_clean
    victim = tmp_path / "victim"
    victim.mkdir()
    evil = [f"../../../../../../../../../..{victim}/del", f"{victim}/abs", "..", "a/../../x",
            f"a/b/../../../../../../../../../../../..{victim}/deep"]
    with tempfile.TemporaryDirectory() as tree:
        base = ducc_layer_in(tree, "test.repo", "hostile-base", busybox_rootfs)
        top = ducc_layer_in(tree, "test.repo", "hostile-top", lambda fs: put(fs, "top", "top"))
        for url in (base, top):
            meta = os.path.join(tree, url.split("test.repo/", 1)[1], "..", ".metadata")
            os.makedirs(meta)
            with open(os.path.join(meta, "whiteouts.json"), "w") as f:
                json.dump({"markers": evil, "deleted": evil, "opaque": evil}, f)
        cvmfs.put_tree("test.repo", ".layers", os.path.join(tree, ".layers"))
    tag = "cgd-thin-hostile-index:1"
    cvmfs_thin(d, "make", "--layer", base, "--layer", top, "--tag", tag)
    before = overlay_mounts(d)
    r = d.docker("run", "--rm", "--network", "none", tag, "cat", "/top", check=False)
    assert os.listdir(victim) == []
    # The bad index is ignored (the layer is scanned instead), so the image still runs.
    assert (r.returncode, r.stdout) == (0, b"top"), r.stderr
    assert overlay_mounts(d) == before


def test_converting_a_thin_image_is_refused(docker_clean: Dockerd, cvmfs, source, tmp_path):
    """A thin image (or one built on it) holds only thin.json where its base layers should
    be: publishing that layer would give containers a /thin.json and nothing else."""
    d = docker_clean
    convert(d, cvmfs, source, "cgd-thin-nested:1")
    build(d, str(tmp_path / "ctx"), "cgd-thin-nested:2",
          "FROM cgd-thin-nested:1\nRUN echo more > /data/more\n")
    for src in ("cgd-thin-nested:1", "cgd-thin-nested:2"):
        for flat in ((), ("--flat",)):
            r = convert(d, cvmfs, src, "cgd-thin-nested:again", *flat, check=False)
            assert r.returncode == 1, (src, flat, r.stdout, r.stderr)
            assert f"{src} is a thin image or built on one" in r.stderr, r.stderr
            assert d.docker("image", "inspect", "cgd-thin-nested:again",
                            check=False).returncode != 0


# ---------------------------------------------------------------------------- set-uid


EUID_C = '#include <stdio.h>\n#include <unistd.h>\n' \
         'int main(void) { printf("euid=%d\\n", (int)geteuid()); return 0; }\n'


def test_set_uid_binaries_of_a_thin_image_work_as_in_the_source(docker_clean: Dockerd, cvmfs,
                                                                busybox, tmp_path):
    """The CVMFS client mounts `nosuid`, but a container execs through its own overlay
    mount: a set-uid binary of a thin image runs set-uid, as in the source image. File
    capabilities do not survive `cvmfs_server ingest`: cvmfs-thin says so."""
    from harness import need
    need(shutil.which("gcc") is not None and shutil.which("setcap") is not None,
         "gcc and setcap are not installed (a static test binary with a capability)")
    d = docker_clean
    ctx = tmp_path / "ctx"
    (ctx / "caps" / "usr/local/bin").mkdir(parents=True)
    (tmp_path / "euid.c").write_text(EUID_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(ctx / "euid"), str(tmp_path / "euid.c")],
                   check=True)
    pinger = ctx / "caps" / "usr/local/bin/pinger"
    shutil.copy(ctx / "euid", pinger)
    subprocess.run(["setcap", "cap_net_raw+ep", str(pinger)], check=True)
    caps_tar = subprocess.run(["tar", "-C", str(ctx / "caps"), "--xattrs",
                               "--xattrs-include=security.capability", "--numeric-owner",
                               "-cf", "-", "usr"], check=True, capture_output=True).stdout
    src = "cgd-thin-suid-src:1"
    build(d, str(ctx), src, f"FROM {busybox}\nCOPY euid /usr/local/bin/euid\n"
          f"RUN chmod 4755 /usr/local/bin/euid && echo {uuid.uuid4()} > /id\n"
          "ADD caps.tar /\n",
          {"euid": (ctx / "euid").read_bytes(), "caps.tar": caps_tar})
    tag = "cgd-thin-suid:1"
    r = convert(d, cvmfs, src, tag)
    for image in (src, tag):
        assert d.out("run", "--rm", "--network", "none", "--user", "65534", image,
                     "/usr/local/bin/euid") == "euid=0\n", image
    assert sh(d, tag, "stat -c %a /usr/local/bin/euid") == "4755\n"
    if cvmfs.real:
        assert "1 file(s) carry file capabilities (/usr/local/bin/pinger), which " \
            "cvmfs_server ingest does not keep" in r.stderr, r.stderr
