import pytest
import torch

from tests.procenv import own_this_process

own_this_process()  # in-process Ray and MLflow, and every subprocess that inherits os.environ


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


# Files that start Ray / MLflow processes, longest first (seconds per file in CI's two-worker run, 2026-11-30). CI
# runs `-n 2 --dist loadfile`: each worker takes whole files in the order of the queue, so these go first and the short
# files fill the gaps at the end, instead of one long file running alone after everything else (measured: 8 minutes
# of one idle worker). xdist would otherwise queue the files with the most tests first (its "loadscope reorder").
LONGEST_FIRST = ["test_defend_integration.py", "test_integration.py", "test_search_integration.py", "test_faults_protect.py", "test_faults.py",
                 "test_faults_tracking.py", "test_faults_pretrain.py", "test_faults_stages.py", "test_chunks.py", "test_search_journal.py",
                 "test_faults_search.py", "test_generation_integration.py", "test_exactly_once.py", "test_bad_input.py", "test_ui.py"]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist is installed
        config.option.loadscopereorder = False      # keep the collection order below as the queue's order


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def drawn(monkeypatch):
    """Every (policy, timesteps) the DDPM losses (and a drawing score) draw while the test runs."""
    from sophon_ray.modes.generation import ddpm

    seen: list[tuple[object, torch.Tensor]] = []
    real = ddpm.sample_timesteps

    def spy(policy, n, schedule, device="cpu", generator=None):
        t = real(policy, n, schedule, device, generator)
        seen.append((policy, t.clone()))
        return t

    monkeypatch.setattr(ddpm, "sample_timesteps", spy)
    return seen
