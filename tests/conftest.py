import os
import random

import numpy as np
import pytest
import torch

# Where a GPU is, Triton kernels run compiled on CUDA tensors (the gpu-marked tests); without
# one they run on CPU tensors through the interpreter. The interpreter is chosen per kernel when
# triton.jit decorates it, so before the first fastalign kernel module is imported: here
# (importing torch does not import triton). The ahead-of-time compile check compiles in a clean
# subprocess of its own.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers.cpu_paths import cpu_path  # noqa: F401 (the fixture, for every test file)

from fastalign._backends import triton_importable, triton_interpret  # noqa: E402
from fastalign.data import generate_synthetic  # noqa: E402

# Every test starts from this seed (torch, numpy, random): a failure replays with the same
# FASTALIGN_TEST_SEED, and another value re-draws the inputs of the tests that draw at random.
SEED = int(os.environ.get("FASTALIGN_TEST_SEED", "0"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "triton_interpreter: runs Triton kernels on CPU tensors (TRITON_INTERPRET=1); skipped "
        "where Triton runs compiled on a GPU, whose Triton tests are marked gpu",
    )


def pytest_report_header(config):
    return f"test seed: {SEED} (set FASTALIGN_TEST_SEED to change it)"


def _uses_triton_on_cpu(item) -> bool:
    """Marked triton_interpreter, or parametrized with backend="triton" outside the gpu tests."""
    if "triton_interpreter" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "triton" and "gpu" not in item.keywords


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_triton = pytest.mark.skip(reason="triton is not installed")
    compiled = pytest.mark.skip(
        reason="Triton runs compiled on this GPU machine: its tests on CPU tensors need "
        "TRITON_INTERPRET=1 (a machine without a GPU)"
    )
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        elif _uses_triton_on_cpu(item):
            if not triton_importable():
                item.add_marker(no_triton)
            elif not triton_interpret():
                item.add_marker(compiled)


@pytest.fixture(autouse=True)
def test_seed() -> int:
    """Seeds torch, numpy and random before every test; the seed, for tests that derive their
    own generators from it."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    return SEED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("test seed", f"FASTALIGN_TEST_SEED={SEED}"))
    return report


# --------------------------------------------------------------------------- training data
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset (64 / 12 / 12 images of 12 regions, 16-d word vectors)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, seed=3, n_train=64, n_val=12, n_test=12, n_regions=12, word_dim=16)
    return root


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(root, out, *overrides, **changes)``: a 2-epoch, batch-16 training
    config on ``root`` (CHAN's similarity), with ``key=value`` overrides and dataclass
    field changes."""
    import dataclasses

    from fastalign.config import load_config

    def make(root, out, *overrides, **changes):
        config = load_config(
            None,
            [
                f"data_root={root}",
                f"word_vectors={root / 'glove_synthetic.txt'}",
                f"output_dir={out}",
                "epochs=2",
                "batch_size=16",
                "lr=0.002",
                "lr_decay_epochs=[1]",
                "margin=0.1",
                "model.word_dim=16",
                "model.embed_dim=32",
                "model.aggregate=lse",
                "model.score_scale=10.0",
                *overrides,
            ],
        )
        return dataclasses.replace(config, **changes)

    return make
