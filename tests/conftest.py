import pytest
import torch

import laplace_lora_ext  # noqa: F401  (registers the "lora" classes)

# The models here are tiny: one thread is as fast and does not oversubscribe a shared CPU.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
