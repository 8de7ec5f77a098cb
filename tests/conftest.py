"""Fixtures several test modules share."""

import pytest

from groupdiff_cli.testing import write_random_inception_weights
from tests.helpers import write_run


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """A SiT GroupDiff-l run with random weights over 8x8 pixels."""
    return write_run(tmp_path_factory.mktemp("run"), name="SiT-Ti/2")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A file of random Inception weights (torch-fidelity's layout)."""
    return write_random_inception_weights(tmp_path_factory.mktemp("w") / "inception.pth")
