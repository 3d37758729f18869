"""core.paths: the one check every front end uses before joining a user-typed name to a folder."""
import os

import pytest

from npo_suite.core.paths import inside, safe_relative_name


@pytest.mark.parametrize("bad", ["", "  ", "/etc/passwd", "../x.safetensors", "a/../../b", "C:\\x.safetensors", "..\\x"])
def test_rejects_names_that_leave_the_folder(bad):
    with pytest.raises(ValueError):
        safe_relative_name(bad)


def test_accepts_subfolders_and_normalises_separators():
    assert safe_relative_name("sub\\dir/x.safetensors") == "sub/dir/x.safetensors"
    assert safe_relative_name("x..y.safetensors") == "x..y.safetensors"


def test_inside_refuses_links_that_escape(tmp_path):
    root, outside = tmp_path / "models", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert inside(root, "a/b.safetensors") == (root / "a" / "b.safetensors").resolve()
    with pytest.raises(ValueError, match="resolves outside"):
        inside(root, "link/x.safetensors")
