"""memplan.config.load.installed_version reads only a distribution's metadata headers; the
oracle is importlib.metadata.version itself (the email package's parse of the whole file), for
every distribution installed where the tests run, and for one that is not."""

from __future__ import annotations

import email
import importlib.metadata

import pytest

from memplan.config import load


def test_installed_version_is_importlib_metadatas_for_every_installed_distribution() -> None:
    names = sorted({d.metadata["Name"] for d in importlib.metadata.distributions()} - {None})
    assert len(names) > 20  # torch, transformers, pydantic, ... are installed with memplan's tests
    assert "transformers" in names
    wrong = {
        n: (load.installed_version(n), importlib.metadata.version(n))
        for n in names
        if load.installed_version(n) != importlib.metadata.version(n)
    }
    assert not wrong


def test_a_distribution_that_is_not_installed_has_no_version() -> None:
    assert load.installed_version("memplan-no-such-distribution") is None


@pytest.mark.parametrize(
    "text",
    [
        "Metadata-Version: 2.4\nName: x\n\nVersion: 9.9 in the description\n",
        "Name: x\nversion:  1.2.3 \n\n",
        "Name: x\r\nVersion:\t2.0\r\nSummary: a\r\n  Version: folded\r\n\r\nbody",
        "Name: x\nSummary: a\n  version: folded, not a header\n",
    ],
)
def test_the_version_header_is_the_email_packages(text: str) -> None:
    assert load._header(text, "version") == email.message_from_string(text)["Version"]
