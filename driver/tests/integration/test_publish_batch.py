"""cvmfs-thin for a publisher that keeps a store for years (issue 12): wish lists against
a real registry (tag globs through its tags/list API), resumable batch runs and their
--json report, progress on a terminal and in logs, and gc on the dir: store the driver
reads and on the real CernVM-FS stratum 0 (the `cvmfs` fixture; see test_thin.py).

Every test uses its own image names (a uuid) in the session's registry and stores."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Dict, List

import pytest
from dockerutil import build
from harness import Dockerd
from test_thin import _publisher_extra, cvmfs_thin, diff_ids, in_transaction, sh  # noqa: F401

from cvmfs_graphdriver.publish import records, wishlist
from cvmfs_graphdriver.publish import registry as reg_api

pytestmark = pytest.mark.docker

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "src")


def image(d: Dockerd, tmp_path, tag: str, mb: int = 0) -> str:
    """A small image of its own (busybox + a unique file, and `mb` MB of random data)."""
    extra = f"; head -c {mb * 1000 * 1000} /dev/urandom > /big" if mb else ""
    build(d, str(tmp_path / f"ctx-{uuid.uuid4().hex[:8]}"), tag, textwrap.dedent(f"""\
        FROM busybox:test
        RUN echo {tag} {uuid.uuid4()} > /id{extra}
        """))
    return tag


def push(d: Dockerd, tag: str) -> None:
    d.docker("push", tag)


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return str(path)


def run_publish(d: Dockerd, wl: str, *extra: str, check: bool = True):
    r = cvmfs_thin(d, "publish", wl, "--json", *extra, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"publish failed ({r.returncode}):\n{r.stderr[-3000:]}\n{r.stdout}")
    return r, json.loads(r.stdout)


IMAGE_KEYS = {"source", "source_id", "image", "image_id", "kind", "status", "layers",
              "layers_published", "layers_present", "bytes_published", "source_bytes",
              "thin_layer_bytes", "pushed", "seconds"}


# ---------------------------------------------------------------------------- registry tags


def test_tag_globs_are_expanded_from_a_real_registry(docker_clean: Dockerd, registry,
                                                     tmp_path, monkeypatch):
    d = docker_clean
    name = f"{registry.address}/globs-{uuid.uuid4().hex[:8]}/app"
    image(d, tmp_path, f"{name}:1.0")
    for tag in ("1.1", "1.10", "2.0", "latest"):
        d.docker("tag", f"{name}:1.0", f"{name}:{tag}")
    for tag in ("1.0", "1.1", "1.10", "2.0", "latest"):
        push(d, f"{name}:{tag}")
    ref = reg_api.parse_reference(name)
    # pages of two: the registry's Link headers are followed to the end
    monkeypatch.setattr(reg_api, "TAGS_PAGE", 2)
    assert reg_api.Registry().tags(ref) == ["1.0", "1.1", "1.10", "2.0", "latest"]
    wl = write(tmp_path / "w.yaml", f"""\
        version: 1
        cvmfs_repo: dir.repo
        output_format: '{registry.address}/thin/$(repository):$(tag)'
        input: ['http://{name}:1.?', '{name}:[2]*']
        """)
    wishes = wishlist.expand(wishlist.load(wl), reg_api.Registry().tags)
    assert [w.source for w in wishes] == [f"{name}:1.0", f"{name}:1.1", f"{name}:2.0"]
    assert wishes[0].output == f"{registry.address}/thin/{ref.repository}:1.0"
    # a repository the registry does not know: its answer, named
    with pytest.raises(reg_api.PublishError) as e:
        reg_api.Registry().tags(reg_api.parse_reference(f"{name}-nope:1"))
    assert "registry answered 404" in str(e.value)


# ---------------------------------------------------------------------------- batch + resume


def test_a_wish_list_is_published_resumed_and_reported_as_json(docker_clean: Dockerd, registry,
                                                              cvmfs, tmp_path):
    d = docker_clean
    base = f"{registry.address}/batch-{uuid.uuid4().hex[:8]}"
    for tag in ("1.0", "1.1"):
        push(d, image(d, tmp_path, f"{base}/app:{tag}"))
    late = f"{base}/late:1"
    image(d, tmp_path, late)  # not pushed yet: the first run cannot pull it
    store = cvmfs.stores["dir.repo"]
    wl = write(tmp_path / "wishes.yaml", f"""\
        version: 1
        user: ignored
        cvmfs_repo: dir.repo
        store: dir:{store}
        output_format: '$(scheme)://{registry.address}/thin/$(repository):$(tag)'
        push: true
        input:
          - 'http://{base}/app:1.*'
          - '{late}'
        """)
    thin = f"{registry.address}/thin/{base.split('/', 1)[1]}"

    # First run: the two app images published and pushed, `late` fails (not in the
    # registry); exit 1, the report says which.
    r, doc = run_publish(d, wl, check=False)
    assert r.returncode == 1, r.stderr
    assert set(doc) == {"version", "store", "repository", "images", "published", "unchanged",
                        "skipped", "failed", "changed"}
    assert (doc["version"], doc["store"], doc["repository"]) == (1, f"dir:{store}", "dir.repo")
    assert (doc["published"], doc["skipped"], doc["failed"], doc["changed"]) == (2, 0, 1, True)
    ok, failed = doc["images"][:2], doc["images"][2]
    for entry, tag in zip(ok, ("1.0", "1.1")):
        assert set(entry) == IMAGE_KEYS
        assert entry["status"] == "published" and entry["pushed"] is True
        assert entry["image"] == f"{thin}/app:{tag}" and entry["source"] == f"{base}/app:{tag}"
        assert entry["layers"] == 2 and entry["kind"] == "thin"
        assert entry["source_id"] == d.out("image", "inspect", "--format", "{{.Id}}",
                                           entry["source"]).strip()
    assert ok[0]["layers_published"] >= 1 and ok[0]["bytes_published"] > 0
    assert failed["status"] == "failed" and failed["source"] == late
    assert f"cannot pull {late}" in failed["error"]
    assert "cvmfs-thin: [1/3]" in r.stderr  # progress on stderr, the JSON alone on stdout
    cvmfs.refresh("dir.repo")

    # The thin images were pushed: pulled back, they run as their sources.
    for tag in ("1.0", "1.1"):
        d.docker("rmi", f"{thin}/app:{tag}")
        d.docker("pull", f"{thin}/app:{tag}")
        assert sh(d, f"{thin}/app:{tag}", "cat /id") == sh(d, f"{base}/app:{tag}", "cat /id")

    # The rerun after the failure is fixed: what was published is skipped, the rest done.
    push(d, late)
    r, doc = run_publish(d, wl)
    assert [e["status"] for e in doc["images"]] == ["skipped", "skipped", "published"]
    assert (doc["published"], doc["skipped"], doc["failed"], doc["changed"]) == (1, 2, 0, True)
    assert f"{thin}/app:1.0: published from {base}/app:1.0" in r.stderr
    assert "already, skipped" in r.stderr
    cvmfs.refresh("dir.repo")
    assert sh(d, f"{thin}/late:1", "cat /id") == sh(d, late, "cat /id")

    # Nothing left to do: nothing changed (what a playbook's changed_when reads).
    r, doc = run_publish(d, wl)
    assert [e["status"] for e in doc["images"]] == ["skipped"] * 3 and doc["changed"] is False

    # The records name what each image uses.
    listed = json.loads(cvmfs_thin(d, "images", f"dir:{store}", "--json").stdout)
    mine = {e["image"]: e for e in listed if e["image"].startswith(thin)}
    assert sorted(mine) == [f"{thin}/app:1.0", f"{thin}/app:1.1", f"{thin}/late:1"]
    assert mine[f"{thin}/late:1"]["paths"] == \
        [f".layers/{h[:2]}/{h}/layerfs" for h in diff_ids(d, late)]


def recorded(rec_dir: str) -> list:
    """The image records in `rec_dir` (not the images' lock files beside them)."""
    if not os.path.isdir(rec_dir):
        return []
    return [n for n in os.listdir(rec_dir) if records.is_record_name(n)]


def test_a_killed_run_continues_where_it_stopped(docker_clean: Dockerd, registry, cvmfs,
                                                tmp_path):
    d = docker_clean
    base = f"{registry.address}/killed-{uuid.uuid4().hex[:8]}"
    first, second = f"{base}/a:1", f"{base}/b:1"
    push(d, image(d, tmp_path, first))
    push(d, image(d, tmp_path, second, mb=40))  # long enough to be killed in
    store = str(tmp_path / "store")
    os.makedirs(store)
    wl = write(tmp_path / "w.yaml", f"""\
        version: 1
        cvmfs_repo: dir.repo
        store: dir:{store}
        output_format: 'thin.example.org/$(repository):$(tag)'
        input: ['{first}', '{second}']
        """)
    rec_dir = os.path.join(store, records.RECORDS_DIR)
    proc = subprocess.Popen([sys.executable, "-m", "cvmfs_graphdriver.publish.cli", "publish",
                             wl, "--json"], env={**os.environ, "DOCKER_HOST": d.host},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not recorded(rec_dir):
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert len(recorded(rec_dir)) == 1  # killed before the second image's record

    r, doc = run_publish(d, wl)
    assert [(e["source"], e["status"]) for e in doc["images"]] == \
        [(first, "skipped"), (second, "published")]
    big = diff_ids(d, second)[-1]
    assert os.path.isdir(os.path.join(store, f".layers/{big[:2]}/{big}/layerfs"))
    assert not [n for n in os.listdir(os.path.join(store, ".layers", big[:2]))
                if ".partial-" in n]


# ---------------------------------------------------------------------------- progress


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_in_logs(docker_clean: Dockerd,
                                                                       tmp_path):
    d = docker_clean
    src = image(d, tmp_path, f"cgd-progress-{uuid.uuid4().hex[:8]}:1", mb=8)
    args = [sys.executable, "-m", "cvmfs_graphdriver.publish.cli", "convert", src,
            "--repo", "dir.repo", "--tag", f"{src}-thin"]
    env = {**os.environ, "DOCKER_HOST": d.host}

    # stderr a pipe (a log): no carriage returns, no escapes; a summary line per image.
    os.makedirs(tmp_path / "s1")
    r = subprocess.run([*args, "--store", f"dir:{tmp_path}/s1"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if " layers, " in x and " MB in " in x]
    assert len(lines) == 1 and lines[0].startswith(f"cvmfs-thin: {src}: 2/2 layers, "), r.stderr

    # stderr a terminal: the live line, redrawn in place, with layers, bytes and rate.
    os.makedirs(tmp_path / "s2")
    master, slave = pty.openpty()
    proc = subprocess.Popen([*args, "--store", f"dir:{tmp_path}/s2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks: List[bytes] = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(30) == 0
    text = b"".join(chunks).decode(errors="replace")
    draws = [x for x in text.split("\r\x1b[K") if f"cvmfs-thin: {src}: layer " in x]
    assert draws, text
    assert any(" publishing, " in x and " MB of " in x and " MB/s" in x for x in draws), draws


# ---------------------------------------------------------------------------- gc


def convert_to(d: Dockerd, cvmfs, repo: str, src: str, tag: str):
    r = cvmfs_thin(d, "convert", src, *cvmfs.store_args(repo), "--tag", tag, "--wait", "120")
    cvmfs.refresh(repo)
    return r


def store_spec(cvmfs, repo: str) -> List[str]:
    args = cvmfs.store_args(repo)
    spec = args[1]
    return [spec, "--cvmfs-root", "/cvmfs", "--wait", "120"] if spec.startswith("cvmfs:") \
        else [spec]


def gc_json(d: Dockerd, cvmfs, repo: str, *extra: str) -> Dict:
    # --min-age 0: collect what was released a moment ago (the default keeps it 7d)
    return json.loads(cvmfs_thin(d, "gc", *store_spec(cvmfs, repo), "--json", "--min-age", "0",
                                 *extra).stdout)


@pytest.mark.parametrize("repo", ["dir.repo", "test.repo"])
def test_gc_collects_a_forgotten_image_and_keeps_what_runs(docker_clean: Dockerd, cvmfs,
                                                           busybox, tmp_path, repo):
    """dir.repo: the dir: store the driver reads; test.repo: the cvmfs: store, a real
    stratum 0 (gc deletes in one `cvmfs_server ingest` transaction)."""
    d = docker_clean
    n = uuid.uuid4().hex[:8]
    keep_src, gone_src = image(d, tmp_path, f"cgd-gc-keep-{n}:1"), \
        image(d, tmp_path, f"cgd-gc-gone-{n}:1")
    # busybox's own layer stays used by a record that is never forgotten
    convert_to(d, cvmfs, repo, busybox, "cgd-gc-busybox:thin")
    convert_to(d, cvmfs, repo, keep_src, f"cgd-gc-keep-{n}:thin")
    convert_to(d, cvmfs, repo, gone_src, f"cgd-gc-gone-{n}:thin")
    view = cvmfs.publisher_view(repo)
    gone_top, keep_top = diff_ids(d, gone_src)[-1], diff_ids(d, keep_src)[-1]
    gone_unit = f".layers/{gone_top[:2]}/{gone_top}"
    keep_fs = f"{view}/.layers/{keep_top[:2]}/{keep_top}/layerfs"
    base_fs = f"{view}/.layers/{diff_ids(d, busybox)[0][:2]}/{diff_ids(d, busybox)[0]}/layerfs"

    r = cvmfs_thin(d, "forget", f"cgd-gc-gone-{n}:thin", *store_spec(cvmfs, repo))
    assert "forgotten; its 2 path(s) go at the next" in r.stdout
    cvmfs.refresh(repo)
    dry = gc_json(d, cvmfs, repo)
    assert dry["dry_run"] is True and gone_unit in [x["path"] for x in dry["delete"]]
    assert os.path.isdir(f"{view}/{gone_unit}/layerfs")  # the dry run deleted nothing
    assert os.path.isfile(f"{view}/{records.record_path(f'cgd-gc-gone-{n}:thin')}")

    done = gc_json(d, cvmfs, repo, "--delete")
    cvmfs.refresh(repo)
    assert done["dry_run"] is False and gone_unit in [x["path"] for x in done["delete"]]
    assert not os.path.exists(f"{view}/{gone_unit}")
    assert not os.path.exists(f"{view}/{records.record_path(f'cgd-gc-gone-{n}:thin')}")
    for fs in (keep_fs, base_fs):  # kept whole, hidden files and .metadata included
        assert os.path.isfile(f"{os.path.dirname(fs)}/.metadata/origin.json"), fs
        assert os.path.isfile(f"{fs}/bin/busybox" if fs == base_fs else f"{fs}/id"), fs
    if repo == "test.repo":
        assert os.path.isfile(f"{keep_fs}/.cvmfscatalog")  # ingest's own, kept
        assert not in_transaction(repo)
    assert sh(d, f"cgd-gc-keep-{n}:thin", "cat /id") == sh(d, keep_src, "cat /id")
    again = gc_json(d, cvmfs, repo, "--delete")
    assert gone_unit not in [x["path"] for x in again["delete"]]
