import os

# Triton kernels run on CPU tensors through the interpreter. It must be chosen before the
# first import of triton in this process; the ahead-of-time compile check compiles in a
# clean subprocess of its own.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
