"""The files of a tar stream, read front to back: what a shard reader needs, without `tarfile`'s cost.

Why our own reader: `tarfile` (which webdataset's tar iterator uses) builds a TarInfo object per member in
Python, about 0.1 ms each, and a shard holds two or three members per image, so reading a shard cost more
CPU per image than opening the same JPEG as a file (`scripts/benchmark.py --data-loader DIR --data-shards
OUT` prints both). This reads the 512-byte headers directly: regular files, GNU long names, pax extended
headers (path and size; global headers ignored), other member types skipped. A compressed tar (gzip, bzip2,
xz) goes to `tarfile`, as webdataset would read it. Grouping files into samples stays webdataset's.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # tarfile's isreg(): regular, old regular, contiguous
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# webdataset's tar iterator skips such names (metadata members such as __meta__): so do we
_META = re.compile(r"__[^/]*__($|/)")


class TarStreamError(tarfile.TarError):
    """The stream is not a readable tar (damaged header, data cut off)."""


def iter_tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file in the tar `stream`, in order. A stream that ends at a header
    boundary simply ends (the caller counts what it got); one that ends inside a member raises."""
    first = _read(stream, BLOCK)
    if first.startswith(_COMPRESSED_MAGIC):
        yield from _tarfile_files(_Prepended(first, stream))
        return
    header, long_name, pax = first, None, {}
    while len(header) == BLOCK and header != b"\0" * BLOCK:
        _check(header)
        kind = header[156:157]
        member_header = kind in (b"x", b"g", b"L")  # their own size is in the header, never in pax
        size = int(pax["size"]) if "size" in pax and not member_header else _number(header[124:136])
        data = _read(stream, size, exact=True)
        _read(stream, -size % BLOCK, exact=True)  # padding to the next block
        if kind in _REGULAR:
            name = pax.get("path") or long_name or _header_name(header)
            if not _META.match(name):
                yield name, data
            long_name, pax = None, {}
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax header of the next member
            pax = _pax_records(data)
        elif kind != b"g":  # directories, links, devices: no file data for a sample
            long_name, pax = None, {}
        header = _read(stream, BLOCK)
    if 0 < len(header) < BLOCK:
        raise TarStreamError("unexpected end of data in a tar header")


def _read(stream: BinaryIO, size: int, *, exact: bool = False) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if exact and left > 0:
        raise TarStreamError("unexpected end of data inside a tar member")
    return b"".join(chunks)


def _check(header: bytes) -> None:
    try:
        stored = _number(header[148:156])
    except ValueError:
        raise TarStreamError("damaged tar header (its checksum is not a number)") from None
    # the checksum counts its own 8 bytes as spaces; some writers sum signed bytes (tarfile accepts both)
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:  # the usual case: no per-byte pass for the signed sum
        return
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    if stored != signed:
        raise TarStreamError("damaged tar header (checksum mismatch)")


def _number(field: bytes) -> int:
    """An octal header number, or GNU base-256 when the top bit of the first byte is set."""
    if field[0] & 0x80:  # sizes and checksums are never negative: no two's complement here
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":  # POSIX prefix field
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """'LENGTH KEY=VALUE\\n' records (POSIX pax)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise TarStreamError("damaged pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tarfile_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isreg() and not _META.match(member.name):
                yield member.name, tar.extractfile(member).read()


class _Prepended:
    """`stream` with `head` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out
