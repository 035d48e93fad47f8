"""On-disk layout under the driver home (the same shape as moby's overlay2).

    <home>/l/<short>          symlink -> ../<id>/diff  (short names keep mount options small)
    <home>/<id>/diff/         the layer's own files
    <home>/<id>/link          the layer's short name
    <home>/<id>/lower         "l/<short>:l/<short>:..." of its parents, uppermost first
    <home>/<id>/parent        the parent layer id (empty for a base layer)
    <home>/<id>/work/         overlay work dir (read-write layers only)
    <home>/<id>/merged/       mount point of the union view
    <home>/<id>/.applying     present while ApplyDiff runs: the layer is not complete
    <home>/.staging/          layers being created (renamed into place when complete)

Everything here is pure: no system calls beyond reading and naming paths.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from dataclasses import dataclass
from typing import Optional

LINK_DIR = "l"
STAGING_DIR = ".staging"
SHORT_ID_LENGTH = 26  # as overlay2: base32 of 16 random bytes, without padding
MAX_DEPTH = 128  # lower layers overlayfs accepts in one mount (and overlay2's limit)
PAGE_SIZE = 4096  # mount(2) copies at most one page of options

# Docker hands out 64-hex cache ids and "<hex>-init"; accept a conservative superset so a
# request can never name a path outside the home ("..", "/", NUL, hidden names).
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_id(layer_id: str, what: str = "layer id") -> str:
    if not isinstance(layer_id, str) or not _ID_RE.fullmatch(layer_id) or ".." in layer_id:
        raise ValueError(
            f"invalid {what} {layer_id!r}: expected letters, digits, '_', '-', '.' "
            "(dockerd sends 64-hex ids)"
        )
    return layer_id


def new_short_id() -> str:
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")[:SHORT_ID_LENGTH]


@dataclass(frozen=True)
class Layout:
    home: str

    def dir(self, layer_id: str) -> str:
        return os.path.join(self.home, validate_id(layer_id))

    def diff(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), "diff")

    def work(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), "work")

    def merged(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), "merged")

    def link_file(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), "link")

    def lower_file(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), "lower")

    def parent_file(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), "parent")

    def committed_file(self, layer_id: str) -> str:
        """Present once a child was created on the layer: from then on it mounts read-only
        (overlay2 writes it into the *parent's* directory in Create)."""
        return os.path.join(self.dir(layer_id), "committed")

    def applying_marker(self, layer_id: str) -> str:
        return os.path.join(self.dir(layer_id), ".applying")

    @property
    def links(self) -> str:
        return os.path.join(self.home, LINK_DIR)

    @property
    def staging(self) -> str:
        return os.path.join(self.home, STAGING_DIR)

    def short_link(self, short: str) -> str:
        return os.path.join(self.links, short)


def lower_chain(parent_link: Optional[str], parent_lower: str) -> str:
    """The `lower` file content of a child: the parent's link first, then its lowers."""
    if parent_link is None:
        return ""
    chain = [f"{LINK_DIR}/{parent_link}"]
    if parent_lower:
        chain.extend(parent_lower.split(":"))
    if len(chain) > MAX_DEPTH:
        raise ValueError(
            f"layer would stack {len(chain)} lower layers; overlayfs allows at most {MAX_DEPTH}"
        )
    return ":".join(chain)


@dataclass(frozen=True)
class OverlayOptions:
    """Mount data for one overlay mount, and the directory it is relative to (if any)."""

    data: str
    relative_to: Optional[str]  # when set, paths in `data` are relative to this directory
    target: str


def overlay_options(
    layout: Layout,
    layer_id: str,
    lower: str,
    *,
    readonly: bool,
    extra: str = "",
    mount_label: str = "",
    page_size: int = PAGE_SIZE,
) -> OverlayOptions:
    """Build overlay mount data; fall back to home-relative paths when over one page.

    `lower` is the layer's `lower` file ("l/A:l/B"), `extra` a prefix such as "index=off,".
    """
    if not lower:
        raise ValueError(f"layer {layer_id} has no lower layers: it needs no overlay mount")

    def build(prefix: str) -> str:
        own_diff = os.path.join(prefix, layer_id, "diff") if prefix else f"{layer_id}/diff"
        lowers = ":".join(os.path.join(prefix, p) if prefix else p for p in lower.split(":"))
        if readonly:
            data = f"{extra}lowerdir={own_diff}:{lowers}"
        else:
            work = os.path.join(prefix, layer_id, "work") if prefix else f"{layer_id}/work"
            data = f"{extra}lowerdir={lowers},upperdir={own_diff},workdir={work}"
        if mount_label:
            data += f',context="{mount_label}"'
        return data

    absolute = build(layout.home)
    if len(absolute) < page_size:
        return OverlayOptions(absolute, None, layout.merged(layer_id))
    relative = build("")
    if len(relative) >= page_size:
        raise ValueError(
            f"cannot mount layer {layer_id}: overlay options are {len(relative)} bytes even "
            f"with short links (limit {page_size - 1})"
        )
    return OverlayOptions(relative, layout.home, f"{layer_id}/merged")
