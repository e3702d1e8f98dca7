"""The tiny training configuration shared by the training, DIAS and BERT tests (the tiny
dataset itself is the ``tiny_data`` fixture of conftest.py)."""

import dataclasses

from fastalign.config import TrainConfig, load_config


def tiny_config(root, out, **changes) -> TrainConfig:
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
        ],
    )
    return dataclasses.replace(config, **changes)


def fastalign_chance(n_images):
    from fastalign.evaluation import chance_results

    return chance_results(n_images)
