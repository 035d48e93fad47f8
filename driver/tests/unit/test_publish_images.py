"""cvmfs-thin reading an image through `docker save`: an archive without the image's
layers (what Docker on the containerd store writes, exit 0, for an image pulled lazily)
is refused with the reason instead of publishing a broken layer."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from cvmfs_graphdriver.publish import images
from cvmfs_graphdriver.publish.stores import PublishError


class FakeImage:
    id = "sha256:" + "ab" * 32

    def __init__(self, files: dict) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        self.data = buf.getvalue()

    def save(self, named: bool = False):
        yield self.data


MANIFEST = json.dumps([{"Config": "c.json", "Layers": ["l1/layer.tar"]}]).encode()


def test_an_archive_without_the_layers_is_refused_with_the_reason(tmp_path):
    with pytest.raises(PublishError, match="pulled lazily"), \
            images.saved(FakeImage({"manifest.json": MANIFEST}), str(tmp_path)):
        pass


def test_a_whole_archive_is_read(tmp_path):
    img = FakeImage({"manifest.json": MANIFEST, "c.json": b'{"config": {}}',
                     "l1/layer.tar": b"x" * 10})
    with images.saved(img, str(tmp_path)) as saved:
        assert saved.layer_paths == ["l1/layer.tar"] and saved.config == {"config": {}}
        with saved.open_layer(0) as f:
            assert f.read() == b"x" * 10
