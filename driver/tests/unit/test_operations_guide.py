"""Every error message the daemon prints has an entry in docs/operations.md.

What counts as an *error message* (found mechanically, by walking the AST of every module
of `driver/src/cvmfs_graphdriver` except the generated `snapshotter/api/` and the
publisher `publish/`, which is `cvmfs-thin`, not the daemon):

1. the message of a project error: the first string argument of any call that constructs
   an exception class defined in those modules (DriverError and its subclasses,
   ConfigError, the snapshotter's errdefs classes and StoreError, MetaStoreError,
   FilterError, HeaderError, WhiteoutError, NotReadable, ...), wherever the call is
   (`raise X(...)`, `late = X(...)`, a helper's `return X(...)`). A class with a
   `suffix` attribute (containerd's errdefs) adds it as the daemon does:
   `NotFound("snapshot x")` reads `snapshot x: not found`;
2. the first string argument of the call in a `raise` statement, whatever it calls
   (`raise ValueError(...)`, `raise OSError(errno, ...)`, `raise self._fail(...)`,
   `raise e.wrap(prefix)`, which reads `prefix: ...`), except Python's programming-error
   classes (TypeError, AssertionError, RuntimeError, NotImplementedError): those are
   bugs, not conditions an operator meets;
3. the first string argument of a call to a method named error, warning, exception,
   critical, log_error, send_error, _error or abort (the `logging` loggers, argparse's
   parser, HTTP and gRPC answers), and of `print(..., file=sys.stderr)`.

A string argument is a literal or an f-string; when it is instead a call of a function
defined at the top of the same module, the strings that function returns count. Each
`{...}` of an f-string and each `%s`/`%d`/`%r`/`%g` of a logging format is a placeholder
that matches any text, except a placeholder naming a string constant of the same module,
which stands for the constant's text. A message whose fixed text holds no letter (say
`f"{where}: {e}"` or `"%s"`) only relays another message and is not checked itself.
Text that reaches an error through a variable or a parameter is not found (the guide
lists those few by hand).

A message is *documented* when its fixed text, in order (leading and trailing
placeholders dropped, any run of whitespace matching any whitespace), is found within one
inline code span of docs/operations.md (`` `...` `` or ``` `` ... `` ```).

A failure lists each missing message as a bullet ready to paste into the guide.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "driver" / "src" / "cvmfs_graphdriver"
GUIDE = REPO / "docs" / "operations.md"
EXCLUDED = ("snapshotter/api/", "publish/")

PROGRAMMING_ERRORS = {"TypeError", "AssertionError", "RuntimeError", "NotImplementedError"}
REPORTING_METHODS = {"error", "warning", "exception", "critical", "log_error", "send_error",
                     "_error", "abort"}
SEPARATORS = " \t\n:;,.("
LOG_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrgfix]")


@dataclass(frozen=True)
class Message:
    parts: tuple  # fixed text (str) and placeholders (Placeholder), in order
    where: str  # file:line
    kind: str  # what constructs or prints it

    def fixed(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    def shown(self) -> str:
        """The message with <placeholders>, as the guide would show it."""
        return "".join(p if isinstance(p, str) else f"<{p.name}>" for p in self.parts
                       ).replace("\n", " ")

    def pattern(self) -> re.Pattern:
        parts = list(self.parts)
        if parts and not isinstance(parts[0], str):
            while parts and not (isinstance(parts[0], str) and parts[0].strip(SEPARATORS)):
                parts.pop(0)  # a leading placeholder, with its separator (`<where>: `)
            if parts:
                parts[0] = parts[0].lstrip(SEPARATORS)
        if parts and not isinstance(parts[-1], str):
            while parts and not (isinstance(parts[-1], str) and parts[-1].strip(SEPARATORS)):
                parts.pop()
            if parts:
                parts[-1] = parts[-1].rstrip(SEPARATORS)
        out = []
        for p in parts:
            if isinstance(p, str):
                out.extend(r"\s+" if chunk.isspace() else re.escape(chunk)
                           for chunk in re.split(r"(\s+)", p) if chunk)
            else:
                out.append(".*?")
        return re.compile("".join(out), re.S)


@dataclass(frozen=True)
class Placeholder:
    name: str


def _placeholder(expr: ast.expr) -> Placeholder:
    """A readable name for what a placeholder holds: `layer_id`, `home`, `N`."""
    if isinstance(expr, ast.Subscript):
        return _placeholder(expr.value)
    if isinstance(expr, ast.Attribute):
        return Placeholder(expr.attr)
    if isinstance(expr, ast.Name):
        return Placeholder(expr.id)
    if isinstance(expr, ast.BoolOp):
        return _placeholder(expr.values[0])
    if isinstance(expr, ast.Call):
        if isinstance(expr.func, ast.Name) and expr.func.id == "len":
            return Placeholder("N")
        if expr.args:
            return _placeholder(expr.args[0])
        return _placeholder(expr.func)
    return Placeholder("…")


class _Module:
    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.rel = path.relative_to(PACKAGE).as_posix()
        self.tree = ast.parse(source)
        self.constants: Dict[str, list] = {}
        self.functions: Dict[str, ast.FunctionDef] = {}
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 \
                    and isinstance(node.targets[0], ast.Name):
                parts = self.parts(node.value, log_format=False, constants=False)
                if parts is not None:
                    self.constants[node.targets[0].id] = parts

    def parts(self, node: ast.expr, log_format: bool,
              constants: bool = True) -> Optional[list]:
        """The fixed text and placeholders of a string expression, None if it is none."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if not log_format:
                return [node.value]
            out: list = []
            pos = 0
            for m in LOG_PLACEHOLDER.finditer(node.value):
                out += [node.value[pos:m.start()], Placeholder("…")]
                pos = m.end()
            return [*out, node.value[pos:]]
        if isinstance(node, ast.JoinedStr):
            out = []
            for v in node.values:
                if isinstance(v, ast.Constant):
                    out.append(v.value)
                elif isinstance(v, ast.FormattedValue):
                    known = (constants and isinstance(v.value, ast.Name)
                             and self.constants.get(v.value.id))
                    out += known if known else [_placeholder(v.value)]
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left = self.parts(node.left, log_format, constants)
            right = self.parts(node.right, log_format, constants)
            if left is not None and right is not None:
                return left + right
            if left is not None:
                return [*left, _placeholder(node.right)]
        if constants and isinstance(node, ast.Name) and node.id in self.constants:
            return list(self.constants[node.id])
        return None

    def first_strings(self, call: ast.Call, log_format: bool = False) -> List[list]:
        """The first string argument of `call` (the strings a helper returns, when the
        argument calls a top-level function of this module)."""
        for i, arg in enumerate(call.args):
            parts = self.parts(arg, log_format)
            if parts is not None:
                if log_format:  # name each %-placeholder after its argument
                    values = iter(call.args[i + 1:])
                    parts = [_placeholder(next(values, ast.Name("…")))
                             if p == Placeholder("…") else p for p in parts]
                return [parts]
            if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) \
                    and arg.func.id in self.functions:
                returned = [self.parts(r.value, False)
                            for r in ast.walk(self.functions[arg.func.id])
                            if isinstance(r, ast.Return) and r.value is not None]
                return [p for p in returned if p is not None]
        return []


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _modules() -> List[_Module]:
    return [_Module(p, p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))
            if not any(p.relative_to(PACKAGE).as_posix().startswith(e) for e in EXCLUDED)]


def _error_classes(modules: List[_Module]) -> Dict[str, str]:
    """Exception classes defined in the modules: name -> the errdefs suffix ('' if none)."""
    bases: Dict[str, List[str]] = {}
    suffixes: Dict[str, str] = {}
    for m in modules:
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id if isinstance(b, ast.Name) else
                                    b.attr if isinstance(b, ast.Attribute) else ""
                                    for b in node.bases]
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and any(
                            isinstance(t, ast.Name) and t.id == "suffix" for t in stmt.targets) \
                            and isinstance(stmt.value, ast.Constant):
                        suffixes[node.name] = str(stmt.value.value)

    def is_error(name: str, seen: Set[str]) -> bool:
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type) and issubclass(builtin, BaseException):
            return True
        if name in seen or name not in bases:
            return False
        return any(is_error(b, seen | {name}) for b in bases[name])

    def suffix(name: str) -> str:
        if name in suffixes:
            return suffixes[name]
        return next((s for s in (suffix(b) for b in bases.get(name, []) if b in bases) if s),
                    "")

    return {n: suffix(n) for n in bases if is_error(n, set())}


@functools.cache
def error_messages() -> List[Message]:
    """Every error message of the daemon, as the module docstring defines them."""
    modules = _modules()
    classes = _error_classes(modules)
    found: Dict[str, Message] = {}

    def add(parts_list: List[list], m: _Module, node: ast.AST, kind: str,
            suffix: str = "") -> None:
        for parts in parts_list:
            parts = [p for p in parts if p != ""]
            if suffix and not (parts and isinstance(parts[-1], str)
                               and parts[-1].endswith(": " + suffix)):
                parts.append(": " + suffix)
            msg = Message(tuple(parts), f"{m.rel}:{node.lineno}", kind)  # type: ignore
            if not re.search(r"[A-Za-z]", msg.fixed()):
                continue  # a relay of another message
            found.setdefault(msg.pattern().pattern, msg)

    for m in modules:
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
                name = _callee(call)
                if name in PROGRAMMING_ERRORS:
                    continue
                if name == "wrap" and call.args:
                    add([[*p, ": ", Placeholder("error")] for p in m.first_strings(call)],
                        m, node, "raise ….wrap")
                elif name not in classes:
                    add(m.first_strings(call), m, node, f"raise {name or ast.unparse(call.func)}")
        for node in ast.walk(m.tree):
            if not isinstance(node, ast.Call):
                continue
            name = _callee(node)
            if name in classes and name not in PROGRAMMING_ERRORS:
                add(m.first_strings(node), m, node, name, classes[name])
            elif isinstance(node.func, ast.Attribute) and name in REPORTING_METHODS:
                add(m.first_strings(node, log_format=True), m, node, f".{name}()")
            elif name == "print" and any(
                    k.arg == "file" and ast.unparse(k.value) == "sys.stderr"
                    for k in node.keywords):
                add(m.first_strings(node), m, node, "print to stderr")
    return sorted(found.values(),
                  key=lambda msg: (msg.where.split(":")[0], int(msg.where.split(":")[1])))


def code_spans(markdown: str) -> Iterator[str]:
    """The inline code spans of a CommonMark text (fenced blocks are not spans)."""
    text = re.sub(r"^(```|~~~).*?^\1\s*$", "", markdown, flags=re.M | re.S)
    for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.S):
        yield m.group(2)


def missing(messages: List[Message], markdown: str) -> List[Message]:
    spans = list(code_spans(markdown))
    return [msg for msg in messages if not any(msg.pattern().search(s) for s in spans)]


def code_span(text: str) -> str:
    """`text` as an inline code span (double backticks when it holds one)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def paste_ready(messages: List[Message]) -> str:
    return "\n".join(f"- {code_span(msg.shown())} ({msg.where}, {msg.kind}): MEANING. DO: FIX."
                     for msg in messages)


def test_the_walk_finds_the_messages_it_should():
    """The definition at work on messages known to exist (so an AST change that finds
    nothing cannot make the guide test pass)."""
    shown = {msg.shown() for msg in error_messages()}
    assert len(shown) > 150
    for expected in [
        "layer <layer_id> does not exist in <home>",  # NotFoundError (a DriverError)
        "snapshot <key> does not exist: not found",  # errdefs NotFound, suffix added
        "failed to get active mount: <error>",  # raise e.wrap(...)
        "invalid syntax",  # raise ValueError in the filter parser
        "layer <name>: ApplyDiff was interrupted; removing the partial layer",  # log.warning
        "cvmfs-graphdriver: the snapshotter needs the Python packages grpcio",  # a constant
    ]:
        assert any(s.startswith(expected) for s in shown), expected
    # a helper's returned text; relays and programming errors are not messages
    assert any("was replaced while the layer was being archived" in s for s in shown)
    assert "Refs is not an object" not in shown
    assert not any(s.startswith("<source>: <e>") for s in shown)


def test_matching_rules():
    msg = Message(("layer ", Placeholder("id"), " does not exist in ", Placeholder("home")),
                  "x.py:1", "DriverError")
    assert missing([msg], "- `layer <ID> does not exist in <HOME>`: pull again") == []
    assert missing([msg], "- ``layer <ID>\n does not exist in `/x` ``: wrapped") == []
    assert missing([msg], "layer <ID> does not exist in <HOME> (not in a code span)") == [msg]
    assert missing([msg], "```\n`layer 1 does not exist in /h`\n```\n") == [msg]
    assert missing([msg], "`layer <ID>` does not exist in `<HOME>`") == [msg]


def test_every_error_message_is_in_the_operations_guide():
    assert GUIDE.is_file(), f"{GUIDE} is missing"
    absent = missing(error_messages(), GUIDE.read_text(encoding="utf-8"))
    assert not absent, (
        f"{len(absent)} error message(s) of the daemon are not in {GUIDE.relative_to(REPO)}"
        " (see this test's docstring for what counts and how it matches). Add an entry for "
        "each, under the heading where it belongs, e.g.:\n\n" + paste_ready(absent))


if __name__ == "__main__":  # print every message, as the guide's entries would start
    print(paste_ready(error_messages()))
