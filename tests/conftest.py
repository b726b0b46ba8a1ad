"""Shared test fixtures: paths to the read-only reference material beside the checkout, deterministic CPU torch."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
OFFICIAL_PHI = REFERENCE / "official_perturb_750.pth"
OFFICIAL_OUTPUT = REFERENCE / "official_reference_shared.npz"


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
def official_phi_path():
    if not OFFICIAL_PHI.is_file():
        pytest.fail(f"reference phi missing at {OFFICIAL_PHI}; the shared/ folder must sit beside the checkout")
    return OFFICIAL_PHI
