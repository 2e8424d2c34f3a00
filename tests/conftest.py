import pytest
import torch

from tests.procenv import own_this_process

own_this_process()  # in-process Ray and MLflow, and every subprocess that inherits os.environ


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
