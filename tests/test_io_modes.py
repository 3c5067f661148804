"""A saved model directory is as readable as any file its writer creates: folders 0o777 and files 0o666 less the
umask (``tempfile.mkdtemp`` alone would leave ``drwx------``)."""

from __future__ import annotations

import os
import stat

import pytest


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_directory_modes_follow_the_umask(tiny_model, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = tiny_model.save(tmp_path / "m")
        tiny_model.save(tmp_path / "m")  # replacing an existing directory as well
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert any(p.is_dir() for p in paths[1:]) and any(p.name == "model.safetensors" for p in paths)
    for p in paths:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = dir_mode if p.is_dir() else file_mode
        assert mode == want, f"{p.relative_to(tmp_path)}: {oct(mode)}, expected {oct(want)}"
