"""tulu.atomic: a file other processes read appears whole or not at all, and a failed write leaves
neither a temporary file nor a changed target behind."""
from __future__ import annotations

import json
import os
import threading

import pytest

from tulu.atomic import (atomic_path, is_temp_name, open_atomic, write_bytes_atomic, write_json_atomic,
                         write_text_atomic)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if is_temp_name(p.name))


def test_writes_bytes_text_and_json_and_leaves_no_temp_file(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "sub" / "b.txt", "héllo")   # makes the folder
    write_json_atomic(tmp_path / "c.json", {"x": 1, "path": tmp_path})  # default=str
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1, "path": str(tmp_path)}
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": 1, "path": str(tmp_path)}, indent=1)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_file_mode_follows_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


def test_error_midway_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with open_atomic(target) as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_leaves_nothing(tmp_path):
    class Loop(dict):
        pass
    bad = Loop()
    bad["self"] = bad
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", bad)
    assert list(tmp_path.iterdir()) == []


def test_error_in_atomic_path_block_removes_temp(tmp_path):
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "plot.png") as tmp:
            assert tmp.exists() and tmp.parent == tmp_path and is_temp_name(tmp.name, "plot.png")
            raise OSError("savefig failed")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_fails_before_the_block_runs(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    ran = []
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(PermissionError):
            with open_atomic(ro / "out.jsonl") as f:
                ran.append(f)
    finally:
        ro.chmod(0o700)
    assert ran == []


def test_two_writers_get_distinct_temp_names(tmp_path):
    with atomic_path(tmp_path / "t") as a, atomic_path(tmp_path / "t") as b:
        assert a != b
    assert _leftovers(tmp_path) == []


def test_a_reader_never_sees_a_partial_file(tmp_path):
    """A reader polling while a writer rewrites a large file sees only whole versions."""
    target = tmp_path / "big.json"
    versions = [json.dumps({"v": i, "pad": "x" * 200_000}) for i in range(30)]
    write_text_atomic(target, versions[0])
    stop = threading.Event()
    seen, bad = set(), []

    def reader():
        while not stop.is_set():
            text = target.read_text()
            try:
                seen.add(json.loads(text)["v"])
            except ValueError:
                bad.append(len(text))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for text in versions[1:]:
            write_text_atomic(target, text)
    finally:
        stop.set()
        t.join()
    assert bad == [] and seen and json.loads(target.read_text())["v"] == 29
    assert _leftovers(tmp_path) == []


def test_open_atomic_rejects_append(tmp_path):
    with pytest.raises(ValueError, match="whole new file"):
        with open_atomic(tmp_path / "x", "a"):
            pass
