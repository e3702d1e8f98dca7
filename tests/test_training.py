"""Training loop, checkpoints, resume, configuration and the command line, on a tiny
synthetic dataset."""

import dataclasses

import pytest
import torch
import yaml
from _helpers.training import fastalign_chance, tiny_config

from fastalign import distributed
from fastalign.cli import main
from fastalign.config import load_config
from fastalign.training import Trainer, load_checkpoint


def test_training_learns_and_writes_checkpoints(tiny_data, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "run", epochs=3), progress=False)
    best = trainer.fit()
    chance = fastalign_chance(12)  # 12 validation images: R@10 alone is ~80% by chance
    assert best["rsum"] > chance["rsum"] + 40, (best, chance)
    assert best["r1_i2t"] + best["r1_t2i"] > 2 * (chance["r1_i2t"] + chance["r1_t2i"])
    for name in ("best.pt", "last.pt", "log.csv"):
        assert (tmp_path / "run" / name).is_file()
    losses = [row["loss"] for row in trainer.history if "val_rsum" not in row]
    assert losses[-1] < losses[0]


def test_resume_continues_exactly(tiny_data, tmp_path):
    straight = Trainer(tiny_config(tiny_data, tmp_path / "a", epochs=2), progress=False)
    straight.fit()
    Trainer(tiny_config(tiny_data, tmp_path / "b", epochs=1), progress=False).fit()
    resumed = Trainer(tiny_config(tiny_data, tmp_path / "b", epochs=2), resume=True, progress=False)
    resumed.fit()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_corrupt_and_incompatible_checkpoints(tiny_data, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        Trainer(tiny_config(tiny_data, tmp_path / "bad"), resume=True, progress=False)
    torch.save({"format": "something else"}, tmp_path / "bad" / "last.pt")
    with pytest.raises(ValueError, match="not a fastalign-checkpoint"):
        load_checkpoint(tmp_path / "bad" / "last.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    Trainer(tiny_config(tiny_data, tmp_path / "ok", epochs=1), progress=False).fit()
    other = tiny_config(tiny_data, tmp_path / "ok", epochs=2)
    other = dataclasses.replace(other, model=dataclasses.replace(other.model, direction="both"))
    with pytest.raises(ValueError, match="model configuration differs"):
        Trainer(other, resume=True, progress=False)


def test_config_files_and_overrides(tmp_path):
    config = load_config("configs/chan_f30k.yaml", ["model.embed_dim=256", "epochs=3"])
    assert config.model.embed_dim == 256 and config.epochs == 3
    assert config.model.aggregate == "lse" and config.margin == 0.05
    with pytest.raises(ValueError, match="unknown configuration keys: epoch, model.dim"):
        load_config(None, ["epoch=3", "model.dim=4"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Trainer(load_config(None, ["optimizer=sgd", "data_root=/nonexistent"]), progress=False)


def test_command_line_train_and_eval(tiny_data, tmp_path, capsys):
    config = tiny_config(tiny_data, tmp_path / "cli", epochs=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    main(["train", "--no-progress", "--config", str(path), "batch_size=32"])
    main(["eval", str(tmp_path / "cli" / "best.pt"), "--split", "test"])
    out = capsys.readouterr().out
    assert "rSum" in out and "t2i" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fastalign demo" in capsys.readouterr().out


def test_tensorboard_logging_when_installed(tiny_data, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    Trainer(tiny_config(tiny_data, tmp_path / "tb", epochs=1), progress=False).fit()
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def _distributed_worker(rank, port, config, out):
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    trainer = Trainer(config, progress=False)
    trainer.fit()
    if rank == 0:
        torch.save([row["loss"] for row in trainer.history if "val_rsum" not in row], out)
    distributed.cleanup()


@pytest.mark.parametrize("method", ["baseline", "dias"])
def test_torchrun_training_matches_one_process(tiny_data, tmp_path, method):
    """2 gloo processes, each with half of every batch, follow the one-process loss curve
    (with DIAS: the regularizers of the gathered global batch on every rank)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_config(tiny_data, tmp_path / "ddp", epochs=2, batch_size=16, method=method)
    mp.spawn(_distributed_worker, args=(port, config, tmp_path / "losses.pt"), nprocs=2)
    single = Trainer(
        tiny_config(tiny_data, tmp_path / "one", epochs=2, batch_size=16, method=method),
        progress=False,
    )
    single.fit()
    # drop_last under DDP: compare the steps both runs took
    want = [row["loss"] for row in single.history if "val_rsum" not in row]
    got = torch.load(tmp_path / "losses.pt")
    steps = min(len(got), len(want))
    assert steps >= 6
    torch.testing.assert_close(
        torch.tensor(got[:steps]), torch.tensor(want[:steps]), rtol=1e-4, atol=1e-4
    )
