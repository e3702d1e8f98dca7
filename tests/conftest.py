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


# --------------------------------------------------------------------------- training data
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset (64 / 12 / 12 images of 12 regions, 16-d word vectors)."""
    from fastalign.data import generate_synthetic

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
