"""The shard reader (tar_stream._shard_files) yields what webdataset's tar reader yields, reading in place.

It replaced webdataset's tar_file_expander (a stream over 10 KiB chunks) with a seekable read of each
member; these tests pin it to webdataset's output on the same tars, so the samples, keys and bad-sample
counts the loader's other tests check stay what they were.
"""

from __future__ import annotations

import functools
import io
import logging
import tarfile

import pytest
from webdataset import tariterators

from ds_trainer.data import tar_stream
from ds_trainer.data.regular_file import open_regular

pytestmark = pytest.mark.unit


def _write_tar(path, mode="w"):
    with tarfile.open(path, mode) as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("__meta__", b"skipped by both")
        add("a-0.png", b"\x89PNG" + bytes(range(256)) * 100)  # spans several 10 KiB chunks
        add("a-0.cls", b"1")
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("a-1.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a-0.png"
        tar.addfile(link)
        add("sub/__x__/b.txt", b"a meta-looking folder below the top: kept by both")
        add("b-1.jpg", b"\xff\xd8" + b"x" * 30000)
        add("b-1.cls", b"0")
        add("empty.txt", b"")


def _handler(errors):
    """Raise each error, or (given a list) collect it and go on, as the loader's handler does."""

    def handler(exc):
        if errors is None:
            raise exc
        errors.append(exc)
        return True

    return handler


def _webdataset(path, errors=None):
    def opened():
        with open_regular(str(path)) as stream:
            yield {"url": str(path), "stream": stream}

    return list(tariterators.tar_file_expander(opened(), handler=_handler(errors)))


def _ours(path, errors=None):
    return list(tar_stream._shard_files(str(path), _handler(errors)))


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_members_equal_webdatasets(tmp_path, mode):
    path = tmp_path / ("s.tar.gz" if mode == "w:gz" else "s.tar")
    _write_tar(path, mode)
    ours, theirs = _ours(path), _webdataset(path)
    assert [m.get("fname") for m in ours] == [
        "a-0.png",
        "a-0.cls",
        "sub/__x__/b.txt",
        "b-1.jpg",
        "b-1.cls",
        "empty.txt",
        None,
    ]
    assert ours == theirs  # names, bytes, __url__, and the {} end-of-shard marker


def test_truncated_shard_gives_the_whole_members_then_reports(tmp_path):
    path = tmp_path / "s.tar"
    _write_tar(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xd8") + 1000])  # cut inside b-1.jpg's data
    errors: list[Exception] = []
    ours = _ours(path, errors)
    # the whole members before the cut, no partial one and no end marker: as webdataset gives them
    assert [m["fname"] for m in ours] == ["a-0.png", "a-0.cls", "sub/__x__/b.txt"]
    theirs: list[Exception] = []
    assert ours == [m for m in _webdataset(path, theirs) if m]
    # both report the cut member and then the end of the data, each error naming the shard
    assert [type(e) for e in errors] == [type(e) for e in theirs] == [tarfile.ReadError] * 2
    assert all(str(path) in e.args for e in errors)


def test_not_a_tar_and_missing_file_go_to_the_handler(tmp_path, caplog):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    errors: list[Exception] = []
    assert _ours(junk, errors) == [] and isinstance(errors[0], tarfile.ReadError)
    errors.clear()
    assert _ours(tmp_path / "gone.tar", errors) == [] and isinstance(errors[0], FileNotFoundError)
    with caplog.at_level(logging.WARNING, logger="ds_trainer.data.pipeline"):
        handler = functools.partial(tar_stream._log_and_continue, str(junk))  # the loader's own handler
        assert list(tar_stream._shard_files(str(junk), handler)) == []
    assert "unreadable tar data in" in caplog.text and "junk.tar" in caplog.text


def test_the_reader_keeps_no_tarinfo_per_member(tmp_path, monkeypatch):
    """Each TarInfo is dropped once read: a long shard's reader stays small (as webdataset's does)."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(200):
            info = tarfile.TarInfo(f"k{i:04d}.cls")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"1"))
    seen: list[int] = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        tar = real_open(*args, **kwargs)
        real_next = tar.next

        def next_member():
            seen.append(len(tar.members))
            return real_next()

        tar.next = next_member
        return tar

    monkeypatch.setattr(tar_stream.tarfile, "open", spy)
    assert len(_ours(path)) == 201
    assert max(seen) <= 1
