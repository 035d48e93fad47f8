"""The bugs the fuzzers found, each as a minimal regression test (the fuzzers carry them
as @example cases too, where the bug is fixed)."""

from __future__ import annotations

import io
import json
import os

import pytest

from cvmfs_graphdriver import archive, thin, whiteouts

HEX = "0123456789abcdef" * 4


def test_a_descriptor_nested_too_deeply_is_a_descriptor_error():
    for data in (b"[" * 100_000, b'{"version": "1.0", "layers": ' + b"[" * 100_000):
        with pytest.raises(thin.DescriptorError, match="nests JSON too deeply"):
            thin.parse_descriptor(data, None)


@pytest.mark.parametrize("entry", [{"url": "cvmfs://test.repo\n/layers/x"},
                                   {"repo": "test.repo\n", "digest": HEX},
                                   {"repo": "test.repo", "digest": HEX + "\n"},
                                   {"url": "cvmfs://test.repo/x",
                                    "digest": "sha256:" + HEX + "\n"}])
def test_a_trailing_newline_is_no_part_of_a_repository_name_or_digest(entry):
    data = json.dumps({"version": "1.0", "layers": [entry]}).encode()
    with pytest.raises(thin.DescriptorError, match="invalid"):
        thin.parse_descriptor(data, None)


@pytest.mark.root
@pytest.mark.xfail(strict=True, reason=(
    "archive.split_member_name applies NAME_MAX to the whole marker name: '.wh.' + a "
    "name of 252-255 bytes is refused, though the marker deletes a name Linux can hold "
    "(and write_layer_tar writes such markers for a deleted file). Fix in archive.py: "
    "check NAME_MAX on the name a whiteout marker stands for (whiteouts.classify), not "
    "on the marker"))
def test_a_whiteout_of_a_name_of_255_bytes_round_trips(tmp_path):
    name = "n" * 255
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    whiteouts.make_whiteout(str(src / name))
    out = io.BytesIO()
    archive.write_layer_tar(out, str(src))
    archive.apply_tar(io.BytesIO(out.getvalue()), str(dst), whiteouts.OverlayUpper())
    assert whiteouts.is_whiteout(os.lstat(dst / name))
