"""Wish lists: which images `cvmfs-thin publish` converts, in DUCC's recipe shape.

    version: 1
    cvmfs_repo: unpacked.example.org        # the repository nodes mount (DUCC's key)
    output_format: 'registry.example.org/thin/$(image)'
    input:
      - 'https://registry.hub.docker.com/library/debian:stable'
      - 'registry.example.org/analysis/app:v1.*'     # a tag glob: the registry lists them
      - image: 'registry.example.org/tools/gcc:13'   # an entry with a name of its own
        output_format: 'registry.example.org/thin/gcc:13'
    # cvmfs-thin's own keys (all optional):
    store: cvmfs:unpacked.example.org       # default cvmfs:<cvmfs_repo>; or dir:PATH
    thin: true                              # a thin image over per-layer directories
    flat: false                             # a thin image over one flattened directory
    flat_output_format: '...$(image)-flat'  # when both: the flat image's name
    push: false                             # push each image made
    digests: diff-id                        # or registry (keys for containerd lazy pulls)

`output_format` takes DUCC's variables: $(scheme), $(registry), $(repository), $(tag),
$(image) (= $(repository):$(tag)); a leading `http(s)://` of the result is dropped (an
image name has none). An `input` entry is a string (as in DUCC), or a mapping with
`image` and its own `output_format` (which may then be a fixed name, unless the image
is a tag glob); the top-level `output_format` is needed only for entries without one.
DUCC's `user` key is accepted and ignored: cvmfs-thin pushes with the Docker engine's
credentials (`docker login`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import registry
from .stores import PublishError

VERSION = 1
KEYS = ("version", "user", "cvmfs_repo", "output_format", "flat_output_format", "input",
        "store", "thin", "flat", "push", "digests")
REQUIRED = ("version", "cvmfs_repo", "input")
ENTRY_KEYS = ("image", "output_format")
VARIABLES = ("scheme", "registry", "repository", "tag", "image")
GLOB_CHARS = "*?["
# How Docker Hub appears in DUCC recipes; the engine knows it as docker.io.
DOCKER_HUB_ALIASES = ("registry.hub.docker.com", "index.docker.io", "registry-1.docker.io",
                      "hub.docker.com")
DEFAULT_FLAT_SUFFIX = "-flat"


class WishListError(PublishError):
    """A wish list that cannot be used; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class Input:
    """One `input` entry: an image, or a tag glob to expand against its registry."""

    text: str  # as written
    scheme: str
    ref: registry.Reference  # reference = the tag (or glob, or digest)
    registry_as_written: str  # for $(registry): registry.hub.docker.com stays that
    output_format: str = ""  # the entry's own (else the wish list's)

    @property
    def is_glob(self) -> bool:
        return any(c in self.ref.reference for c in GLOB_CHARS)

    def with_tag(self, tag: str) -> registry.Reference:
        return registry.Reference(self.ref.registry, self.ref.repository, tag)


@dataclass(frozen=True)
class WishList:
    path: str
    repo: str
    store: str
    output_format: str  # "" when every entry has its own
    flat_output_format: str
    inputs: Tuple[Input, ...]
    thin: bool
    flat: bool
    push: bool
    digests: str


@dataclass(frozen=True)
class Wish:
    """One image to publish: source reference, output name, thin or flat."""

    source: str
    output: str
    kind: str  # "thin" | "flat"
    entry: str  # the input line it came from


def _source_name(ref: registry.Reference) -> str:
    """A name the Docker engine pulls: docker.io/library/x is written x."""
    sep = "@" if ref.reference.startswith("sha256:") else ":"
    if ref.registry == registry.DEFAULT_REGISTRY:
        repo = ref.repository[len("library/"):] if ref.repository.startswith("library/") \
            else ref.repository
        return f"{repo}{sep}{ref.reference}"
    return f"{ref.registry}/{ref.repository}{sep}{ref.reference}"


def parse_input(text: str, where: str) -> Input:
    scheme = "https"
    rest = text.strip()
    m = re.match(r"^(https?)://", rest)
    if m:
        scheme, rest = m.group(1), rest[m.end():]
    first, sep, tail = rest.partition("/")
    written = first if sep and ("." in first or ":" in first or first == "localhost") else ""
    if sep and first in DOCKER_HUB_ALIASES:
        rest = f"{registry.DEFAULT_REGISTRY}/{tail}"
    name = rest.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    glob = any(c in tag for c in GLOB_CHARS)
    try:
        # A glob is no tag Docker accepts: parse with a stand-in, then put it back.
        ref = registry.parse_reference(rest.replace(f":{tag}", ":x", 1) if glob else rest)
    except PublishError:
        raise WishListError(f"{where}: {text!r} is not an image reference "
                            "(REGISTRY/REPOSITORY:TAG; globs only in the tag)") from None
    if any(c in ref.repository or c in ref.registry for c in GLOB_CHARS):
        raise WishListError(f"{where}: {text!r}: globs work in the tag only")
    if glob:
        if "@" in rest:
            raise WishListError(f"{where}: {text!r}: a tag glob and a digest do not go together")
        ref = registry.Reference(ref.registry, ref.repository, tag)
    elif ref.reference != "latest" and not ref.reference.startswith("sha256:") and \
            not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", ref.reference):
        raise WishListError(f"{where}: {text!r}: {ref.reference!r} is not a tag")
    return Input(text, scheme, ref, written or ref.registry)


def output_name(fmt: str, inp: Input, ref: registry.Reference) -> str:
    tag = ref.reference
    values = {"scheme": inp.scheme, "registry": inp.registry_as_written,
              "repository": ref.repository, "tag": tag, "image": f"{ref.repository}:{tag}"}
    out = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), fmt)
    return re.sub(r"^https?://", "", out)


def _check_format(fmt: Any, key: str, where: str, fixed_ok: bool = False) -> str:
    if not isinstance(fmt, str) or not fmt.strip():
        raise WishListError(f"{where}: {key} must be a string such as "
                            "'registry.example.org/thin/$(image)'")
    unknown = [v for v in re.findall(r"\$\((\w*)\)", fmt) if v not in VARIABLES]
    if unknown:
        raise WishListError(f"{where}: {key} uses $({unknown[0]}); known variables: "
                            + ", ".join(f"$({v})" for v in VARIABLES))
    if not fixed_ok and "$(image)" not in fmt and "$(tag)" not in fmt:
        raise WishListError(f"{where}: {key} {fmt!r} has neither $(image) nor $(tag): every "
                            "image would get the same name")
    return fmt


def _flag(doc: Dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = doc.get(key, default)
    if not isinstance(v, bool):
        raise WishListError(f"{where}: {key} must be true or false, not {v!r}")
    return v


def parse(text: str, path: str) -> WishList:
    """A wish list from YAML text; every mistake is refused with the entry and the fix."""
    try:
        import yaml
    except ImportError:
        raise PublishError("cvmfs-thin publish needs PyYAML: "
                           "pip install 'cvmfs-graphdriver[publisher]'") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WishListError(f"{path}: not YAML: {e}") from None
    if not isinstance(doc, dict):
        raise WishListError(f"{path}: a wish list is a mapping with the keys "
                            f"{', '.join(REQUIRED)} (and optionally the others of {KEYS})")
    unknown = sorted(str(k) for k in doc if k not in KEYS)
    if unknown:
        raise WishListError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise WishListError(f"{path}: {missing[0]!r} is missing (required: "
                            f"{', '.join(REQUIRED)})")
    if doc["version"] != VERSION:
        raise WishListError(f"{path}: version {doc['version']!r}: this cvmfs-thin reads "
                            f"wish lists of version {VERSION}")
    repo = doc["cvmfs_repo"]
    if not isinstance(repo, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", repo):
        raise WishListError(f"{path}: cvmfs_repo {repo!r} is not a repository name "
                            "(e.g. unpacked.example.org)")
    store = doc.get("store", f"cvmfs:{repo}")
    if not isinstance(store, str) or not re.match(r"^(dir|cvmfs):.", store):
        raise WishListError(f"{path}: store {store!r}: use dir:PATH or cvmfs:REPOSITORY")
    entries = doc["input"]
    if not isinstance(entries, list) or not entries:
        raise WishListError(f"{path}: input must be a non-empty list of images")
    own = all(isinstance(e, dict) and "output_format" in e for e in entries)
    if "output_format" not in doc and not own:
        raise WishListError(f"{path}: 'output_format' is missing (needed by every input "
                            "entry without an output_format of its own)")
    fmt = _check_format(doc["output_format"], "output_format", path) \
        if "output_format" in doc else ""
    thin_, flat = _flag(doc, "thin", True, path), _flag(doc, "flat", False, path)
    if not (thin_ or flat):
        raise WishListError(f"{path}: thin and flat are both false: nothing to publish")
    if "flat_output_format" in doc:
        flat_fmt = _check_format(doc["flat_output_format"], "flat_output_format", path)
    elif thin_ and flat:
        flat_fmt = fmt + DEFAULT_FLAT_SUFFIX if fmt.endswith(("$(image)", "$(tag)")) else ""
        if not flat_fmt:
            raise WishListError(f"{path}: thin and flat both: set flat_output_format (the "
                                "flat images' names must differ from the thin ones)")
    else:
        flat_fmt = fmt
    if thin_ and flat and flat_fmt == fmt:
        raise WishListError(f"{path}: flat_output_format equals output_format: the flat "
                            "and thin images would overwrite each other")
    digests = doc.get("digests", "diff-id")
    if digests not in ("diff-id", "registry"):
        raise WishListError(f"{path}: digests must be diff-id or registry, not {digests!r}")
    inputs = []
    for n, entry in enumerate(entries, start=1):
        where = f"{path}: input entry {n}"
        if isinstance(entry, dict):
            bad = sorted(str(k) for k in entry if k not in ENTRY_KEYS)
            if bad or not isinstance(entry.get("image"), str):
                raise WishListError(f"{where}: a mapping entry has the keys image (required) "
                                    f"and output_format{f', not {bad[0]!r}' if bad else ''}")
            inp = parse_input(entry["image"], where)
            if "output_format" in entry:
                own_fmt = _check_format(entry["output_format"], "output_format", where,
                                        fixed_ok=not inp.is_glob)
                inp = Input(inp.text, inp.scheme, inp.ref, inp.registry_as_written, own_fmt)
            inputs.append(inp)
        elif isinstance(entry, str):
            inputs.append(parse_input(entry, where))
        else:
            raise WishListError(f"{where} ({entry!r}) is neither an image nor a mapping "
                                "with image and output_format")
    return WishList(path, repo, store, fmt, flat_fmt, tuple(inputs), thin_, flat,
                    _flag(doc, "push", False, path), str(digests))


def load(path: str) -> WishList:
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except OSError as e:
        raise WishListError(f"cannot read the wish list {path}: {e.strerror}") from None


def expand(wl: WishList, list_tags: Callable[[registry.Reference], List[str]],
           say: Optional[Callable[[str], None]] = None) -> List[Wish]:
    """Every image of the wish list: globs matched against the registry's tags."""
    out: List[Wish] = []
    seen: Dict[str, str] = {}
    for inp in wl.inputs:
        if inp.is_glob:
            tags = list_tags(inp.ref)
            matched = [t for t in tags if fnmatch.fnmatchcase(t, inp.ref.reference)]
            if not matched:
                raise WishListError(
                    f"{wl.path}: no tag of {inp.ref.registry}/{inp.ref.repository} matches "
                    f"{inp.ref.reference!r} (its tags: {', '.join(tags[:10]) or 'none'}"
                    f"{', ...' if len(tags) > 10 else ''})")
            if say:
                say(f"{inp.text}: {len(matched)} tag(s) of {len(tags)}: {', '.join(matched)}")
            refs = [inp.with_tag(t) for t in matched]
        else:
            refs = [inp.ref]
        for ref in refs:
            thin_fmt = inp.output_format or wl.output_format
            flat_fmt = wl.flat_output_format if wl.thin else \
                (inp.output_format or wl.flat_output_format)
            kinds = ([("thin", thin_fmt)] if wl.thin else []) + \
                ([("flat", flat_fmt)] if wl.flat else [])
            for kind, fmt in kinds:
                name = output_name(fmt, inp, ref)
                try:
                    registry.parse_reference(name)
                except PublishError:
                    raise WishListError(f"{wl.path}: {inp.text} gives the output name "
                                        f"{name!r}, which is not an image name: fix "
                                        "output_format") from None
                source = _source_name(ref)
                if name in seen and seen[name] != source:
                    raise WishListError(f"{wl.path}: {seen[name]} and {source} would both be "
                                        f"published as {name}: fix output_format")
                if name not in seen:
                    seen[name] = source
                    out.append(Wish(source, name, kind, inp.text))
    return out
