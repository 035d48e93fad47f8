"""cvmfs-thin's image records and `gc` / `forget` / `images` on a dir: store (no engine
needed: the store is laid out as `convert` lays it out, records written through the
store as `convert` writes them), and its progress meter."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from typing import Dict

import pytest

from cvmfs_graphdriver import fdtree, thin
from cvmfs_graphdriver.publish import cli, gc, records
from cvmfs_graphdriver.publish.progress import Meter
from cvmfs_graphdriver.publish.stores import DirStore, PublishError

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def hexof(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def put_layer(root: str, name: str, size: int = 1000) -> str:
    """A published layer as convert leaves it (with hidden files: markers, CVMFS's own,
    its .metadata); its thin.json path."""
    h = hexof(name)
    rel = thin.layer_path(h)
    fs = os.path.join(root, rel)
    os.makedirs(os.path.join(fs, "etc"))
    with open(os.path.join(fs, "etc", "data"), "wb") as f:
        f.write(b"x" * size)
    for hidden in (".wh.gone", ".cvmfscatalog", "etc/.hidden"):
        with open(os.path.join(fs, hidden), "w") as f:
            f.write("kept\n")
    meta = os.path.join(os.path.dirname(fs), thin.METADATA_DIR)
    os.makedirs(meta)
    with open(os.path.join(meta, thin.ORIGIN_FILE), "w") as f:
        f.write("{}\n")
    return rel


def record(store: DirStore, image: str, paths, source_id: str = "sha256:" + "1" * 64,
           present=()) -> None:
    """Record a publication of `image` as convert does; `present`: the paths it found in
    the store already (the others it published)."""
    with store.session():
        prev = gc.read_record(store, image)
        rec = records.new_record(image, "src/" + image, source_id, "thin", list(paths), prev,
                                 gc.adoptable(store, list(present)), "diff-id", False)
        store.commit({records.record_path(image): rec.to_json()}, [])


def tree(root: str) -> Dict[str, bytes]:
    """Everything in the store but the lock file (whose holder note gc rewrites)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in files + dirs:
            p = os.path.join(top, name)
            rel = os.path.relpath(p, root)
            if rel == ".cvmfs-thin/cvmfs-thin.lock":
                continue
            out[rel] = b"<dir>" if os.path.isdir(p) else read(p)
    return out


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run(*argv: str, capsys) -> tuple:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def store(tmp_path):
    """Images a:1 (layers base, a) and b:1 (base, b); a:1 then republished as a:2 over
    base and a2 (a released), and c:1 (base, c) forgotten."""
    root = str(tmp_path / "store")
    os.makedirs(root)
    s = DirStore(root, "repo.example.org")
    L = {n: put_layer(root, n) for n in ("base", "a", "a2", "b", "c")}
    record(s, "reg/a:1", [L["base"], L["a"]])
    record(s, "reg/b:1", [L["base"], L["b"]])
    record(s, "reg/a:1", [L["base"], L["a2"]], source_id="sha256:" + "2" * 64)
    record(s, "reg/c:1", [L["base"], L["c"]])
    s.layers = L  # type: ignore[attr-defined]
    return s


def unit(rel: str) -> str:
    return records.unit_of(rel)


def test_a_record_round_trips_and_a_republication_releases_the_old_layers(store):
    a = gc.read_record(store, "reg/a:1")
    assert a is not None and a.paths == (store.layers["base"], store.layers["a2"])
    assert a.released == (store.layers["a"],) and not a.forgotten
    raw = json.loads(read(store.view(records.record_path("reg/a:1"))))
    assert raw["version"] == records.VERSION and raw["image"] == "reg/a:1"
    assert records.parse(a.to_json(), "x") == a


@pytest.mark.parametrize("doc,words", [
    ({"version": 3}, "record version 3"),
    ({"version": True}, "record version True"),
    ({"version": 2, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": []}, "a version 2 record without 'adopted'"),
    ({"version": 1, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": [], "adopted": []}, "a version 1 record with 'adopted'"),
    ({"version": 2, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": [], "adopted": [], "push": False}, "a version 2 record without 'digests'"),
    ({"version": 2, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": [], "adopted": [], "digests": "sha1", "push": False}, "'digests' is not one"),
    ({"version": 2, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": [], "adopted": [], "digests": "registry", "push": "yes"}, "'push' is not"),
    ({"version": 1, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": ["../../etc"]}, "is not a layer or flattened-image path"),
    ({"version": 1, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
      "paths": [".layers/ab/" + "cd" * 32 + "/layerfs"]}, "is not a layer"),  # wrong prefix
    ({"version": 1, "image": "x", "source": "s", "source_id": "i", "kind": "fat",
      "paths": []}, "kind 'fat'"),
])
def test_a_bad_record_is_refused_and_gc_changes_nothing(store, capsys, doc, words):
    bad = store.view(records.record_path("reg/bad:1"))
    with open(bad, "w") as f:
        json.dump(doc, f)
    before = tree(store.root)
    rc, out, err = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", capsys=capsys)
    assert rc == 1 and words in err and bad in err, err
    assert "nothing was changed" in err
    assert tree(store.root) == before


def test_gc_dry_run_changes_nothing_and_says_what_it_would_delete(store, capsys):
    run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
    before = tree(store.root)
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", capsys=capsys)
    assert rc == 0
    assert tree(store.root) == before
    L = store.layers
    for gone in ("a", "c"):
        assert f"would delete {unit(L[gone])} (" in out, out
    assert unit(L["base"]) not in out and unit(L["b"]) not in out
    assert "dry run: nothing was deleted; run again with --delete" in out
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--json", capsys=capsys)
    doc = json.loads(out)
    assert doc["dry_run"] is True and sorted(d["path"] for d in doc["delete"]) == \
        sorted([unit(L["a"]), unit(L["c"])])
    assert doc["bytes"] == sum(d["bytes"] for d in doc["delete"]) and doc["bytes"] > 2000
    assert tree(store.root) == before


def test_gc_delete_removes_only_unreferenced_layers_and_keeps_hidden_files(store, capsys):
    L = store.layers
    run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", capsys=capsys)
    assert rc == 0, out
    for gone in ("a", "c"):
        assert not os.path.lexists(store.view(unit(L[gone]))), gone
    for kept in ("base", "a2", "b"):
        fs = store.view(L[kept])
        for hidden in (".wh.gone", ".cvmfscatalog", "etc/.hidden"):
            assert read(os.path.join(fs, hidden)) == b"kept\n", (kept, hidden)
        assert os.path.isfile(os.path.join(os.path.dirname(fs), ".metadata", "origin.json"))
    # the forgotten record went, the released list was settled, nothing hidden was left
    assert gc.read_record(store, "reg/c:1") is None
    assert gc.read_record(store, "reg/a:1").released == ()
    for xx in {unit(L[n]).split("/")[1] for n in L}:
        assert not [n for n in os.listdir(store.view(f".layers/{xx}")) if n.startswith(".")]
    # a second gc has nothing to do
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", "--json",
                     capsys=capsys)
    assert json.loads(out)["delete"] == []


def test_a_layer_another_image_uses_is_kept(store, capsys):
    L = store.layers
    record(store, "reg/d:1", [L["a"]])  # a:1 released it, d:1 uses it
    run("forget", "reg/b:1", f"dir:{store.root}", capsys=capsys)
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", "--json",
                     capsys=capsys)
    doc = json.loads(out)
    assert [d["path"] for d in doc["delete"]] == [unit(L["b"])]
    assert doc["in_use"] == 2  # a (d:1 uses it) and base (a:1, c:1)
    assert os.path.isdir(store.view(L["a"])) and os.path.isdir(store.view(L["base"]))


def test_layers_no_record_names_are_never_collected(store, capsys):
    stranger = put_layer(store.root, "published-by-ducc")
    flat = os.path.join(store.root, thin.flat_path(hexof("flat")))
    os.makedirs(flat)
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", "--json",
                     capsys=capsys)
    assert json.loads(out)["unrecorded"] == 2
    assert os.path.isdir(store.view(stranger)) and os.path.isdir(flat)


def test_layers_found_unrecorded_are_adopted_and_never_collected(store, capsys):
    """e:1 is published over a layer DUCC (or an older cvmfs-thin, or `make`) put there
    and images without a record may use: republished without it, then forgotten, the
    layer stays; the layers e:1 published itself go."""
    L = store.layers
    ducc = put_layer(store.root, "published-by-ducc")
    mine = put_layer(store.root, "e-own")
    # base is recorded (a:1 uses it): found present, but cvmfs-thin's, not adopted
    record(store, "reg/e:1", [L["base"], ducc, mine], present=[L["base"], ducc])
    e = gc.read_record(store, "reg/e:1")
    assert e.adopted == (ducc,)
    record(store, "reg/e:1", [L["base"]], source_id="sha256:" + "3" * 64, present=[L["base"]])
    e = gc.read_record(store, "reg/e:1")
    assert e.adopted == (ducc,) and e.released == (mine,)
    # another image found ducc recorded (adopted by e:1): it may release it, gc keeps it
    record(store, "reg/f:1", [ducc], present=[ducc])
    assert gc.read_record(store, "reg/f:1").adopted == ()
    rc, out, _ = run("forget", "reg/f:1", "reg/e:1", f"dir:{store.root}", capsys=capsys)
    assert "reg/e:1: forgotten; its 1 path(s) go at the next" in out
    other = put_layer(store.root, "published-by-make")
    record(store, "reg/g:1", [other], present=[other])
    rc, out, _ = run("forget", "reg/g:1", f"dir:{store.root}", capsys=capsys)
    assert "reg/g:1: forgotten; its 0 path(s) go at the next" in out
    assert out.endswith("unless another image uses them (1 adopted, never collected)\n")
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", "--json",
                     capsys=capsys)
    assert rc == 0, out
    assert unit(mine) in [d["path"] for d in json.loads(out)["delete"]]
    assert json.loads(out)["unrecorded"] == 0  # ducc and other: adopted, in records
    assert os.path.isdir(store.view(ducc)) and not os.path.lexists(store.view(unit(mine)))
    assert os.path.isdir(store.view(other))


def test_a_version_1_record_is_read_as_adopting_nothing(store):
    doc = {"version": 1, "image": "x", "source": "s", "source_id": "i", "kind": "thin",
           "paths": [store.layers["a"]], "released": [], "forgotten": False}
    rec = records.parse(json.dumps(doc).encode(), "x")
    assert rec.adopted == () and rec.paths == (store.layers["a"],)
    assert (rec.digests, rec.push) == ("", None)  # unknown: a rerun publishes it again
    assert not rec.publishes("i", "thin", "diff-id", False)
    assert json.loads(rec.to_json())["version"] == records.VERSION == 2
    # rewritten (forget, gc) it stays readable, the unknowns still unknown
    again = records.parse(records.forgotten(rec).to_json(), "x")
    assert (again.digests, again.push, again.forgotten) == ("", None, True)


ID = "sha256:" + "1" * 64


@pytest.mark.parametrize("recorded,asked,skipped", [
    (("thin", "diff-id", False), ("thin", "diff-id", False), True),
    (("thin", "diff-id", True), ("thin", "diff-id", False), True),  # pushed already
    (("thin", "diff-id", False), ("thin", "diff-id", True), False),  # push: true now
    (("thin", "diff-id", False), ("thin", "registry", False), False),  # digests: registry
    (("thin", "registry", False), ("thin", "diff-id", False), False),
    (("flat", "diff-id", False), ("flat", "registry", False), True),  # flat: no layer keys
    (("thin", "diff-id", False), ("flat", "diff-id", False), False),
])
def test_a_rerun_skips_an_image_only_if_published_as_asked(recorded, asked, skipped):
    """A wish list switched to `digests: registry` or `push: true` publishes again what
    its record says was published otherwise (the record keeps both, round trip)."""
    kind, digests, push = recorded
    rec = records.new_record("reg/x:1", "x:1", ID, kind, [], None, [], digests, push)
    rec = records.parse(rec.to_json(), "x")
    assert (rec.digests, rec.push) == (digests, push)
    assert rec.publishes(ID, *asked) is skipped
    assert not rec.publishes("sha256:" + "2" * 64, kind, digests, push)
    assert not records.forgotten(rec).publishes(ID, kind, digests, push)


def test_gc_keeps_what_was_released_less_than_min_age_ago(store, capsys):
    """A nightly republication then gc --delete: the layers the old version used may be
    under running containers; the default --min-age (7d) keeps them, saying so."""
    L = store.layers
    run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
    rc, out, _ = run("gc", f"dir:{store.root}", "--delete", "--json", capsys=capsys)
    doc = json.loads(out)
    assert rc == 0 and doc["delete"] == [] and doc["min_age"] == 7 * 86400
    assert sorted(r["path"] for r in doc["recent"]) == sorted([unit(L["a"]), unit(L["c"])])
    assert all(time.time() - r["released_by"] < 60 for r in doc["recent"])
    assert os.path.isdir(store.view(L["a"])) and os.path.isdir(store.view(L["c"]))
    # the records still release them (the forgotten one is kept) for a later gc
    assert gc.read_record(store, "reg/a:1").released == (L["a"],)
    assert gc.read_record(store, "reg/c:1").forgotten
    rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "2h", capsys=capsys)
    assert f"kept {unit(L['a'])}: released 0s ago, less than --min-age 2h" in out, out
    assert "2 released less than 2h ago (--min-age), kept" in out
    # once old enough (a record written 8 days ago), it goes
    path = store.view(records.record_path("reg/a:1"))
    doc = json.loads(read(path))
    doc["updated"] -= 8 * 86400
    with open(path, "w") as f:
        json.dump(doc, f)
    rc, out, _ = run("gc", f"dir:{store.root}", "--delete", "--json", capsys=capsys)
    assert [d["path"] for d in json.loads(out)["delete"]] == [unit(L["a"])]
    assert not os.path.lexists(store.view(unit(L["a"]))) and os.path.isdir(store.view(L["c"]))
    assert gc.read_record(store, "reg/c:1").forgotten


@pytest.mark.parametrize("age,seconds", [("0", 0), ("90", 90), ("30s", 30), ("15m", 900),
                                         ("12h", 43200), ("7d", 604800)])
def test_min_age_units(age, seconds):
    assert gc.parse_age(age) == seconds


def test_a_bad_min_age_is_refused(store, capsys):
    with pytest.raises(SystemExit):
        cli.main(["gc", f"dir:{store.root}", "--min-age", "1w"])
    assert "'1w' is not an age: seconds, or a number with s, m, h or d" in \
        capsys.readouterr().err


def test_forget_an_unknown_image_says_how_to_list_them(store, capsys):
    rc, _, err = run("forget", "reg/nope:1", f"dir:{store.root}", capsys=capsys)
    assert rc == 1
    assert f"has no record of reg/nope:1: `cvmfs-thin images dir:{store.root}` lists" in err
    rc, out, _ = run("images", f"dir:{store.root}", "--json", capsys=capsys)
    assert sorted(r["image"] for r in json.loads(out)) == ["reg/a:1", "reg/b:1", "reg/c:1"]


def test_a_layer_being_published_is_not_removed(store, capsys):
    """A publisher holds the store's session from its first layer to its record: gc
    (which needs the store alone) is refused meanwhile and deletes nothing."""
    run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
    with held(store):
        before = tree(store.root)
        t0 = time.monotonic()
        rc, _, err = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", "--wait", "1",
                         capsys=capsys)
        assert rc == 1 and time.monotonic() - t0 >= 1
        assert f"is publishing into {store.root}: retry when it is done" in err, err
        assert tree(store.root) == before
    rc, _, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", capsys=capsys)
    assert rc == 0 and not os.path.exists(store.view(store.layers["c"]))


def test_a_record_path_that_leads_out_of_the_store_deletes_nothing(store, tmp_path, capsys):
    """`.layers/xx` replaced by a link to somewhere else: gc refuses to follow it."""
    L = store.layers
    outside = tmp_path / "outside"
    xx = unit(L["c"]).split("/")[1]
    os.rename(store.view(f".layers/{xx}"), outside)
    os.symlink(outside, store.view(f".layers/{xx}"))
    run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
    rc, _, err = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", capsys=capsys)
    assert rc == 1 and "leads out of the store" in err, err
    assert (outside / hexof("c") / "layerfs" / "etc" / "data").exists()


# ---------------------------------------------------------------------------- progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_in_a_log_is_plain_lines_at_intervals():
    out, clock = io.StringIO(), Clock()
    m = Meter("img:1", 2, 3_000_000, stream=out, clock=clock, log_interval=10)
    m.start_layer("publishing")
    r = m.reader(io.BytesIO(b"x" * 2_000_000))
    while r.read(100_000):
        clock.t += 1  # 100 kB/s... 20 reads, 20 s
    m.layer_done()
    m.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    # one line per 10 s of the 20 s it took, then the summary
    assert lines[:-1] == ["cvmfs-thin: img:1: layer 1/2 publishing, 1.1 MB of 3.0 MB, 0.1 MB/s",
                          "cvmfs-thin: img:1: layer 1/2 publishing, 2.0 MB of 3.0 MB, 0.1 MB/s"]
    assert lines[-1] == "cvmfs-thin: img:1: 1/2 layers, 2.0 MB in 20.0 s (0.1 MB/s)"


def test_progress_on_a_terminal_is_one_live_line():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, clock = Tty(), Clock()
    m = Meter("img:1", 1, 1_000_000, stream=out, clock=clock)
    assert m.live
    m.start_layer("publishing")
    r = m.reader(io.BytesIO(b"x" * 1_000_000))
    while r.read(250_000):
        clock.t += 0.5
    m.layer_done()
    m.finish()
    text = out.getvalue()
    draws = text.split("\r\x1b[K")
    # redrawn in place as the bytes come (each read after 0.5 s), cleared at the end
    assert "cvmfs-thin: img:1: layer 1/1 publishing, 0.5 MB of 1.0 MB, 1.0 MB/s" in draws
    assert "cvmfs-thin: img:1: layer 1/1 publishing, 0.8 MB of 1.0 MB, 0.8 MB/s" in draws
    assert text.count("\n") == 1 and text.endswith("1/1 layers, 1.0 MB in 2.0 s (0.5 MB/s)\n")


@pytest.mark.parametrize("argv", [["gc"], ["images"], ["images", "--json"],
                                  ["forget", "reg/a:1"]])
def test_records_commands_refuse_a_store_that_is_not_there(tmp_path, capsys, argv):
    """A mistyped store path: refused (not created, not shown as empty)."""
    rc, out, err = run(*argv, f"dir:{tmp_path}/nope", capsys=capsys)
    assert rc == 1 and out == ""
    assert err == f"cvmfs-thin: error: the store dir:{tmp_path}/nope does not exist (no " \
        f"directory {tmp_path}/nope): fix the store's path\n"
    assert not os.path.lexists(tmp_path / "nope")
    rc, out, err = run(*argv, "cvmfs:nope.example.org", "--cvmfs-root", str(tmp_path),
                       capsys=capsys)
    assert rc == 1 and f"the store cvmfs:nope.example.org does not exist (no directory " \
        f"{tmp_path}/nope.example.org): fix the repository's name, or --cvmfs-root" in err


def test_cvmfs_thins_store_directory_is_spelled_once():
    """stores.py owns `.cvmfs-thin` (and the lock's name): records.py builds on it, and
    the layout the docstring shows is the real one."""
    from cvmfs_graphdriver.publish import stores

    assert f"{stores.STORE_DIR}/images" == records.RECORDS_DIR
    with open(records.__file__, encoding="utf-8") as f:
        code = [line for line in f if not line.startswith("    ")]  # not the docstring
    assert not [line for line in code if f'"{stores.STORE_DIR}' in line], code
    assert f"    {stores.STORE_DIR}/{stores.LOCK_FILE}   " in stores.__doc__


def test_gc_deletes_in_batches_each_with_its_records(store, capsys, monkeypatch):
    """Each commit deletes at most `batch` paths and rewrites the records as they stand
    once those are gone: stopped between two commits, records and store agree."""
    L = store.layers
    run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
    recs = gc.load_records(store)
    p = gc.plan(store, recs)
    commits = []
    real = store.commit

    def commit(writes, deletes):
        real(writes, deletes)
        now = gc.load_records(store)
        commits.append((sorted(deletes), {rel: (r.released, r.forgotten)
                                          for rel, r in now.items()}))

    monkeypatch.setattr(store, "commit", commit)
    gc.collect(store, p, recs, batch=1)
    a_rec, c_rec = records.record_path("reg/a:1"), records.record_path("reg/c:1")
    assert [d for d, _ in commits] == [[u] for u in sorted([unit(L["a"]), unit(L["c"])])] + \
        [[c_rec]]
    n = [d for d, _ in commits].index([unit(L["a"])])
    # with a gone, a:1 no longer releases it (same commit); c:1 (forgotten) is kept until
    # its layer is gone, then dropped
    assert commits[n][1][a_rec] == ((), False)
    assert all(c[1][a_rec] == ((L["a"],), False) for c in commits[:n])
    assert commits[1][1][c_rec][1] is True and c_rec not in commits[2][1]
    assert not os.path.lexists(store.view(unit(L["c"]))) and os.path.isdir(store.view(L["b"]))


def test_a_cvmfs_store_deletes_at_most_200_paths_per_ingest(monkeypatch):
    """cvmfs_server joins an ingest's --delete paths into one argument (128 KiB at most):
    gc of 450 layers is three ingests (three transactions), not one that fails E2BIG."""
    from cvmfs_graphdriver.publish.stores import CvmfsStore

    units = [thin.layer_path(hexof(str(n))).rsplit("/", 1)[0] for n in range(450)]
    p = records.Plan(delete={u: 1 for u in units}, settled=frozenset(units))
    s = CvmfsStore("test.repo", cvmfs_server="cvmfs_server")
    calls = []
    monkeypatch.setattr(s, "_run_ingest", lambda cmd, feed: calls.append(cmd))
    gc.collect(s, p, {})
    deleted = [[c[i + 1] for i, a in enumerate(c) if a == "--delete"] for c in calls]
    assert [len(d) for d in deleted] == [200, 200, 50]
    assert sum(deleted, []) == units
    assert all(len(" ".join(d)) < 64 * 1024 for d in deleted)


def test_gc_refuses_a_store_that_is_not_there(tmp_path, capsys):
    rc, _, err = run("gc", f"dir:{tmp_path}/nope", capsys=capsys)
    assert rc == 1 and "does not exist" in err
    with pytest.raises(PublishError):
        DirStore(str(tmp_path / "nope"), "r").session(exclusive=True).__enter__()
    with DirStore(str(tmp_path / "new"), "r").session():  # publishing into it creates it
        assert os.path.isdir(tmp_path / "new" / ".cvmfs-thin")


def test_gc_measures_and_deletes_a_layer_deeper_than_python_recursion(store, capsys):
    """A layer is an image's tree, as deep as the image makes it (1100 levels here, past
    Python's recursion limit): gc counts its bytes and deletes it (fdtree, at any depth)."""
    L = store.layers
    fd = os.open(store.view(L["c"]), os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1100):  # one level at a time (os.makedirs recurses)
        os.mkdir("d", dir_fd=fd)
        down = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = down
    bottom = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(bottom, b"y" * 5000)
    os.close(bottom)
    os.close(fd)
    try:
        run("forget", "reg/c:1", f"dir:{store.root}", capsys=capsys)
        rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--json", capsys=capsys)
        assert rc == 0, out
        sizes = {d["path"]: d["bytes"] for d in json.loads(out)["delete"]}
        assert sizes[unit(L["c"])] >= 5000 + 1000, sizes
        rc, out, _ = run("gc", f"dir:{store.root}", "--min-age", "0", "--delete", capsys=capsys)
        assert rc == 0, out
        assert not os.path.lexists(store.view(unit(L["c"])))
        assert os.path.isdir(store.view(L["base"]))
    finally:  # pytest's own clean-up of its temporary directories recurses
        fdtree.remove_tree(store.root)


@contextlib.contextmanager
def held(store: DirStore, image: str = ""):
    """Another process in the store's session (as a publisher is from its first layer to
    its record) and, given `image`, holding that image's own lock too (as a publisher of
    it is from reading its record to writing the new one)."""
    locks = "[s.session()"
    if image:
        locks += f", s.record_lock({records.record_path(image)!r}, {image!r})"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\n"
         "from cvmfs_graphdriver.publish.stores import DirStore\n"
         f"s = DirStore({store.root!r}, 'r')\n"
         f"held = {locks}]\n"
         "for cm in held: cm.__enter__()\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        env={**os.environ, "PYTHONPATH": SRC}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_two_runs_never_publish_the_same_image_at_once(store):
    """Publishers share a dir: store's session, but one image's record is read, its
    image published and pushed, and its record written under that image's own lock: a
    second run for the same name is refused (or waits, --wait) instead of interleaving,
    which could release a layer the first one's pushed image uses. Other images go on."""
    rel = records.record_path("reg/a:1")
    with held(store, "reg/a:1"), store.session():
        with pytest.raises(PublishError, match=r"is publishing into reg/a:1 in "), \
                    store.record_lock(rel, "reg/a:1"):
            pass
        with store.record_lock(records.record_path("reg/b:1"), "reg/b:1"):
            pass  # another image: not held up
    with store.session(), store.record_lock(rel, "reg/a:1"):
        pass  # released with its holder
    assert not records.is_record_name(os.path.basename(rel) + ".lock")  # gc skips it


def test_forget_waits_for_a_publisher_of_the_same_image(store, capsys):
    """forget reads a record and writes it back forgotten: under the image's own lock, or
    it could overwrite the record a publisher of that image just wrote (and gc would then
    delete the layers its pushed image uses). Refused while one publishes; nothing written."""
    def recs():
        return {k: v for k, v in tree(os.path.join(store.root, records.RECORDS_DIR)).items()
                if records.is_record_name(os.path.basename(k))}
    before = recs()
    assert before
    with held(store, "reg/b:1"):
        rc, out, err = run("forget", "reg/a:2", "reg/b:1", f"dir:{store.root}",
                           capsys=capsys)
    assert rc != 0
    assert "is publishing into reg/b:1 in " in err, err
    assert recs() == before
    rc, out, _ = run("forget", "reg/b:1", f"dir:{store.root}", capsys=capsys)
    assert rc == 0 and "reg/b:1: forgotten" in out
