"""`cvmfs-thin`: make thin images and publish their layers into a layer store."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

from .. import __version__, archive, fdtree, thin, whiteouts
from ..errors import DriverError
from . import gc, images, records, registry, wishlist
from .progress import Meter
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
    _store_timing(c)
    c.add_argument("--json", action="store_true",
                   help="print what was published as JSON on stdout (progress stays on stderr)")

    b = sub.add_parser("publish", help="publish every image of a YAML wish list (DUCC's "
                       "recipe shape); resumable: what is published already is skipped")
    b.add_argument("wishlist", metavar="WISHLIST", help="the wish list (YAML)")
    b.add_argument("--store", metavar="STORE",
                   help="override the wish list's store (dir:PATH or cvmfs:REPO)")
    b.add_argument("--cvmfs-root", default="/cvmfs", metavar="DIR",
                   help="where the cvmfs: store's repository is mounted (default /cvmfs)")
    b.add_argument("--workdir", metavar="DIR", help="scratch space (default: $TMPDIR)")
    _store_timing(b)
    b.add_argument("--json", action="store_true",
                   help="print what was published as JSON on stdout (progress stays on stderr)")

    for name, helptext in (("gc", "delete the layers no recorded image uses any more "
                            "(a dry run unless --delete)"),
                           ("forget", "drop an image's record, so gc may collect its layers"),
                           ("images", "list the images recorded in a store")):
        g = sub.add_parser(name, help=helptext)
        if name == "forget":
            g.add_argument("image", metavar="IMAGE", nargs="+",
                           help="the published (thin) image's name, as converted")
        g.add_argument("store", metavar="STORE", help="dir:PATH or cvmfs:REPO")
        g.add_argument("--cvmfs-root", default="/cvmfs", metavar="DIR",
                       help="where the cvmfs: store's repository is mounted (default /cvmfs)")
        g.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="wait this long for a cvmfs-thin publishing into the store "
                       "(default: refuse at once)")
        g.add_argument("--step-timeout", type=float, default=3600.0, metavar="SECONDS",
                       help="cvmfs: store: stop (and abort) a cvmfs_server step that takes "
                       "longer (default 3600)")
        g.add_argument("--json", action="store_true", help="JSON on stdout")
        if name == "gc":
            g.add_argument("--delete", action="store_true",
                           help="delete them (without it, only say what would be deleted)")
            g.add_argument("--min-age", type=_age, default=gc.parse_age(DEFAULT_MIN_AGE),
                           metavar="AGE",
                           help="keep what was released less than AGE ago (a container "
                           "may still run on it): seconds, or a number with s, m, h or d "
                           f"(default {DEFAULT_MIN_AGE}; 0 collects at once)")

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


DEFAULT_MIN_AGE = "7d"


def _age(text: str) -> int:
    try:
        return gc.parse_age(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: seconds, or a number with s, m, h or d "
            "(e.g. 12h, 7d)") from None


def _store_timing(c: argparse.ArgumentParser) -> None:
    c.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another cvmfs-thin publishing into (or "
                   "collecting) the store (default: refuse at once)")
    c.add_argument("--step-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="cvmfs: store: stop (and abort) a cvmfs_server step that takes "
                   "longer (default 3600)")


# ---------------------------------------------------------------------------- convert


@dataclass(frozen=True)
class Job:
    """One image to publish into a store."""

    source: str
    tag: str
    flat: bool
    digests: str  # "diff-id" | "registry"
    push: bool
    workdir: Optional[str]
    pull: bool = False  # pull the source afresh (a wish list follows its registry)
    resume: bool = False  # skip it when the store's record says it is published already


def convert(args: argparse.Namespace) -> int:
    store = parse_store(args.store, args.repo, args.cvmfs_root, args.wait, args.step_timeout)
    check_repo_name(store.repo)
    client = images.docker_client(args.docker_host)
    job = Job(args.source, args.tag, args.flat, args.digests, args.push, args.workdir)
    with store.session():
        result = publish_image(store, client, job)
    if args.json:
        print(json.dumps(_summary(store, [result]), indent=1))
    else:
        print(f"thin image {result['image']} ({str(result['image_id'])[:19]}): "
              f"{result['layers']} layer(s) in cvmfs://{store.repo} "
              f"({result['layers_published']} published, {result['layers_present']} already "
              f"there), thin layer {result['thin_layer_bytes']} bytes, source "
              f"{_mb(result['source_bytes'])}, {result['seconds']:.1f} s")
    return 0


def _summary(store: Store, results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The --json document (its shape is documented in driver/README.md)."""
    count = {s: sum(1 for r in results if r["status"] == s) for s in STATUSES}
    return {"version": 1, "store": store.describe(), "repository": store.repo,
            "images": results, **count, "changed": count["published"] > 0}


# What became of an image: published (layers or its record new), unchanged (all there
# already, converted again), skipped (a wish list's rerun: recorded as published from the
# same source image), failed.
STATUSES = ("published", "unchanged", "skipped", "failed")


def publish_image(store: Store, client: Any, job: Job) -> Dict[str, Any]:
    """Publish one image (inside store.session()): its layers, its thin image (pushed if
    asked), its record. The result is one entry of the --json output."""
    started = time.monotonic()
    tag = images.normalise_tag(job.tag)
    kind = "flat" if job.flat else "thin"
    image = images.pull(client, job.source) if job.pull else images.get_image(client, job.source)
    attrs = image.attrs
    diff_ids = [d.split(":", 1)[1] for d in attrs["RootFS"]["Layers"]]
    result: Dict[str, Any] = {
        "source": job.source, "source_id": image.id, "image": tag, "image_id": None,
        "kind": kind, "status": "unchanged", "layers": 1 if job.flat else len(diff_ids),
        "layers_published": 0, "layers_present": 0, "bytes_published": 0,
        "source_bytes": attrs.get("Size", 0), "thin_layer_bytes": 0, "pushed": False,
        "seconds": 0.0}
    # Read, publish, push and record under the image's own lock: another run publishing
    # the same image name waits (or is refused) rather than interleaving with this one.
    with store.record_lock(records.record_path(tag), tag):
        previous = gc.read_record(store, tag)
        if job.resume and previous is not None and \
                previous.publishes(image.id, kind, job.digests, job.push) and \
                all(store.has(p) for p in previous.paths):
            _progress(f"{tag}: published from {job.source} ({image.id[:19]}) already, skipped")
            result.update(status="skipped", layers=len(previous.paths),
                          layers_present=len(previous.paths))
            return result
        _progress(f"{job.source}: {len(diff_ids)} layers, {_mb(attrs.get('Size', 0))}, "
                  f"store {store.describe()}")
        layers, published, skipped, nbytes, present = _publish(store, image, attrs,
                                                               diff_ids, job)
        descriptor = thin.Descriptor("1.0", tuple(layers), origin=job.source)
        config = images.thin_config({"config": attrs["Config"]})
        tag_id, size = _make_image(client, descriptor, config, attrs, job.tag,
                                   f"cvmfs-thin convert {job.source}")
        if job.push:
            images.push(client, job.tag, _progress)
            _progress(f"pushed {job.tag}")
        # Layers that were in the store before and no record names (DUCC's, an older
        # cvmfs-thin's, `make`'s): images without a record may use them, never release them.
        record = records.new_record(tag, job.source, image.id, kind, [la.path for la in layers],
                                    previous, gc.adoptable(store, present), job.digests,
                                    job.push)
        if previous is None or not previous.same_publication(record):
            store.commit({records.record_path(tag): record.to_json()}, [])
    result.update(
        image_id=tag_id, layers=len(layers), layers_published=published,
        layers_present=skipped, bytes_published=nbytes, thin_layer_bytes=size,
        pushed=job.push, seconds=round(time.monotonic() - started, 3),
        status="published" if published or previous is None
        or not previous.same_publication(record) else "unchanged")
    return result


def _publish(store: Store, image: Any, attrs: dict, diff_ids: List[str],
             job: Job) -> Tuple[List[thin.ThinLayer], int, int, int, List[str]]:
    """Publish what the store lacks of the image; its thin layers, published, skipped,
    the bytes of the layers published, and the paths that were there already."""
    published = skipped = nbytes = 0
    if job.flat:
        key = image.id.split(":", 1)[1]
        rel = flat_dir(key)
        if store.has(rel):
            _progress(f"flattened image {key[:12]} already in the store, skipped")
            skipped = 1
        else:
            nbytes = _publish_flat(store, image, rel, job.workdir, job.source)
            published = 1
        layers = [thin.ThinLayer(store.repo, rel, key)]
        present = [rel] if skipped else []
    else:
        keys = diff_ids if job.digests == "diff-id" else _registry_keys(job.source, attrs,
                                                                        diff_ids)
        missing = [n for n, k in enumerate(keys) if not store.has(layer_dir(k))]
        skipped = len(keys) - len(missing)
        for n, k in enumerate(keys):
            if n not in missing:
                _progress(f"layer {n + 1}/{len(keys)} {k[:12]}: already in the store, skipped")
        if missing:
            with images.saved(image, job.workdir) as saved:
                meter = Meter(job.source, len(missing),
                              sum(saved.layer_size(n) for n in missing))
                try:
                    for n in missing:
                        _publish_layer(store, saved, n, diff_ids, job.source, keys[n], meter)
                        published += 1
                finally:
                    meter.finish()
                nbytes = meter.done
        layers = [thin.ThinLayer(store.repo, layer_dir(k), k) for k in keys]
        present = [la.path for n, la in enumerate(layers) if n not in missing]
    return layers, published, skipped, nbytes, present


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
                   origin: str, key: str, meter: Meter) -> None:
    """Publish layer n (verified against its diff ID) at layer_dir(key)."""
    h = diff_ids[n]
    t0 = time.monotonic()
    meter.start_layer("checking")
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
    @contextlib.contextmanager
    def counted() -> Iterator[Any]:
        with saved.open_layer(n) as raw:
            yield meter.reader(raw)

    meter.start_layer("publishing")
    store.publish_layer(layer_dir(key), counted, markers, origin, f"sha256:{h}")
    meter.layer_done()
    _progress(f"layer {n + 1}/{len(diff_ids)} {key[:12]}: published {len(names)} entries, "
              f"{_mb(size)}, {len(markers.markers)} whiteout markers "
              f"({time.monotonic() - t0:.1f} s)")


def _nested(origin: str, n: int) -> PublishError:
    return PublishError(
        f"{origin} is a thin image or built on one (layer {n + 1} holds thin.json, not the "
        "files it stands for): convert the image it was made from instead"
    )


def _publish_flat(store: Store, image: Any, rel: str, workdir: Optional[str],
                  origin: str = "") -> int:
    t0 = time.monotonic()
    tree = store.scratch_tree(rel, workdir)
    try:
        with images.saved(image, workdir) as saved:
            count = len(saved.layer_paths)
            meter = Meter(f"{origin} (flattening)", count,
                          sum(saved.layer_size(n) for n in range(count)))
            try:
                for n in range(count):
                    meter.start_layer("applying")
                    with saved.open_layer(n) as stream:
                        archive.apply_tar(meter.reader(stream), tree, whiteouts.Flatten())
                    meter.layer_done()
                    if os.path.lexists(os.path.join(tree, thin.DESCRIPTOR_NAME)):
                        raise _nested(origin, n)
                    _progress(f"flattening: layer {n + 1}/{count} applied")
            finally:
                meter.finish()
        store.publish_tree(rel, tree)
    except BaseException:
        with contextlib.suppress(OSError):
            fdtree.remove_tree(tree)
        raise
    _progress(f"flattened image published at {rel} ({time.monotonic() - t0:.1f} s)")
    return meter.done


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


# ---------------------------------------------------------------------------- publish


def publish(args: argparse.Namespace) -> int:
    wl = wishlist.load(args.wishlist)
    store = parse_store(args.store or wl.store, wl.repo, args.cvmfs_root, args.wait,
                        args.step_timeout)
    check_repo_name(store.repo)
    reg = registry.Registry()
    wishes = wishlist.expand(wl, reg.tags, _progress)
    _progress(f"{wl.path}: {len(wishes)} image(s) to publish into {store.describe()}")
    client = images.docker_client(args.docker_host)
    results: List[Dict[str, Any]] = []
    interrupted = False
    # One image's failure (its source gone, the engine's error, a full disk) is reported
    # as that image's, and the batch goes on to the next one and to its summary.
    image_errors: Tuple[Type[BaseException], ...] = (
        PublishError, DriverError, OSError, *images.engine_errors())
    try:
        with store.session():
            for n, w in enumerate(wishes, start=1):
                _progress(f"[{n}/{len(wishes)}] {w.source} -> {w.output} ({w.kind})")
                job = Job(w.source, w.output, w.kind == "flat", wl.digests, wl.push,
                          args.workdir, pull=True, resume=True)
                try:
                    results.append(publish_image(store, client, job))
                except image_errors as e:
                    why = str(e) if isinstance(e, (PublishError, DriverError)) else \
                        _describe_error(e)
                    _progress(f"{w.source}: error: {why}")
                    results.append({"source": w.source, "image": images.normalise_tag(w.output),
                                    "kind": w.kind, "status": "failed", "error": why})
    except KeyboardInterrupt:
        interrupted = True
    summary = _summary(store, results)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for r in results:
            what = r.get("error") or (f"{r['layers_published']} of {r['layers']} layer(s) "
                                      "published")
            print(f"{r['status']:9} {r['image']} <- {r['source']} ({r['kind']}): {what}")
        print(f"{summary['published']} published, {summary['unchanged']} unchanged, "
              f"{summary['skipped']} skipped, {summary['failed']} failed")
    if interrupted:
        raise KeyboardInterrupt
    return 1 if summary["failed"] else 0


def _describe_error(e: BaseException) -> str:
    """An error from the system, the engine or the network, as one line that names it."""
    text = str(e).strip() or repr(e)
    if isinstance(e, OSError) and e.errno is not None and not e.filename \
            and os.strerror(e.errno) not in text:
        text = f"{text} ({os.strerror(e.errno)})"
    return f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------------------- records


def _records_store(args: argparse.Namespace) -> Store:
    kind, _, value = args.store.partition(":")
    repo = os.path.basename(value.rstrip("/")) or "store" if kind == "dir" else None
    store = parse_store(args.store, repo, args.cvmfs_root, args.wait, args.step_timeout)
    # gc, forget, images act on what is there: a mistyped store must not look like an
    # empty one (nor be created)
    if not os.path.isdir(store.view("")):
        fix = "the store's path" if kind == "dir" else \
            f"the repository's name, or --cvmfs-root if it is not mounted below {args.cvmfs_root}"
        raise PublishError(f"the store {store.describe()} does not exist (no directory "
                           f"{store.view('').rstrip('/')}): fix {fix}")
    return store


def collect(args: argparse.Namespace) -> int:
    store = _records_store(args)
    with store.session(exclusive=True):
        recs = gc.load_records(store)
        p = gc.plan(store, recs, args.min_age)
        known = frozenset().union(*(r.live_units | r.released_units | r.adopted_units
                                    for r in recs.values()))
        others = gc.unrecorded(store, known)
        if args.delete:
            gc.collect(store, p, recs)
    doc = {"version": 1, "store": store.describe(), "dry_run": not args.delete,
           "delete": [{"path": u, "bytes": b} for u, b in p.delete.items()],
           "bytes": p.bytes, "in_use": p.in_use, "already_gone": p.already_gone,
           "min_age": args.min_age,
           "recent": [{"path": u, "released_by": t} for u, t in p.recent.items()],
           "records": len(recs), "records_dropped": p.records_to_drop if args.delete else [],
           "unrecorded": others}
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    verb = "deleted" if args.delete else "would delete"
    for unit, size in p.delete.items():
        print(f"{verb} {unit} ({_mb(size)})")
    for unit, when in p.recent.items():
        print(f"kept {unit}: released {_duration(time.time() - when)} ago, less than "
              f"--min-age {_duration(args.min_age)}")
    print(f"{store.describe()}: {len(p.delete)} director{'y' if len(p.delete) == 1 else 'ies'}, "
          f"{_mb(p.bytes)} {'freed' if args.delete else 'to free'}; "
          f"{p.in_use} released but used by another image, kept; {len(p.recent)} released "
          f"less than {_duration(args.min_age)} ago (--min-age), kept; "
          f"{others} not in any image "
          f"record (published by another tool or before records), never collected; "
          f"{len(recs)} image record(s)")
    if not args.delete:
        print("dry run: nothing was deleted; run again with --delete to delete")
    return 0


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.1f}".removesuffix(".0") + unit
    return f"{s}s"


def forget(args: argparse.Namespace) -> int:
    store = _records_store(args)
    tags = sorted({images.normalise_tag(name) for name in args.image})
    with store.session(), contextlib.ExitStack() as held:
        # Each image's own lock, as a publisher of it takes it (in one order: no two
        # forgets deadlock): a record read here is the one overwritten.
        for tag in tags:
            held.enter_context(store.record_lock(records.record_path(tag), tag))
        writes = {}
        for tag in tags:
            rec = gc.read_record(store, tag)
            if rec is None:
                raise PublishError(f"{store.describe()} has no record of {tag}: "
                                   f"`cvmfs-thin images {args.store}` lists the recorded "
                                   "images")
            if rec.forgotten:
                print(f"{tag}: forgotten already")
                continue
            writes[records.record_path(tag)] = records.forgotten(rec).to_json()
            kept = len(set(rec.paths) & set(rec.adopted))
            print(f"{tag}: forgotten; its {len(rec.paths) - kept} path(s) go at the next "
                  f"`cvmfs-thin gc {args.store} --delete` unless another image uses them"
                  + (f" ({kept} adopted, never collected)" if kept else ""))
        store.commit(writes, [])
    return 0


def list_images(args: argparse.Namespace) -> int:
    store = _records_store(args)
    recs = gc.load_records(store)
    rows = sorted(recs.values(), key=lambda r: r.image)
    if args.json:
        print(json.dumps([{"image": r.image, "source": r.source, "source_id": r.source_id,
                           "kind": r.kind, "paths": list(r.paths), "forgotten": r.forgotten,
                           "released": list(r.released), "adopted": list(r.adopted),
                           "digests": r.digests or None, "push": r.push,
                           "updated": r.updated}
                          for r in rows], indent=1))
        return 0
    for r in rows:
        print(f"{r.image}  {r.kind}  {len(r.paths)} path(s)  from {r.source} "
              f"({r.source_id[:19]}){'  FORGOTTEN' if r.forgotten else ''}")
    print(f"{len(rows)} image record(s) in {store.describe()}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"convert": convert, "inspect": inspect, "make": make, "publish": publish,
                "gc": collect, "forget": forget, "images": list_images}[args.command](args)
    except (PublishError, DriverError) as e:
        print(f"cvmfs-thin: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a permission, a lost connection: no traceback
        print(f"cvmfs-thin: error: {_describe_error(e)}: fix the cause and run the same "
              "command again (layers already published are kept and skipped)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cvmfs-thin: interrupted; run the same command again to finish "
              "(layers already published are kept and skipped)", file=sys.stderr)
        return 130


__all__ = ["main", "CvmfsStore", "DirStore"]

if __name__ == "__main__":
    raise SystemExit(main())
