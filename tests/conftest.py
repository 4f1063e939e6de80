"""Suite-wide settings (one intra-op thread) and the shared tiny assets' fixtures.

The test models are tiny, so threading buys nothing and on a shared 2-core machine (CI, laptops running other
work) OpenMP spin-waiting makes each small matmul tens of times slower. One thread also keeps results
bit-reproducible across machines with different core counts.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_assets import tiny_backbone, tiny_run

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _runs_on_the_cpu_logging_every_step():
    """Every test's runs as `llada-trm train --device cpu --log-every 1` would run them (flags, not settings
    since issue 25: `config.FLAGS`); a test that needs other values nests its own `fixed_settings`."""
    from llada_trm.config import fixed_settings

    with fixed_settings({"training.device": "cpu", "training.log_every": 1}):
        yield


@pytest.fixture(autouse=True)
def keep_the_thread_count() -> Iterator[None]:
    """Give back torch's thread count after each test, so that no test depends on the order the suite runs
    in: a command run in-process may set its own (`llada-trm pretrain` with `training.threads: 2`, from the
    README workflow), and a fork made after a 2-thread OpenMP team hangs in its child's first parallel op
    (tests/training/test_fault_injection.py forks its training runs)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny backbone every test shares (`tiny_assets.tiny_backbone`); a module that needs another one
    (another vocabulary, another init) defines its own `backbone_dir`."""
    return tiny_backbone(tmp_path_factory)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared 2-step slot-refiner run (`tiny_assets.tiny_run`)."""
    return tiny_run(tmp_path_factory)
