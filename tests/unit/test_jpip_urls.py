"""The JPIP target URL form shared by the JPIP server and the JPIP Referenced headers."""

from __future__ import annotations

import pytest

from xdsi.jpip.urls import BadTarget, parse_target, provider_url


def test_provider_url_names_the_instance_as_target() -> None:
    assert provider_url("https://img.example.org/", "1.2.3.4") == "https://img.example.org/jpip?target=1.2.3.4"
    assert parse_target("1.2.3.4") == "1.2.3.4"


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "1.2.abc", "1.2.3/1", "1.2.3&cnew=http", "1." + "2" * 70])
def test_anything_but_a_uid_is_refused(bad: str) -> None:
    with pytest.raises(BadTarget):
        parse_target(bad)
    with pytest.raises(BadTarget):
        provider_url("http://x", bad)


def test_no_public_url_no_provider_url() -> None:
    with pytest.raises(ValueError):
        provider_url("", "1.2.3")
