import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores are shared by the suite; one intra-op thread keeps timings and results stable.
    torch.set_num_threads(1)
    yield
