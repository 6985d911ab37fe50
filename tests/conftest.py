"""Suite-wide settings: the tests use tiny tensors, where one intra-op thread is fastest and does not
degrade badly when the machine is shared (multi-threaded spinning on tiny ops can cost 10x)."""

import torch

torch.set_num_threads(1)
