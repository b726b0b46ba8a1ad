"""Shared test fixtures: the read-only reference material beside the checkout (a missing file fails the test that
needs it, see :func:`helpers.require_shared`), deterministic CPU torch, and the smoke study run once per session.
The plain functions behind them live in ``tests/helpers.py``."""
import os
from pathlib import Path

import pytest
import torch

from helpers import OFFICIAL_OUTPUT as _OFFICIAL_OUTPUT
from helpers import OFFICIAL_PHI as _OFFICIAL_PHI
from helpers import SHARED, require_shared, run_smoke_study

OFFICIAL_OUTPUT = SHARED / _OFFICIAL_OUTPUT  # (tests/test_gpu.py imports it from here; new code: the fixture below)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def official_phi_path() -> Path:
    """The authors' released phi (``shared/reference/official_perturb_750.pth``)."""
    return require_shared(_OFFICIAL_PHI)


@pytest.fixture
def official_output_path() -> Path:
    """The authors' code's output for their phi (``shared/reference/official_reference_shared.npz``)."""
    return require_shared(_OFFICIAL_OUTPUT)


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> Path:
    """The artifacts root of the smoke study, ``workbench study run 01 02 03 04 05 --profile smoke``, run once per
    session (about a minute on a loaded 2-core machine) for the tests that only read it: tests/test_notebooks.py and
    tests/test_dashboard.py. Never write into it; copy it first. ``WORKBENCH_SMOKE_ARTIFACTS`` names a root where
    that study already ran (it is then used as it is)."""
    given = os.environ.get("WORKBENCH_SMOKE_ARTIFACTS")
    if given:
        return Path(given)
    return run_smoke_study(tmp_path_factory.mktemp("smoke") / "artifacts")
