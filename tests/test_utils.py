import os
import stat

import pytest

from sr_diffusion.utils import atomic_directory, atomic_path


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_atomic_directory_keeps_old_until_new_is_complete(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash")
    assert (target / "a").read_text() == "old"
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_results_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_text("x")
        with atomic_directory(tmp_path / "d") as tmp:
            pass
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f") == 0o644
    assert _mode(tmp_path / "d") == 0o755
