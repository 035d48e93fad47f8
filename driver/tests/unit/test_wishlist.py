"""cvmfs-thin's wish lists (DUCC's recipe shape): what a good one gives, and every bad one
refused with the entry and the fix. Tag globs against a real registry:
tests/integration/test_publish_batch.py."""

from __future__ import annotations

import json
import textwrap

import pytest

from cvmfs_graphdriver.publish import wishlist
from cvmfs_graphdriver.publish.wishlist import WishListError

DUCC = """\
version: 1
user: smosciat
cvmfs_repo: unpacked.example.org
output_format: '$(scheme)://registry.example.org/thin/$(image)'
input:
    - 'https://registry.hub.docker.com/econtal/numpy-mkl:latest'
    - 'https://registry.hub.docker.com/library/debian:stable'
    - 'registry.example.org/app:v1.*'
    - 'busybox'
"""


def parse(text: str) -> wishlist.WishList:
    return wishlist.parse(textwrap.dedent(text), "w.yaml")


def test_a_ducc_recipe_is_read_as_ducc_reads_it():
    wl = parse(DUCC)
    assert (wl.repo, wl.store, wl.thin, wl.flat, wl.push, wl.digests) == \
        ("unpacked.example.org", "cvmfs:unpacked.example.org", True, False, False, "diff-id")
    tags = {"v1.0", "v1.1", "v10", "v2.0", "latest"}
    wishes = wishlist.expand(wl, lambda ref: sorted(tags) if ref.repository == "app" else [])
    # v1.* matches v1.0 and v1.1, not v10 or v2.0
    assert [(w.source, w.output, w.kind) for w in wishes] == [
        ("econtal/numpy-mkl:latest", "registry.example.org/thin/econtal/numpy-mkl:latest", "thin"),
        ("debian:stable", "registry.example.org/thin/library/debian:stable", "thin"),
        ("registry.example.org/app:v1.0", "registry.example.org/thin/app:v1.0", "thin"),
        ("registry.example.org/app:v1.1", "registry.example.org/thin/app:v1.1", "thin"),
        ("busybox:latest", "registry.example.org/thin/library/busybox:latest", "thin"),
    ]


def test_ducc_variables_and_thin_and_flat():
    wl = parse("""\
        version: 1
        cvmfs_repo: unpacked.example.org
        store: dir:/srv/layers
        output_format: 'reg.example.org/$(registry)/$(repository)/x:$(tag)'
        thin: true
        flat: true
        push: true
        digests: registry
        input: ['https://registry.hub.docker.com/library/debian:stable', 'busybox:1']
        """)
    assert (wl.store, wl.push, wl.digests) == ("dir:/srv/layers", True, "registry")
    got = [(w.source, w.output, w.kind) for w in wishlist.expand(wl, lambda r: [])]
    assert got == [
        ("debian:stable", "reg.example.org/registry.hub.docker.com/library/debian/x:stable",
         "thin"),
        ("debian:stable", "reg.example.org/registry.hub.docker.com/library/debian/x:stable-flat",
         "flat"),
        ("busybox:1", "reg.example.org/docker.io/library/busybox/x:1", "thin"),
        ("busybox:1", "reg.example.org/docker.io/library/busybox/x:1-flat", "flat"),
    ]


BASE = "version: 1\ncvmfs_repo: r.example.org\noutput_format: 'reg.io/thin/$(image)'\n"


@pytest.mark.parametrize("text,words", [
    ("[1, 2", "w.yaml: not YAML"),
    ("- a\n- b\n", "w.yaml: a wish list is a mapping"),
    (BASE + "input: [a]\ninputs: [b]\n", "unknown key 'inputs'; known keys: version"),
    ("version: 1\ncvmfs_repo: r\ninput: [a]\n", "'output_format' is missing (needed by"),
    ("version: 1\ncvmfs_repo: r\noutput_format: 'x/$(image)'\n", "'input' is missing"),
    (BASE + "input: [{image: a, tag: b}]\n",
     "input entry 1: a mapping entry has the keys image (required) and output_format, "
     "not 'tag'"),
    (BASE + "input: [{output_format: 'x/y:1'}]\n", "a mapping entry has the keys image"),
    (BASE + "input: [{image: 'reg.io/a:1.*', output_format: 'reg.io/fixed:1'}]\n",
     "input entry 1: output_format 'reg.io/fixed:1' has neither $(image) nor $(tag)"),
    ("version: 1\ncvmfs_repo: r\nflat: true\n"
     "input: [{image: a, output_format: 'reg.io/x:1'}]\n",
     "thin and flat both: set flat_output_format"),
    (BASE.replace("version: 1", "version: 2") + "input: [a]\n",
     "version 2: this cvmfs-thin reads wish lists of version 1"),
    (BASE.replace("r.example.org", "'bad repo'") + "input: [a]\n", "is not a repository name"),
    (BASE + "input: []\n", "input must be a non-empty list"),
    (BASE + "input: [a, 3]\n", "input entry 2 (3) is neither an image nor a mapping"),
    (BASE + "input: ['reg.io/a*/b:1']\n", "input entry 1: 'reg.io/a*/b:1' is not an image"),
    (BASE + "input: ['Reg.io/UPPER:1']\n", "is not an image reference"),
    (BASE + "input: ['reg.io/a:x*@sha256:" + "a" * 64 + "']\n",
     "a tag glob and a digest do not go together"),
    (BASE.replace("$(image)", "$(img)") + "input: [a]\n", "uses $(img); known variables"),
    (BASE.replace("$(image)", "fixed") + "input: [a]\n", "has neither $(image) nor $(tag)"),
    (BASE + "input: [a]\nthin: false\n", "thin and flat are both false"),
    (BASE + "input: [a]\nflat: yes please\n", "flat must be true or false"),
    (BASE + "input: [a]\nflat: true\nflat_output_format: 'reg.io/thin/$(image)'\n",
     "flat_output_format equals output_format"),
    (BASE + "input: [a]\ndigests: sha1\n", "digests must be diff-id or registry"),
    (BASE + "input: [a]\nstore: s3:bucket\n", "store 's3:bucket': use dir:PATH or cvmfs:"),
])
def test_a_bad_wish_list_is_refused_with_what_to_fix(text, words):
    with pytest.raises(WishListError) as e:
        wishlist.parse(text, "w.yaml")
    assert words in str(e.value)
    assert str(e.value).startswith("w.yaml")


def test_entries_may_name_their_own_output():
    wl = parse("""\
        version: 1
        cvmfs_repo: r.example.org
        input:
          - image: 'reg.io/tools/gcc:13'
            output_format: 'reg.io/thin/gcc:13'
          - image: 'reg.io/app:1.*'
            output_format: 'reg.io/thin/app-$(tag)'
        """)
    got = [(w.source, w.output) for w in wishlist.expand(wl, lambda ref: ["1.0", "2.0"])]
    assert got == [("reg.io/tools/gcc:13", "reg.io/thin/gcc:13"),
                   ("reg.io/app:1.0", "reg.io/thin/app-1.0")]


def test_a_glob_that_matches_nothing_names_the_tags():
    wl = parse(BASE + "input: ['reg.io/app:v9.*']\n")
    with pytest.raises(WishListError) as e:
        wishlist.expand(wl, lambda ref: ["v1", "v2"])
    assert "no tag of reg.io/app matches 'v9.*' (its tags: v1, v2)" in str(e.value)


def test_two_sources_with_one_output_name_are_refused():
    wl = parse(BASE.replace("$(image)", "x:$(tag)") + "input: ['reg.io/a:1', 'reg.io/b:1']\n")
    with pytest.raises(WishListError) as e:
        wishlist.expand(wl, lambda ref: [])
    assert "reg.io/a:1 and reg.io/b:1 would both be published as reg.io/thin/x:1" in str(e.value)


def test_an_output_name_that_is_no_image_name_is_refused():
    wl = parse(BASE.replace("reg.io/thin/$(image)", "Reg.io/THIN/$(image)") + "input: [a]\n")
    with pytest.raises(WishListError) as e:
        wishlist.expand(wl, lambda ref: [])
    assert "gives the output name 'Reg.io/THIN/library/a:latest', which is not" in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(WishListError) as e:
        wishlist.load(str(tmp_path / "nope.yaml"))
    assert f"cannot read the wish list {tmp_path}/nope.yaml: No such file" in str(e.value)


BATCH = """\
version: 1
cvmfs_repo: unpacked.example.org
store: dir:{store}
output_format: 'reg.example.org/thin/$(image)'
input: ['disk:1', 'engine:1', 'good:1']
"""


def test_one_image_failing_does_not_end_the_batch(tmp_path, monkeypatch, capsys):
    """A full disk (OSError) or the engine's error (docker's, requests') while publishing
    one image: that image fails, the next ones are published, the summary is printed."""
    import docker.errors

    from cvmfs_graphdriver.publish import cli, images

    path = tmp_path / "w.yaml"
    path.write_text(BATCH.format(store=tmp_path / "store"))
    monkeypatch.setattr(images, "docker_client", lambda host: object())

    def publish_image(store, client, job):
        if job.source == "disk:1":
            raise OSError(28, "No space left on device")
        if job.source == "engine:1":
            raise docker.errors.APIError("500 Server Error: engine gone")
        return {"source": job.source, "image": job.tag, "kind": "thin", "status": "published",
                "layers": 1, "layers_published": 1}

    monkeypatch.setattr(cli, "publish_image", publish_image)
    rc = cli.main(["publish", str(path), "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert rc == 1
    assert [(i["source"], i["status"]) for i in doc["images"]] == [
        ("disk:1", "failed"), ("engine:1", "failed"), ("good:1", "published")]
    assert doc["failed"] == 2 and doc["published"] == 1
    assert "OSError: [Errno 28] No space left on device" in doc["images"][0]["error"]
    assert "APIError: 500 Server Error: engine gone" in doc["images"][1]["error"]
    assert "Traceback" not in err


def test_an_os_error_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    from cvmfs_graphdriver.publish import cli

    def convert(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "convert", convert)
    rc = cli.main(["convert", "x", "--store", f"dir:{tmp_path}", "--repo", "r.org",
                   "--tag", "t"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("cvmfs-thin: error: OSError: [Errno 28] No space left on device: "
                          "fix the cause and run the same command again"), err
