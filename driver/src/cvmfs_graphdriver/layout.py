"""On-disk layout under the driver home (the same shape as moby's overlay2).

    <home>/l/<short>          symlink -> ../<id>/diff  (short names keep mount options small)
    <home>/<id>/diff/         the layer's own files
    <home>/<id>/link          the layer's short name
    <home>/<id>/lower         "l/<short>:l/<short>:..." of its parents, uppermost first
    <home>/<id>/parent        the parent layer id (empty for a base layer)
    <home>/<id>/work/         overlay work dir (read-write layers only)
    <home>/<id>/merged/       mount point of the union view
    <home>/<id>/committed     present once a child exists: the layer mounts read-only
    <home>/<id>/.applying     present while ApplyDiff runs: the layer is not complete
    <home>/<id>/.unapplied    made by Create (read-only), no ApplyDiff yet: a layer dockerd
                              may never have learnt of (see Driver._recover_layer)
    <home>/<id>/thin/         a thin layer's bookkeeping:
        descriptor.json       the validated descriptor (written by ApplyDiff)
        links.json            {"layer-K" | "mask-K": short link name in l/}
        masks/mask-K/         whiteout masks between CVMFS layers (built on first use)
        masks.json            which masks exist (written last: a crash rebuilds them)
    <home>/.staging/          layers being created or removed (renamed in or out)
    <home>/.thin-cache/markers/<sha256>.json
                              the whiteout markers of one CVMFS layer (found once)

Everything here is pure: no system calls beyond reading and naming paths.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from dataclasses import dataclass
from typing import NewType, Optional

LINK_DIR = "l"
STAGING_DIR = ".staging"
MARKER_CACHE_DIR = ".thin-cache/markers"
SHORT_ID_LENGTH = 26  # as overlay2: base32 of 16 random bytes, without padding
MAX_DEPTH = 128  # lower layers overlayfs accepts in one mount (and overlay2's limit)
PAGE_SIZE = 4096  # mount(2) copies at most one page of options

# Docker hands out 64-hex cache ids and "<hex>-init"; accept a conservative superset so a
# request can never name a path outside the home ("..", "/", NUL, hidden names).
# A layer id checked by validate_id (where it entered: a request, the home's listing).
LayerId = NewType("LayerId", str)

# Names the home holds besides layers: never a layer id.
RESERVED = frozenset({LINK_DIR})
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def validate_id(layer_id: object, what: str = "layer id") -> LayerId:
    """A layer id that names a directory of its own in the home, or ValueError."""
    if (not isinstance(layer_id, str) or not _ID_RE.fullmatch(layer_id) or ".." in layer_id
            or layer_id in RESERVED):
        raise ValueError(
            f"invalid {what} {layer_id!r}: expected letters, digits, '_', '-', '.' "
            "(dockerd sends 64-hex ids)"
        )
    return LayerId(layer_id)


def is_layer_name(name: str) -> bool:
    """Whether an entry of the home can be a layer directory."""
    try:
        validate_id(name)
    except ValueError:
        return False
    return True


def new_short_id() -> str:
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")[:SHORT_ID_LENGTH]


@dataclass(frozen=True)
class LayerDir:
    """The names inside one layer directory, in place or being built in staging."""

    path: str

    def _(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def diff(self) -> str:
        return self._("diff")

    @property
    def work(self) -> str:
        return self._("work")

    @property
    def merged(self) -> str:
        return self._("merged")

    @property
    def link_file(self) -> str:
        return self._("link")

    @property
    def lower_file(self) -> str:
        return self._("lower")

    @property
    def parent_file(self) -> str:
        return self._("parent")

    @property
    def committed_file(self) -> str:
        """Present once a child was created on the layer: from then on it mounts read-only
        (overlay2 writes it into the *parent's* directory in Create)."""
        return self._("committed")

    @property
    def applying_marker(self) -> str:
        return self._(".applying")

    @property
    def unapplied_marker(self) -> str:
        return self._(".unapplied")

    @property
    def thin_dir(self) -> str:
        return self._("thin")


@dataclass(frozen=True)
class Layout:
    home: str

    def dir(self, layer_id: str) -> str:
        # Ids are validated once, where they enter (the protocol, the home's listing).
        return os.path.join(self.home, layer_id)

    def layer(self, layer_id: str) -> LayerDir:
        return LayerDir(self.dir(layer_id))

    def diff(self, layer_id: str) -> str:
        return self.layer(layer_id).diff

    def work(self, layer_id: str) -> str:
        return self.layer(layer_id).work

    def merged(self, layer_id: str) -> str:
        return self.layer(layer_id).merged

    def link_file(self, layer_id: str) -> str:
        return self.layer(layer_id).link_file

    def lower_file(self, layer_id: str) -> str:
        return self.layer(layer_id).lower_file

    def parent_file(self, layer_id: str) -> str:
        return self.layer(layer_id).parent_file

    def committed_file(self, layer_id: str) -> str:
        return self.layer(layer_id).committed_file

    def applying_marker(self, layer_id: str) -> str:
        return self.layer(layer_id).applying_marker

    def unapplied_marker(self, layer_id: str) -> str:
        return self.layer(layer_id).unapplied_marker

    # a thin layer's bookkeeping

    def thin_dir(self, layer_id: str) -> str:
        return self.layer(layer_id).thin_dir

    def thin_descriptor(self, layer_id: str) -> str:
        return os.path.join(self.thin_dir(layer_id), "descriptor.json")

    def thin_links(self, layer_id: str) -> str:
        return os.path.join(self.thin_dir(layer_id), "links.json")

    def thin_masks(self, layer_id: str) -> str:
        return os.path.join(self.thin_dir(layer_id), "masks")

    def thin_masks_index(self, layer_id: str) -> str:
        return os.path.join(self.thin_dir(layer_id), "masks.json")

    @property
    def marker_cache_dir(self) -> str:
        return os.path.join(self.home, MARKER_CACHE_DIR)

    # links and staging

    @property
    def links(self) -> str:
        return os.path.join(self.home, LINK_DIR)

    @property
    def staging(self) -> str:
        return os.path.join(self.home, STAGING_DIR)

    def short_link(self, short: str) -> str:
        return os.path.join(self.links, short)

    def lower_entry(self, short: str) -> str:
        """How a `lower` file names a short link."""
        return f"{LINK_DIR}/{short}"

    def staging_dir(self, layer_id: str, purpose: str = "") -> str:
        """A fresh name in the staging area for a layer being built (or removed)."""
        tag = f".{purpose}" if purpose else ""
        return os.path.join(self.staging, f"{layer_id}{tag}.{new_short_id()[:8]}")


def mask_name(k: int) -> str:
    """The name of mask k of a thin stack (in links.json and under thin/masks/)."""
    return f"mask-{k}"


def link_target(layer_id: str) -> str:
    """What l/<short> of a layer points to (relative, so the home can move)."""
    return f"../{layer_id}/diff"


def layer_of_link_target(target: str) -> Optional[str]:
    """The layer id a link target names (None for a link into CVMFS or to a mask)."""
    parts = target.split("/")
    if len(parts) == 3 and parts[0] == ".." and parts[2] == "diff" and is_layer_name(parts[1]):
        return parts[1]
    return None


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
