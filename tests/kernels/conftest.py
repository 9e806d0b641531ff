"""Every kernel test runs on the `device` fixture (tests/conftest.py): CUDA when present, else the CPU
with Triton's interpreter."""
import pytest


@pytest.fixture(autouse=True)
def _on_device(device):
    yield
