"""data/tar_stream.py reads what tarfile reads, from every tar layout a shard can come in."""

from __future__ import annotations

import io
import tarfile

import pytest

from swin_train.data import tar_stream
from swin_train.data.tar_stream import TarStreamError, iter_tar_files


def _tar(fmt: int, members: list[tuple[str, bytes]], *, extra=(), mode: str = "w", mtime=1.5) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for kind, name in extra:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime  # a float mtime makes the pax format write a header
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _with_tarfile(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


LONG = "class_" + "x" * 120 + "/n01440764_10026"  # beyond the 100-byte name field
MEMBERS = [
    ("000000.jpg", b"\xff\xd8jpeg bytes" * 50),
    ("000000.cls", b"3"),
    ("sub/dir/000001.PNG", b""),  # empty file, upper-case extension, a path
    ("sub/dir/000001.cls", b"7"),
    (LONG + ".jpg", bytes(range(256)) * 3),
    (LONG + ".cls", b"12"),
    ("caf\u00e9/000002.jpg", b"x" * 511),  # non-ASCII name (pax), size one short of a block
    ("caf\u00e9/000002.cls", b"0"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_same_files_as_tarfile(fmt, mode):
    raw = _tar(fmt, MEMBERS, extra=[(tarfile.DIRTYPE, "sub"), (tarfile.SYMTYPE, "link")], mode=mode)
    assert list(iter_tar_files(io.BytesIO(raw))) == _with_tarfile(raw) == MEMBERS


def test_ustar_prefix_field_and_webdataset_writer(tmp_path):
    import webdataset as wds

    deep = "a" * 60 + "/" + "b" * 60 + "/000003.jpg"  # ustar splits it into prefix and name
    raw = _tar(tarfile.USTAR_FORMAT, [(deep, b"data")], mtime=0)
    assert list(iter_tar_files(io.BytesIO(raw))) == [(deep, b"data")]
    path = tmp_path / "hub.tar"
    with wds.TarWriter(str(path)) as sink:  # how the Hub's imagenet-1k-wds shards were written
        for i in range(3):
            sink.write({"__key__": f"n01440764_{i}", "jpg": b"j" * (100 + i), "cls": str(i).encode()})
    raw = path.read_bytes()
    assert list(iter_tar_files(io.BytesIO(raw))) == _with_tarfile(raw)


def test_metadata_members_are_skipped_as_webdataset_does():
    raw = _tar(tarfile.PAX_FORMAT, [("__meta__", b"{}"), ("000000.jpg", b"j"), ("__index__/x", b"i")])
    assert list(iter_tar_files(io.BytesIO(raw))) == [("000000.jpg", b"j")]


def test_a_stream_cut_inside_a_member_or_header_raises_and_one_cut_between_members_ends():
    raw = _tar(tarfile.GNU_FORMAT, MEMBERS[:2])
    first_member_end = 512 + 1024  # header + the 550-byte file padded to 2 blocks
    assert list(iter_tar_files(io.BytesIO(raw[:first_member_end]))) == MEMBERS[:1]
    for cut in (first_member_end - 100, first_member_end + 100):
        with pytest.raises(TarStreamError, match="unexpected end of data"):
            list(iter_tar_files(io.BytesIO(raw[:cut])))


def test_a_damaged_header_raises():
    raw = bytearray(_tar(tarfile.GNU_FORMAT, MEMBERS[:2]))
    raw[10] ^= 0x55  # a byte of the first name: the checksum no longer matches
    with pytest.raises(TarStreamError, match="checksum"):
        list(iter_tar_files(io.BytesIO(bytes(raw))))
    assert isinstance(TarStreamError("x"), tarfile.TarError)  # read_shard's handler catches it


def test_header_numbers_octal_and_base_256():
    assert tar_stream._number(b"0000644\0") == 0o644
    assert tar_stream._number(b"        ") == 0
    assert tar_stream._number(bytes([0x80]) + (9 * 2**30).to_bytes(11, "big")) == 9 * 2**30  # > 8 GiB


def test_small_reads_from_a_pipe_like_stream():
    raw = _tar(tarfile.PAX_FORMAT, MEMBERS)

    class Trickle(io.RawIOBase):  # returns at most 7 bytes per read, as a pipe may
        def __init__(self):
            self.data = io.BytesIO(raw)

        def readable(self):
            return True

        def read(self, size=-1):
            return self.data.read(min(size, 7) if size >= 0 else 7)

    assert list(iter_tar_files(Trickle())) == MEMBERS
