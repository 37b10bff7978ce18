"""``Tier.abspath``: the quick walk for plain relative paths answers exactly what full resolution does, and never escapes.

The quick path (one ``lstat`` per component under the once-resolved root) must give
the same path as ``Path.resolve`` whenever it answers, and leave every other
form (``..``, symlinks, absolute paths) to the full resolution and its check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsi.config import TierSettings
from xdsi.storage.tiers import StorageError, Tier


@pytest.fixture()
def tier(tmp_path: Path) -> Tier:
    real = tmp_path / "real-root"
    (real / "1.2" / "3.4").mkdir(parents=True)
    (real / "1.2" / "3.4" / "5.6.dcm").write_bytes(b"x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.dcm").write_bytes(b"s")
    (tmp_path / "link-root").symlink_to(real)  # the configured root itself is a symlink: resolved once
    t = Tier(TierSettings(name="hot", path=tmp_path / "link-root"))
    return t


def test_plain_paths_match_full_resolution(tier: Tier) -> None:
    for rel in ("1.2/3.4/5.6.dcm", "1.2/3.4/missing.dcm", "9.9/8.8/7.7.dcm"):
        assert tier.abspath(rel) == (tier.root / rel).resolve()
    assert tier.abspath("1.2/3.4/5.6.dcm").read_bytes() == b"x"


def test_dot_dot_and_absolute_paths_cannot_escape(tier: Tier, tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        tier.abspath("../outside/secret.dcm")
    with pytest.raises(StorageError):
        tier.abspath("1.2/../../outside/secret.dcm")
    with pytest.raises(StorageError):
        tier.abspath(str(tmp_path / "outside" / "secret.dcm"))
    with pytest.raises(StorageError):
        tier.abspath(".")
    assert tier.abspath("1.2/../1.2/3.4/5.6.dcm") == (tier.root / "1.2/3.4/5.6.dcm").resolve()


def test_symlinks_below_the_root_are_resolved_and_contained(tier: Tier, tmp_path: Path) -> None:
    real = tier.root.resolve()
    (real / "1.2" / "escape").symlink_to(tmp_path / "outside")
    with pytest.raises(StorageError):
        tier.abspath("1.2/escape/secret.dcm")
    (real / "1.2" / "3.4" / "alias.dcm").symlink_to(real / "1.2" / "3.4" / "5.6.dcm")
    assert tier.abspath("1.2/3.4/alias.dcm") == real / "1.2" / "3.4" / "5.6.dcm"
