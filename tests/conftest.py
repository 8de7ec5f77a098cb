"""Fixtures several test modules share."""

import os

import pytest

from groupdiff_cli.testing import write_random_inception_weights
from tests.helpers import write_run


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The user cache (converted Inception weights, reference statistics) in a folder of
    the test session's, not the user's home; subprocesses inherit it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """A SiT GroupDiff-l run with random weights over 8x8 pixels."""
    return write_run(tmp_path_factory.mktemp("run"), name="SiT-Ti/2")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A file of random Inception weights (torch-fidelity's layout)."""
    return write_random_inception_weights(tmp_path_factory.mktemp("w") / "inception.pth")
