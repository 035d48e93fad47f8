"""`cvmfs-thin`: make thin images and publish their layers into a layer store."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, List, Optional, Tuple

from .. import __version__, archive, thin, whiteouts
from ..errors import DriverError
from . import images, registry
from .stores import (
    CvmfsStore,
    DirStore,
    PublishError,
    Store,
    check_repo_name,
    flat_dir,
    layer_dir,
    parse_store,
    progress,
)

_progress = progress


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cvmfs-thin",
        description="Turn images into thin images whose layers sit unpacked in CernVM-FS.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--docker-host", metavar="URL",
                   help="Docker engine to use (default: $DOCKER_HOST or the local socket)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="publish an image's layers and make its thin image")
    c.add_argument("source", metavar="SOURCE", help="image in the local engine (pulled if absent)")
    c.add_argument("--store", required=True, metavar="STORE",
                   help="dir:PATH (a repository tree) or cvmfs:REPO (on a CVMFS publisher)")
    c.add_argument("--repo", metavar="REPO",
                   help="repository name nodes mount the store under (/cvmfs/REPO)")
    c.add_argument("--tag", required=True, metavar="THIN_TAG", help="tag of the thin image")
    c.add_argument("--push", action="store_true", help="push the thin image after making it")
    c.add_argument("--flat", action="store_true",
                   help="publish the image as one flattened layer")
    c.add_argument("--digests", choices=("diff-id", "registry"), default="diff-id",
                   help="key layers in the store by their uncompressed diff IDs (default), "
                   "or by the compressed digests of SOURCE's manifest in its registry, "
                   "where containerd's lazy pulls look for them (SOURCE must be a "
                   "registry reference)")
    c.add_argument("--cvmfs-root", default="/cvmfs", metavar="DIR",
                   help="where the cvmfs: store's repository is mounted (default /cvmfs)")
    c.add_argument("--workdir", metavar="DIR", help="scratch space (default: $TMPDIR)")
    c.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="cvmfs: store: wait this long for another cvmfs-thin publishing "
                   "into the repository (default: refuse at once)")
    c.add_argument("--step-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="cvmfs: store: stop (and abort) a cvmfs_server step that takes "
                   "longer (default 3600)")

    i = sub.add_parser("inspect", help="print a thin image's descriptor and check its layers")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--cvmfs-root", default="/cvmfs", metavar="DIR",
                   help="where repositories are mounted on this machine (default /cvmfs)")

    m = sub.add_parser("make", help="make a thin image from layers already in a repository")
    m.add_argument("--layer", action="append", required=True, metavar="URL",
                   help="cvmfs://REPO/PATH of a layer; repeat, base layer first")
    m.add_argument("--tag", required=True, metavar="THIN_TAG")
    m.add_argument("--from", dest="from_image", metavar="IMAGE",
                   help="copy Env, Cmd, Entrypoint, ... from this image")
    m.add_argument("--cmd", metavar="JSON", help='command, as a JSON list: \'["/bin/sh"]\'')
    m.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--origin", default="", help="free text recorded in thin.json")
    m.add_argument("--check-root", metavar="DIR",
                   help="fail unless every layer exists below DIR (e.g. /cvmfs)")
    m.add_argument("--push", action="store_true")
    return p


# ---------------------------------------------------------------------------- convert


def convert(args: argparse.Namespace) -> int:
    store = parse_store(args.store, args.repo, args.cvmfs_root, args.wait, args.step_timeout)
    check_repo_name(store.repo)
    client = images.docker_client(args.docker_host)
    image = images.get_image(client, args.source)
    attrs = image.attrs
    diff_ids = [d.split(":", 1)[1] for d in attrs["RootFS"]["Layers"]]
    _progress(f"{args.source}: {len(diff_ids)} layers, {_mb(attrs.get('Size', 0))}, "
              f"store {store.describe()}")
    started = time.monotonic()
    with store.session():
        layers, published, skipped = _publish(store, image, attrs, diff_ids, args)
    descriptor = thin.Descriptor("1.0", tuple(layers), origin=args.source)
    tag_id, size = _make_image(client, descriptor, images.thin_config({"config": attrs["Config"]}),
                               attrs, args.tag, f"cvmfs-thin convert {args.source}")
    if args.push:
        images.push(client, args.tag, _progress)
        _progress(f"pushed {args.tag}")
    print(f"thin image {images.normalise_tag(args.tag)} ({tag_id[:19]}): {len(layers)} "
          f"layer(s) in cvmfs://{store.repo} ({published} published, {skipped} already there), "
          f"thin layer {size} bytes, source {_mb(attrs.get('Size', 0))}, "
          f"{time.monotonic() - started:.1f} s")
    return 0


def _publish(store: Store, image: Any, attrs: dict, diff_ids: List[str],
             args: argparse.Namespace) -> Tuple[List[thin.ThinLayer], int, int]:
    """Publish what the store lacks of the image; its thin layers, published and skipped."""
    published = skipped = 0
    if args.flat:
        key = image.id.split(":", 1)[1]
        rel = flat_dir(key)
        if store.has(rel):
            _progress(f"flattened image {key[:12]} already in the store, skipped")
            skipped = 1
        else:
            _publish_flat(store, image, rel, args.workdir, args.source)
            published = 1
        layers = [thin.ThinLayer(store.repo, rel, key)]
    else:
        keys = diff_ids if args.digests == "diff-id" else _registry_keys(args.source, attrs,
                                                                           diff_ids)
        missing = [n for n, k in enumerate(keys) if not store.has(layer_dir(k))]
        skipped = len(keys) - len(missing)
        for n, k in enumerate(keys):
            if n not in missing:
                _progress(f"layer {n + 1}/{len(keys)} {k[:12]}: already in the store, skipped")
        if missing:
            with images.saved(image, args.workdir) as saved:
                for n in missing:
                    _publish_layer(store, saved, n, diff_ids, args.source, keys[n])
                    published += 1
        layers = [thin.ThinLayer(store.repo, layer_dir(k), k) for k in keys]
    return layers, published, skipped


def _registry_keys(source: str, attrs: dict, diff_ids: List[str]) -> List[str]:
    """The manifest's compressed layer digests (hex) of `source`, one per diff ID."""
    ref = registry.parse_reference(source)
    config, found = registry.Registry().image(ref, attrs.get("Os") or "linux",
                                              attrs.get("Architecture") or "amd64")
    if config != attrs.get("Id"):
        # The tag moved since the engine pulled it: the manifest's layers are another
        # image's, and publishing this image's files under them would serve every node
        # the wrong content.
        raise PublishError(
            f"{source} in the registry is image {config[:19]}, the engine's is "
            f"{str(attrs.get('Id'))[:19]}: pull {source} again (or convert by digest)")
    if len(found) != len(diff_ids):
        raise PublishError(
            f"{source}: the registry's manifest lists {len(found)} layers, the image in the "
            f"engine {len(diff_ids)}; pull {source} again so both are the same image")
    _progress(f"{source}: layers keyed by the registry's digests "
              f"({ref.registry}/{ref.repository})")
    return [layer.digest.split(":", 1)[1] for layer in found]


def _publish_layer(store: Store, saved: images.SavedImage, n: int, diff_ids: List[str],
                   origin: str, key: str) -> None:
    """Publish layer n (verified against its diff ID) at layer_dir(key)."""
    h = diff_ids[n]
    t0 = time.monotonic()
    with saved.open_layer(n) as stream:
        digest, names, size, capabilities = images.scan_layer(stream)
    if digest != h:
        raise PublishError(f"layer {n + 1} of {origin} has digest {digest}, expected {h}: "
                           "the engine's copy is damaged; pull the image again")
    if [thin.DESCRIPTOR_NAME] in names:
        raise _nested(origin, n)
    markers = whiteouts.LayerMarkers.from_names(names)
    if capabilities and isinstance(store, CvmfsStore):
        _progress(f"warning: layer {n + 1}: {len(capabilities)} file(s) carry file "
                  f"capabilities (/{capabilities[0]}{', ...' if len(capabilities) > 1 else ''}),"
                  " which cvmfs_server ingest does not keep: in the thin image they run "
                  "without them (set-uid bits are kept); keep such images regular")
    store.publish_layer(layer_dir(key), lambda: saved.open_layer(n), markers, origin,
                        f"sha256:{h}")
    _progress(f"layer {n + 1}/{len(diff_ids)} {key[:12]}: published {len(names)} entries, "
              f"{_mb(size)}, {len(markers.markers)} whiteout markers "
              f"({time.monotonic() - t0:.1f} s)")


def _nested(origin: str, n: int) -> PublishError:
    return PublishError(
        f"{origin} is a thin image or built on one (layer {n + 1} holds thin.json, not the "
        "files it stands for): convert the image it was made from instead"
    )


def _publish_flat(store: Store, image: Any, rel: str, workdir: Optional[str],
                  origin: str = "") -> None:
    t0 = time.monotonic()
    tree = store.scratch_tree(rel, workdir)
    try:
        with images.saved(image, workdir) as saved:
            for n in range(len(saved.layer_paths)):
                with saved.open_layer(n) as stream:
                    archive.apply_tar(stream, tree, whiteouts.Flatten())
                if os.path.lexists(os.path.join(tree, thin.DESCRIPTOR_NAME)):
                    raise _nested(origin, n)
                _progress(f"flattening: layer {n + 1}/{len(saved.layer_paths)} applied")
        store.publish_tree(rel, tree)
    except BaseException:
        import shutil

        shutil.rmtree(tree, ignore_errors=True)
        raise
    _progress(f"flattened image published at {rel} ({time.monotonic() - t0:.1f} s)")


def _make_image(client: Any, descriptor: thin.Descriptor, config: dict, attrs: dict,
                tag: str, comment: str) -> tuple:
    data, image_id, size = images.thin_image_archive(
        descriptor, config, attrs.get("Architecture", ""), attrs.get("Os", ""),
        attrs.get("Created") or "1970-01-01T00:00:00Z", tag, comment)
    images.load(client, data)
    return image_id, size


# ---------------------------------------------------------------------------- inspect, make


def inspect(args: argparse.Namespace) -> int:
    client = images.docker_client(args.docker_host)
    descriptor, _ = images.read_descriptor(client, args.image)
    print(descriptor.to_json(), end="")
    missing = 0
    for n, layer in enumerate(descriptor.layers, start=1):
        try:
            real = thin.resolve_layer_dir(args.cvmfs_root, layer)
            print(f"layer {n}: ok      {layer.url} -> {real}")
        except DriverError as e:
            missing += 1
            print(f"layer {n}: MISSING {layer.url}: {e}")
    if missing:
        print(f"{missing} of {len(descriptor.layers)} layers are missing below {args.cvmfs_root}")
        return 1
    print(f"all {len(descriptor.layers)} layers present below {args.cvmfs_root}")
    return 0


def make(args: argparse.Namespace) -> int:
    layers = tuple(thin.parse_layer({"url": u}, n, None) for n, u in enumerate(args.layer))
    if args.check_root:
        for layer in layers:
            thin.resolve_layer_dir(args.check_root, layer)
    descriptor = thin.Descriptor("1.0", layers, origin=args.origin)
    client = images.docker_client(args.docker_host)
    attrs: dict = {}
    if args.from_image:
        attrs = images.get_image(client, args.from_image).attrs
        config = images.thin_config({"config": attrs["Config"]})
    else:
        config = images.thin_config({"config": {}})
    if args.cmd:
        try:
            cmd = json.loads(args.cmd)
        except ValueError:
            raise PublishError(f"--cmd must be a JSON list, got {args.cmd!r}") from None
        if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
            raise PublishError(f"--cmd must be a JSON list of strings, got {args.cmd!r}")
        config["Cmd"] = cmd
    for kv in args.env:
        if "=" not in kv:
            raise PublishError(f"--env {kv!r}: expected KEY=VALUE")
        key = kv.split("=", 1)[0]
        config["Env"] = [e for e in config["Env"] if not e.startswith(key + "=")] + [kv]
    image_id, size = _make_image(client, descriptor, config, attrs, args.tag,
                                 f"cvmfs-thin make {' '.join(args.layer)}")
    if args.push:
        images.push(client, args.tag, _progress)
    print(f"thin image {images.normalise_tag(args.tag)} ({image_id[:19]}): "
          f"{len(layers)} layer(s), thin layer {size} bytes")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"convert": convert, "inspect": inspect, "make": make}[args.command](args)
    except (PublishError, DriverError) as e:
        print(f"cvmfs-thin: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cvmfs-thin: interrupted; run the same command again to finish "
              "(layers already published are kept and skipped)", file=sys.stderr)
        return 130


__all__ = ["main", "CvmfsStore", "DirStore"]

if __name__ == "__main__":
    raise SystemExit(main())
