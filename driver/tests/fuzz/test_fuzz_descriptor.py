"""Fuzzing the thin-image descriptor parser (thin.parse_descriptor): arbitrary bytes,
arbitrary JSON, and descriptors shaped like real ones with hostile fields.

Property: it raises DescriptorError (what it documents), or returns a descriptor whose
every layer names a well-formed repository (allowed, when an allow-list is given), a
relative path inside it (no '..', not absolute, no NUL, not the root) and a digest of 64
hex digits or none.
"""

from __future__ import annotations

import json
import re

from fuzzkit import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cvmfs_graphdriver import thin
from cvmfs_graphdriver.thin import DescriptorError

ALLOWED = ["test.repo", "ducc.repo", "a"]
HEX = "0123456789abcdef" * 4
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def check(data: bytes, allowed, tally) -> None:
    try:
        desc = thin.parse_descriptor(data, allowed)
    except DescriptorError:
        tally.hostile(refused=True)
        return
    tally.hostile(refused=False)
    assert desc.layers
    for layer in desc.layers:
        assert REPO.fullmatch(layer.repo) and ".." not in layer.repo, layer
        if allowed is not None:
            assert layer.repo in allowed, layer
        parts = layer.path.split("/")
        assert layer.path and not layer.path.startswith("/") and "\x00" not in layer.path
        assert all(p not in ("", ".", "..") for p in parts), layer
        assert layer.digest == "" or re.fullmatch("[0-9a-f]{64}", layer.digest), layer


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

REPOS = ["test.repo", "ducc.repo", "a", "..", ".", "a..b", "", "x" * 300, "-a", "a/b",
         "test.repo\n", "test.repo\x00", "TEST.repo", 7, None, ["test.repo"]]
PATHS = ["layers/x", "", "/", "..", "../x", "a/../../x", "a/./b", "//a//", "a\x00b", "a\n",
         ".layers/ab/" + HEX + "/layerfs", "é/\udcff", "a" * 5000]
GOOD_REPOS = ["test.repo", "ducc.repo", "a"]
GOOD_PATHS = st.lists(st.sampled_from(["layers", "x", "é", HEX, ".layers"]), min_size=1,
                      max_size=3).map("/".join)
DIGESTS = ["", HEX, "sha256:" + HEX, HEX + "\n", "sha256:" + HEX + "\n", "sha512:" + HEX,
           HEX.upper(), "../../" + HEX[:58], 5, None]


@st.composite
def layer_entries(draw: st.DrawFn) -> object:
    shape = draw(st.sampled_from(["url"] * 4 + ["repo"] * 4 + ["junk"]))
    entry: dict = {}
    if draw(st.integers(0, 3)):
        entry["digest"] = draw(st.sampled_from([HEX, "sha256:" + HEX]) | st.sampled_from(DIGESTS))
    if shape == "url":
        repo = draw(st.sampled_from(GOOD_REPOS) | st.sampled_from(
            [r for r in REPOS if isinstance(r, str)]))
        scheme = draw(st.sampled_from(["cvmfs://"] * 6 + ["http://", "cvmfs:/", ""]))
        entry["url"] = f"{scheme}{repo}/{draw(GOOD_PATHS | st.sampled_from(PATHS))}"
    elif shape == "repo":
        entry["repo"] = draw(st.sampled_from(GOOD_REPOS) | st.sampled_from(REPOS))
        if draw(st.booleans()):
            entry["location"] = draw(GOOD_PATHS | st.sampled_from(PATHS + [0, [], {"a": 1}, None]))
    else:
        return draw(json_values)
    return entry


@st.composite
def descriptors(draw: st.DrawFn) -> bytes:
    doc: dict = {"version": draw(st.sampled_from(["1.0"] * 6 + ["1", "1.x.y", "2.0", "", 1, None,
                                                               "1\n"])),
                 "layers": draw(st.lists(layer_entries(), max_size=4)
                                | st.sampled_from([None, {}, "x", 0]))}
    if draw(st.booleans()):
        doc["origin"] = draw(json_values)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


ALLOW = st.sampled_from([ALLOWED, None, []])


@settings(max_examples=examples(200))
@given(data=descriptors(), allowed=ALLOW)
# A bug (fixed in thin.py): '$' in the repository and digest patterns let a trailing newline
# through (repository "test.repo\n", digest "<hex>\n").
@example(data=json.dumps({"version": "1.0", "layers": [
    {"url": "cvmfs://test.repo\n/layers/x"}]}).encode(), allowed=None)
@example(data=json.dumps({"version": "1.0", "layers": [
    {"repo": "test.repo", "digest": HEX + "\n"}]}).encode(), allowed=ALLOWED)
def test_descriptors_are_valid_or_refused(tally, data, allowed):
    check(data, allowed, tally)


@settings(max_examples=examples(150))
@given(data=st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()),
       allowed=ALLOW)
# A bug (fixed in thin.py): JSON nested deeper than Python's recursion limit was a
# RecursionError, not a DescriptorError.
@example(data=b"[" * 100_000, allowed=None)
@example(data=b'{"version": "1.0", "layers": ' + b"[" * 100_000, allowed=ALLOWED)
def test_arbitrary_bytes_are_refused_or_valid(tally, data, allowed):
    check(data, allowed, tally)
