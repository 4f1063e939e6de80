"""Suite-wide settings: one intra-op thread.

The test models are tiny, so threading buys nothing and on a shared 2-core machine (CI, laptops running other
work) OpenMP spin-waiting makes each small matmul tens of times slower. One thread also keeps results
bit-reproducible across machines with different core counts.
"""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _runs_on_the_cpu_logging_every_step():
    """Every test's runs as `llada-trm train --device cpu --log-every 1` would run them (flags, not settings
    since issue 25: `config.FLAGS`); a test that needs other values nests its own `fixed_settings`."""
    from llada_trm.config import fixed_settings

    with fixed_settings({"training.device": "cpu", "training.log_every": 1}):
        yield
