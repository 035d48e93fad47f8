"""Request bodies: HTTP/1.1 chunked transfer coding as dockerd sends ApplyDiff."""

from __future__ import annotations

import io

import pytest

from cvmfs_graphdriver.errors import DriverError
from cvmfs_graphdriver.server import ChunkedReader, ChunkedWriter, LengthReader


def _reader(raw: bytes):
    stream = io.BufferedReader(io.BytesIO(raw))
    return ChunkedReader(stream), stream


def test_chunks_with_extensions_and_trailers_then_the_next_request_is_intact():
    body = (b"5;name=value\r\nhello\r\n"
            b"6 ; ext\r\n world\r\n"
            b"A\r\n0123456789\r\n"
            b"0;last\r\nX-Trailer: yes\r\nOther: 1\r\n\r\n")
    reader, stream = _reader(body + b"POST /next HTTP/1.1\r\n")
    assert reader.read() == b"hello world0123456789"
    assert reader.read() == b""
    assert stream.read() == b"POST /next HTTP/1.1\r\n"


def test_small_reads_cross_chunk_boundaries():
    reader, _ = _reader(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    got = []
    while True:
        piece = reader.read(2)
        if not piece:
            break
        assert len(piece) <= 2
        got.append(piece)
    assert b"".join(got) == b"abcdefg"


def test_big_body_in_many_chunks_round_trips_through_the_writer():
    data = bytes(range(256)) * 4000
    out = io.BytesIO()
    w = ChunkedWriter(out)
    for i in range(0, len(data), 7777):
        w.write(data[i : i + 7777])
    w.write(b"")  # an empty write must not end the body
    w.close()
    reader, stream = _reader(out.getvalue())
    assert reader.read(100) == data[:100]
    assert reader.read() == data[100:]
    assert stream.read() == b""


def test_bare_lf_line_endings_are_tolerated():
    reader, _ = _reader(b"2\nhi\n0\n\n")
    assert reader.read() == b"hi"


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"5\r\nhel", "inside a chunk"),
        (b"5\r\nhello\r\n", "before the last chunk"),
        (b"", "before the last chunk"),
        (b"zz\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        # int(x, 16) took these: a negative size read the connection to its end, a
        # huge one asked for that much memory, '0x'/'_'/'+' are no HTTP chunk sizes
        (b"-5\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        (b"+5\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        (b"0_5\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        (b"\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        (b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n", "malformed chunk header"),
        (b"5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n", "longer than 4096 bytes"),
        # sizes that do not match the data: the rest cannot be read as anything
        (b"3\r\nhello\r\n0\r\n\r\n", "not followed by CRLF"),
        (b"5\r\nhello", "inside a chunk"),
        (b"5\r\nhello\r\n0\r\n", "inside its trailers"),
        (b"0\r\n" + b"X-T: 1\r\n" * 101 + b"\r\n", "more than 100 trailer lines"),
    ],
)
def test_truncated_or_malformed_bodies_are_errors(raw, words):
    reader, _ = _reader(raw)
    with pytest.raises(DriverError) as e:
        reader.read()
    assert words in str(e.value)


def test_drain_consumes_the_rest():
    reader, stream = _reader(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\nNEXT")
    assert reader.read(1) == b"a"
    reader.drain()
    assert stream.read() == b"NEXT"


def test_length_reader_stops_at_content_length():
    stream = io.BytesIO(b"0123456789NEXT")
    r = LengthReader(stream, 10)
    assert r.read(4) == b"0123"
    assert r.read() == b"456789"
    assert r.read() == b""
    assert stream.read() == b"NEXT"


@pytest.mark.parametrize("first", [-1, 4, 10])
def test_length_reader_body_shorter_than_content_length_is_an_error(first):
    """A client gone mid-body: what arrived is not the whole body (issue 11, finding 5)."""
    stream = io.BytesIO(b"0123")
    r = LengthReader(stream, 10)
    if first == 4:
        assert r.read(4) == b"0123"  # what is there is read
    with pytest.raises(DriverError) as e:
        r.read(first if first != 4 else 1)
    assert "ended after 4 of its 10 bytes (Content-Length)" in str(e.value)
    assert r.error is e.value
    # it stays failed: draining does not read on (or wait on) the connection again
    stream.write(b"late")
    stream.seek(4)
    with pytest.raises(DriverError):
        r.drain()
    assert stream.read() == b"late"


def test_chunked_reader_without_the_last_chunk_stays_failed():
    reader, stream = _reader(b"5\r\nhello\r\n")
    assert reader.read(5) == b"hello"
    with pytest.raises(DriverError) as e:
        reader.read()
    assert "before the last chunk" in str(e.value) and reader.error is e.value
    with pytest.raises(DriverError):
        reader.drain()


def test_chunked_body_over_its_limit_is_refused_413():
    stream = io.BufferedReader(io.BytesIO(b"4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n"))
    assert ChunkedReader(stream, limit=8).read() == b"abcdefgh"
    reader = ChunkedReader(io.BufferedReader(io.BytesIO(b"4\r\nabcd\r\n5\r\nefghi\r\n0\r\n\r\n")),
                           limit=8)
    with pytest.raises(DriverError) as e:
        reader.read()
    assert "larger than 8 bytes" in str(e.value) and reader.error.status == 413
