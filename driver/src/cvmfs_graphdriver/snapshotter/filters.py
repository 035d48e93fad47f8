"""containerd's filter syntax (its `filters` package, containerd 1.6), for `List`/`Walk`.

A filter is a comma separated list of selectors that must all match:

    <fieldpath>[<operator><value>]        e.g.  labels."containerd.io/snapshot.ref"==sha256:…
                                                 parent=="",kind==committed
                                                 name~=/^default\\/[0-9]+\\//

- fieldpath: fields joined by `.`; a field is `[A-Za-z0-9_]+` or a quoted string
  (double quotes only), so label keys with dots and slashes are written quoted.
- operators: `==` (present and equal), `!=` (not equal; an absent field is ""), `~=`
  (regular expression search). No operator: the field is present.
- values: a bare run of characters up to `,` or space, or quoted: `"…"`, or for `~=` also
  `/…/` and `|…|` (so a regular expression may contain `"`). `|` is a quote character,
  not an "or": alternatives are separate filter strings (`List` matches any of them).

Parse errors read exactly as containerd's (`filters: parse error: [… >|x|< …]: …`).
Regular expressions are Python's `re` (containerd uses Go's RE2; the common subset —
classes, anchors, groups, `|`, repetition — behaves the same); one that does not compile
matches nothing, as in containerd.

Pure code: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

# A field's value and whether the object has that field (containerd's Adaptor).
Adaptor = Callable[[Sequence[str]], Tuple[str, bool]]


class FilterError(ValueError):
    """A filter string that does not parse; the message is containerd's."""


# ---------------------------------------------------------------------------- scanner

_EOF = -1
_QUOTED = -2
_VALUE = -3
_FIELD = -4
_SEPARATOR = -5
_OPERATOR = -6
_ILLEGAL = -7


def _is_field_rune(ch: str) -> bool:
    return ch == "_" or ("A" <= ch <= "Z") or ("a" <= ch <= "z") or ("0" <= ch <= "9")


def _is_space(ch: str) -> bool:
    # Go's unicode.IsSpace
    return ch in "\t\n\v\f\r \x85\xa0" or unicodedata.category(ch) == "Zs" or ch in (
        "\u2028", "\u2029")


def _is_value_rune(ch: str) -> bool:
    # Go: r != ',' && !IsSpace(r) && (IsLetter || IsDigit || IsNumber || IsGraphic || IsPunct)
    if ch == "," or _is_space(ch):
        return False
    cat = unicodedata.category(ch)
    return cat[0] in "LMNPS" or cat == "Zs"


class _Scanner:
    def __init__(self, text: str) -> None:
        self.input = text
        self.pos = 0  # start of the current rune
        self.ppos = 0  # end of the current rune
        self.value = False
        self.err = ""

    def next(self) -> object:
        """The next rune (a 1-char str), or _EOF / _ILLEGAL."""
        if self.pos >= len(self.input):
            return _EOF
        self.pos = self.ppos
        if self.ppos >= len(self.input):
            return _EOF
        ch = self.input[self.ppos]
        self.ppos += 1
        if ch == "\x00":
            self.error("unexpected null")
            return _ILLEGAL
        if "\ud800" <= ch <= "\udfff":  # undecodable byte (surrogateescape)
            self.error("rune error")
            return _ILLEGAL
        return ch

    def peek(self) -> object:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> Tuple[int, object, str]:
        ch = self.next()
        pos = self.pos
        while True:
            if ch in (_EOF, _ILLEGAL):
                return self.pos, ch, ""
            assert isinstance(ch, str)
            if ch in ('/', '|', '"'):
                if not self._scan_quoted(ch):
                    return pos, _ILLEGAL, self.input[pos:self.ppos]
                return pos, _QUOTED, self.input[pos:self.ppos]
            if ch in (",", "."):
                self.value = False
                return pos, _SEPARATOR, self.input[pos:self.ppos]
            if ch in ("=", "!", "~"):
                while self.peek() in ("=", "!", "~"):
                    self.next()
                self.value = True
                return pos, _OPERATOR, self.input[pos:self.ppos]
            if _is_space(ch):
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                while isinstance(p := self.peek(), str) and _is_value_rune(p):
                    self.next()
                self.value = False
                return pos, _VALUE, self.input[pos:self.ppos]
            if _is_field_rune(ch):
                while isinstance(p := self.peek(), str) and _is_field_rune(p):
                    self.next()
                return pos, _FIELD, self.input[pos:self.ppos]
            return self.pos, ch, ""

    def _scan_quoted(self, quote: str) -> bool:
        illegal = False
        ch = self.next()
        while ch != quote:
            if ch == "\n" or not isinstance(ch, str):
                self.error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, legal = self._scan_escape(quote)
                if not legal:
                    illegal = True
            else:
                ch = self.next()
        return not illegal

    def _scan_escape(self, quote: str) -> Tuple[object, bool]:
        ch = self.next()
        if isinstance(ch, str) and ch in "abfnrtv\\" + quote:
            return self.next(), True
        if isinstance(ch, str) and ch in "01234567":
            return self._scan_digits(ch, 8, 3)
        if ch == "x":
            return self._scan_digits(self.next(), 16, 2)
        if ch == "u":
            return self._scan_digits(self.next(), 16, 4)
        if ch == "U":
            return self._scan_digits(self.next(), 16, 8)
        self.error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: object, base: int, n: int) -> Tuple[object, bool]:
        while n > 0 and _digit_val(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self.error("illegal numeric escape sequence")
            return ch, False
        return ch, True

    def error(self, msg: str) -> None:
        if not self.err:
            self.err = msg


def _digit_val(ch: object) -> int:
    if isinstance(ch, str) and len(ch) == 1:
        if "0" <= ch <= "9":
            return ord(ch) - ord("0")
        if "a" <= ch <= "f":
            return ord(ch) - ord("a") + 10
        if "A" <= ch <= "F":
            return ord(ch) - ord("A") + 10
    return 16


# ---------------------------------------------------------------------------- unquote

_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}


def _unquote(s: str) -> str:
    """Go's strconv.Unquote, with `/` and `|` also accepted as double quotes."""
    if len(s) < 2 or s[0] != s[-1]:
        raise ValueError("invalid syntax")
    quote, body = s[0], s[1:-1]
    if quote == "`":
        if "`" in body:
            raise ValueError("invalid syntax")
        return body.replace("\r", "")
    if quote not in "\"'|/" or "\n" in body:
        raise ValueError("invalid syntax")
    if "\\" not in body and quote not in body:
        if quote != "'":
            return body
        if len(body) == 1:
            return body
    out: List[str] = []
    raw = bytearray()  # \x and octal escapes are bytes (may form UTF-8 sequences)

    def flush() -> None:
        if raw:
            out.append(raw.decode("utf-8", "surrogateescape"))
            raw.clear()

    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise ValueError("invalid syntax")
        if c != "\\":
            flush()
            out.append(c)
            i += 1
        else:
            if i + 1 >= len(body):
                raise ValueError("invalid syntax")
            e = body[i + 1]
            i += 2
            if e in _SIMPLE_ESCAPES:
                flush()
                out.append(_SIMPLE_ESCAPES[e])
            elif e in "xuU":
                n = {"x": 2, "u": 4, "U": 8}[e]
                digits = body[i:i + n]
                if len(digits) < n or any(_digit_val(d) >= 16 for d in digits):
                    raise ValueError("invalid syntax")
                v = int(digits, 16)
                i += n
                if e == "x":
                    raw.append(v)
                else:
                    if v > 0x10FFFF:
                        raise ValueError("invalid syntax")
                    flush()
                    out.append(chr(v))
            elif e in "01234567":
                digits = body[i - 1:i + 2]
                if len(digits) < 3 or any(d not in "01234567" for d in digits):
                    raise ValueError("invalid syntax")
                v = int(digits, 8)
                if v > 255:
                    raise ValueError("invalid syntax")
                raw.append(v)
                i += 2
            elif e in "'\"|/":
                if e != quote:
                    raise ValueError("invalid syntax")
                flush()
                out.append(e)
            else:
                raise ValueError("invalid syntax")
        if quote == "'" and i < len(body):
            raise ValueError("invalid syntax")
    flush()
    return "".join(out)


# ---------------------------------------------------------------------------- filters

PRESENT, EQUAL, NOT_EQUAL, MATCHES = "?", "==", "!=", "~="


@dataclass
class Selector:
    fieldpath: Tuple[str, ...]
    operator: str = PRESENT
    value: str = ""
    _re: Optional[re.Pattern[str]] = field(default=None, repr=False, compare=False)
    _re_failed: bool = field(default=False, repr=False, compare=False)

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == PRESENT:
            return present
        if self.operator == EQUAL:
            return present and value == self.value
        if self.operator == NOT_EQUAL:
            return value != self.value
        if self.operator == MATCHES:
            if self._re is None:
                if self._re_failed:
                    return False
                try:
                    self._re = re.compile(self.value)
                except re.error:
                    self._re_failed = True
                    return False
            return self._re.search(value) is not None
        return False


@dataclass
class Filter:
    """All selectors of one filter string must match (an empty string matches all)."""

    selectors: List[Selector]

    def match(self, adaptor: Adaptor) -> bool:
        return all(s.match(adaptor) for s in self.selectors)


@dataclass
class AnyOf:
    """Any of several filters (containerd's ParseAll); no filters match everything."""

    filters: List[Filter]

    def match(self, adaptor: Adaptor) -> bool:
        return not self.filters or any(f.match(adaptor) for f in self.filters)


class _Parser:
    def __init__(self, text: str) -> None:
        self.input = text
        self.scanner = _Scanner(text)

    def mkerr(self, pos: int, msg: str) -> FilterError:
        if pos < len(self.input):
            where = f"[{self.input[:pos]} >|{self.input[pos]}|< {self.input[pos + 1:]}]"
        else:
            where = f"[{self.input}]"
        return FilterError(f"filters: parse error: {where}: {msg}")

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while True:
            tok = self.scanner.peek()
            if tok == ",":
                pos, kind, _ = self.scanner.scan()
                if kind != _SEPARATOR:
                    raise self.mkerr(pos, "expected a separator")
                selectors.append(self.selector())
            elif tok == _EOF:
                return Filter(selectors)
            else:
                raise self.mkerr(self.scanner.ppos,
                                 f"unexpected input: {tok if isinstance(tok, str) else ''}")

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.scanner.peek() in (",", _SEPARATOR, _EOF):
            return Selector(tuple(fieldpath))
        op = self.operator()
        try:
            value = self.value(allow_alt_quotes=(op == MATCHES))
        except EOFError:
            raise FilterError("filters: unexpected EOF") from None
        return Selector(tuple(fieldpath), op, value)

    def fieldpath(self) -> List[str]:
        fields = [self.field()]
        while self.scanner.peek() == ".":
            pos, kind, _ = self.scanner.scan()
            if kind != _SEPARATOR:
                raise self.mkerr(pos, "expected a field separator (`.`)")
            fields.append(self.field())
        return fields

    def field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            return self.unquote(pos, text, False)
        if kind == _ILLEGAL:
            raise self.mkerr(pos, self.scanner.err)
        raise self.mkerr(pos, "expected field or quoted")

    def operator(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _OPERATOR:
            if text in (EQUAL, NOT_EQUAL, MATCHES):
                return text
            raise self.mkerr(pos, f'unsupported operator "{text}"')
        if kind == _ILLEGAL:
            raise self.mkerr(pos, self.scanner.err)
        raise self.mkerr(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, allow_alt_quotes: bool) -> str:
        pos, kind, text = self.scanner.scan()
        if kind in (_VALUE, _FIELD):
            return text
        if kind == _QUOTED:
            return self.unquote(pos, text, allow_alt_quotes)
        if kind == _ILLEGAL:
            raise self.mkerr(pos, self.scanner.err)
        raise self.mkerr(pos, "expected value or quoted")

    def unquote(self, pos: int, text: str, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in ("'", '"'):
            raise self.mkerr(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except ValueError as e:
            raise self.mkerr(pos, f"unquoting failed: {e}") from None


def parse(text: str) -> Filter:
    """One filter string (containerd's filters.Parse)."""
    if text == "":
        return Filter([])
    return _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> AnyOf:
    """Several filter strings, any of which may match (containerd's filters.ParseAll)."""
    return AnyOf([parse(t) for t in texts])
