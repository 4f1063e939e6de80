"""Suite-wide settings: one intra-op thread.

The test models are tiny, so threading buys nothing and on a shared 2-core machine (CI, laptops running other
work) OpenMP spin-waiting makes each small matmul tens of times slower. One thread also keeps results
bit-reproducible across machines with different core counts.
"""

import torch

torch.set_num_threads(1)
