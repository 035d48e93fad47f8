"""containerd's filter syntax: containerd's own test cases (filters/filter_test.go, 1.6), then
the filters containerd sends a snapshotter."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import pytest

from cvmfs_graphdriver.snapshotter import filters
from cvmfs_graphdriver.snapshotter.metastore import (
    KIND_ACTIVE,
    KIND_COMMITTED,
    KIND_VIEW,
    Info,
    adapt,
)

# containerd's corpus: (name, other, labels)
CORPUS = [
    ("foo", "", {"foo": "true"}),
    ("bar", "", {}),
    ("foo", "", {"foo": "present", "more complex label": "present"}),
    ("bar", "", {"bar": "true"}),
    ("fooer", "", {'more complex label with \\ and "': "present"}),
    ("fooer", "", {'more complex label with \\ and ".post': "present"}),
    ("baz", "too complex, yo", {}),
    ("bazo", "abc", {}),
    ("compound", "", {"foo": "omg_asdf.asdf-qwer"}),
]


def _adaptor(entry: Tuple[str, str, Dict[str, str]]) -> filters.Adaptor:
    name, other, labels = entry

    def field(path: Sequence[str]) -> Tuple[str, bool]:
        if path[0] == "name":
            return name, bool(name)
        if path[0] == "other":
            return other, bool(other)
        if path[0] == "labels":
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return "", False

    return field


ALL = list(range(len(CORPUS)))

CASES = [
    ("Empty", "", ALL),
    ("Present", "name", ALL),
    ("LabelPresent", "labels.foo", [0, 2, 8]),
    ("NameAndLabelPresent", "labels.foo,name", [0, 2, 8]),
    ("LabelValue", "labels.foo==true", [0]),
    ("LabelValuePunctuated", "labels.foo==omg_asdf.asdf-qwer", [8]),
    ("Name", "name==bar", [1, 3]),
    ("NameNotEqual", "name!=bar", [0, 2, 4, 5, 6, 7, 8]),
    ("NameAndLabelPresent2", "name==bar,labels.bar", [3]),
    ("QuotedValue", 'other=="too complex, yo"', [6]),
    ("RegexpValue", "other~=[abc]+,name!=foo", [6, 7]),
    ("RegexpQuotedValue", "other~=/[abc]+/,name!=foo", [6, 7]),
    ("RegexpQuotedValue2", "other~=/[abc]{1,2}/,name!=foo", [6, 7]),
    ("RegexpQuotedValueGarbage", 'other~=/[abc]{0,1}"\\//,name!=foo', []),
    ("NameAndLabelValue", "name==bar,labels.bar==true", [3]),
    ("NameAndLabelValueNoMatch", "name==bar,labels.bar==wrong", []),
    ("LabelQuotedFieldPathPresent", 'name==foo,labels."more complex label"', [2]),
    ("LabelQuotedFieldPathPresentWithQuoted",
     'labels."more complex label with \\\\ and \\""==present', [4]),
    ("LabelQuotedFieldPathPresentWithQuotedEmbed",
     'labels."more complex label with \\\\ and \\"".post==present', [5]),
]

ERRORS = [
    ("LabelValueNoAltQuoting", "labels.|foo|==omg_asdf.asdf-qwer",
     "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: "
     "invalid quote encountered"),
    ("LabelQuotedFieldPathPresentWithQuotedEmbedInvalid",
     'labels.?"more complex label with \\\\ and \\"".post==present',
     'filters: parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post'
     '==present]: expected field or quoted'),
    ("TrailingComma", "name==foo,", "filters: parse error: [name==foo,]: expected field or "
     "quoted"),
    ("TrailingFieldSeparator", "labels.", "filters: parse error: [labels.]: expected field or "
     "quoted"),
    ("MissingValue", "image~=,id?=?fbaq",
     "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"),
    ("FieldQuotedLiteralNotTerminated", "labels.ns/key==value",
     "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated"),
    ("ValueQuotedLiteralNotTerminated", "labels.key==/value",
     "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated"),
]


@pytest.mark.parametrize("name, text, expected", CASES, ids=[c[0] for c in CASES])
def test_containerd_filter_cases(name, text, expected):
    f = filters.parse(text)
    assert [i for i, e in enumerate(CORPUS) if f.match(_adaptor(e))] == expected


@pytest.mark.parametrize("name, text, message", ERRORS, ids=[c[0] for c in ERRORS])
def test_containerd_filter_errors(name, text, message):
    with pytest.raises(filters.FilterError) as e:
        filters.parse(text)
    assert str(e.value) == message


def test_parse_all_is_any_and_empty_is_all():
    corpus = [_adaptor(e) for e in CORPUS]
    anyof = filters.parse_all(["name==bar", "labels.foo==true"])
    assert [i for i, a in enumerate(corpus) if anyof.match(a)] == [0, 1, 3]
    assert all(filters.parse_all([]).match(a) for a in corpus)


def test_an_invalid_regexp_matches_nothing():
    f = filters.parse("name~=/[unclosed/")
    assert not any(f.match(_adaptor(e)) for e in CORPUS)


# ------------------------------------------------------------------ on snapshot infos

INFOS = [
    Info("default/1/sha256:aa", "", KIND_COMMITTED, labels={
        "containerd.io/snapshot.ref": "sha256:aa", "containerd.io/gc.root": "x"}),
    Info("default/2/sha256:bb", "default/1/sha256:aa", KIND_COMMITTED, labels={
        "containerd.io/snapshot.ref": "sha256:bb"}),
    Info("extract-1", "default/1/sha256:aa", KIND_ACTIVE,
         labels={"containerd.io/snapshot.ref": "sha256:bb"}),
    Info("view", "default/2/sha256:bb", KIND_VIEW),
]


def _names(*texts: str):
    match = filters.parse_all(texts)
    return [i.name for i in INFOS if match.match(adapt(i))]


def test_the_lookup_containerd_does_after_already_exists():
    # unpacker: labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent chain id>"
    assert _names('labels."containerd.io/snapshot.ref"==sha256:aa,parent==""') == [
        "default/1/sha256:aa"]
    assert _names('labels."containerd.io/snapshot.ref"==sha256:bb,'
                  'parent=="default/1/sha256:aa"') == ["default/2/sha256:bb", "extract-1"]
    assert _names('labels."containerd.io/snapshot.ref"==sha256:bb,'
                  'parent=="default/1/sha256:aa",kind==committed') == ["default/2/sha256:bb"]


def test_snapshot_fields():
    assert _names("kind==view") == ["view"]
    assert _names("kind==active", "kind==view") == ["extract-1", "view"]
    assert _names('parent!=""') == ["default/2/sha256:bb", "extract-1", "view"]
    assert _names("labels.\"containerd.io/gc.root\"") == ["default/1/sha256:aa"]
    # `|` quotes a regular expression (it is not an "or" between selectors) ...
    assert _names("name~=|^default/[0-9]+/|") == ["default/1/sha256:aa", "default/2/sha256:bb"]
    # ... and inside the expression it is the regexp's own alternation
    assert _names("name~=/^(view|extract-1)$/") == ["extract-1", "view"]
    assert _names("nosuchfield") == []
    assert _names("nosuchfield!=x") == [i.name for i in INFOS]  # absent reads as ""
    assert _names("labels") == []  # the bare map is not a value
