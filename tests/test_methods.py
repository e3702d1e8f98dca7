"""The checks every registered method gets, present and future: its config round-trips, a
few steps lower its loss, checkpoints resume it exactly, it is evaluated through the shared
function, its additions switched off give its base method step for step, and 2 gloo
processes give the loss and gradients of one process on the global batch."""

import dataclasses
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from fastalign import distributed
from fastalign.checkpoint import load_checkpoint, restore_trained
from fastalign.cli import main
from fastalign.config import TrainConfig, load_config
from fastalign.evaluation import evaluate
from fastalign.methods import get_method, method_names
from fastalign.model_evaluation import encode_dataset, evaluate_trained
from fastalign.training import Trainer

METHODS = method_names()
EXTENDING = [name for name in METHODS if get_method(name).base is not None]
TRAINABLE = [name for name in METHODS if not get_method(name).training_free]


def _first_batch(trainer, epoch=1):
    """The first global batch of ``epoch`` as the method's loader gives it (one process)."""
    return next(iter(trainer.method.train_loader(trainer.data, epoch, world_size=1)))


def _losses(history):
    return [row["loss"] for row in history if "val_rsum" not in row]


def _without_timing(history):
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trips(name, tmp_path):
    config = load_config(None, [f"method={name}"])
    assert isinstance(config.options, get_method(name).Options)
    assert TrainConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config
    with pytest.raises(ValueError, match=f"unknown configuration keys: {name}.no_such_option"):
        load_config(None, [f"method={name}", f"{name}.no_such_option=1"])


@pytest.mark.parametrize("name", TRAINABLE)
def test_a_few_steps_lower_the_loss(name, tiny_data, tiny_config, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(tiny_data, tmp_path, f"method={name}"), progress=False)
    trainer.epoch = 1  # past the warm-up: the hardest-negative hinge
    batch = _first_batch(trainer)
    losses = [trainer.train_step(batch)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0], losses
    weights = trainer.method.loss_weights()
    terms = {k[5:]: v for k, v in trainer.history[-1].items() if k.startswith("loss_")}
    assert terms and set(terms) <= set(weights)
    assert trainer.history[-1]["loss"] == pytest.approx(
        sum(weights[k] * v for k, v in terms.items())
    )


@pytest.mark.parametrize("name", TRAINABLE)
def test_checkpoint_resume_is_exact(name, tiny_data, tiny_config, tmp_path):
    straight = Trainer(tiny_config(tiny_data, tmp_path / "a", f"method={name}"), progress=False)
    straight.fit()
    first = tiny_config(tiny_data, tmp_path / "b", f"method={name}", "epochs=1")
    Trainer(first, progress=False).fit()
    resumed = Trainer(
        tiny_config(tiny_data, tmp_path / "b", f"method={name}"), resume=True, progress=False
    )
    resumed.fit()
    assert _without_timing(resumed.history) == _without_timing(straight.history)
    assert resumed.method.state_dict().keys() == straight.method.state_dict().keys()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


@pytest.mark.parametrize("name", METHODS)
def test_evaluation_goes_through_the_shared_function(
    name, tiny_data, tiny_config, tmp_path, capsys
):
    epochs = 0 if get_method(name).training_free else 1
    trainer = Trainer(
        tiny_config(tiny_data, tmp_path, f"method={name}", f"epochs={epochs}"), progress=False
    )
    best = trainer.fit()
    # the validation the trainer logged = the shared function = the whole matrix at once
    assert evaluate_trained(trainer.method, trainer.model, trainer.val_set) == best
    images, captions = encode_dataset(trainer.model, trainer.val_set)
    whole = trainer.method.similarity(trainer.model, images, captions)
    assert evaluate(whole) == pytest.approx(best)
    # `fastalign eval` restores the method from the checkpoint and prints the same rSum
    method, model, _ = restore_trained(load_checkpoint(tmp_path / "best.pt"))
    assert type(method) is type(trainer.method)
    capsys.readouterr()
    main(["eval", str(tmp_path / "best.pt"), "--split", "dev"])
    printed = re.search(r"rSum\s+([\d.]+)", capsys.readouterr().out)
    assert float(printed.group(1)) == pytest.approx(best["rsum"], abs=0.01)


@pytest.mark.parametrize("name", EXTENDING)
def test_additions_off_train_as_the_base_method(name, tiny_data, tiny_config, tmp_path):
    method = get_method(name)
    config = tiny_config(tiny_data, tmp_path / "off", f"method={name}")
    config = dataclasses.replace(config, options=method.options_without_additions(config.options))
    base = tiny_config(tiny_data, tmp_path / "base", f"method={method.base}")
    off, plain = Trainer(config, progress=False), Trainer(base, progress=False)
    off.fit()
    plain.fit()
    assert _losses(off.history) == _losses(plain.history)
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, off.model.state_dict()[key]), key


def _one_step_worker(rank, port, config, out):
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = _steps(Trainer(config, progress=False))
    if rank == 0:
        torch.save(result, out)
    distributed.cleanup()


def _steps(trainer, n=3):
    """The losses of ``n`` steps and the gradients of the first (global batches of the
    epoch-1 order, past the warm-up)."""
    trainer.epoch = 1
    loader = trainer.method.train_loader(trainer.data, 1, world_size=1)
    losses, grads = [], None
    for k, batch in zip(range(n), loader):
        losses.append(trainer.train_step(batch))
        if k == 0:
            grads = {p: t.grad.clone() for p, t in trainer.model.named_parameters()}
    return losses, grads


@pytest.mark.parametrize("name", TRAINABLE)
def test_two_processes_match_one_on_the_global_batch(name, tiny_data, tiny_config, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_config(tiny_data, tmp_path / "ddp", f"method={name}", "grad_clip=0")
    mp.spawn(_one_step_worker, args=(port, config, tmp_path / "two.pt"), nprocs=2)
    got_losses, got_grads = torch.load(tmp_path / "two.pt")
    one = tiny_config(tiny_data, tmp_path / "one", f"method={name}", "grad_clip=0")
    want_losses, want_grads = _steps(Trainer(one, progress=False))
    for got, want in zip(got_losses, want_losses):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    for key, want in want_grads.items():
        # float32 sums in another order: tolerance relative to the gradient's own scale
        assert want.abs().max() > 0, key
        torch.testing.assert_close(
            got_grads[key],
            want,
            rtol=1e-4,
            atol=1e-4 * float(want.abs().max()),
            msg=lambda m, key=key: f"{key}: {m}",
        )


_PLUGIN = '''
from dataclasses import dataclass

from fastalign.fields import setting
from fastalign.methods import register_method
from fastalign.methods.base import Method


@dataclass
class ScaledOptions:
    scale: float = setting(1.0, above=0)


@register_method
class Scaled(Method):
    """The backbone's score times ``scale``; counts the epochs it has seen (its state)."""

    name = "scaled_plugin"
    Options = ScaledOptions

    def __init__(self, config):
        super().__init__(config)
        self.epochs_seen = 0

    def similarity(self, model, images, captions):
        return self.options.scale * model.similarity(images, captions)

    def on_epoch_end(self, model, epoch):
        self.epochs_seen += 1

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = state["epochs_seen"]
'''


def test_a_method_from_another_package_plugs_in(
    tiny_data, tiny_config, tmp_path, monkeypatch, capsys
):
    """A method that lives in another installed package (an entry point in the group
    ``fastalign.methods``) is listed, configured, trained, resumed and evaluated by the
    command line, with no file of fastalign edited."""
    import importlib

    import fastalign.methods

    site = tmp_path / "site"
    (site / "scaled_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "scaled_plugin.py").write_text(_PLUGIN)
    (site / "scaled_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: scaled-plugin\nVersion: 0.1\n"
    )
    (site / "scaled_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[fastalign.methods]\nscaled_plugin = scaled_plugin:Scaled\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(fastalign.methods, "_REGISTRY", dict(fastalign.methods._REGISTRY))
    monkeypatch.setattr(fastalign.methods, "_discovered", False)

    main(["list"])
    assert "scaled_plugin" in capsys.readouterr().out
    config = tiny_config(tiny_data, tmp_path / "run", "method=scaled_plugin", epochs=1)
    config_path = tmp_path / "scaled.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    main(["train", "--config", str(config_path), "--no-progress", "scaled_plugin.scale=2.0"])
    main(
        [
            "train",
            "--config",
            str(config_path),
            "--no-progress",
            "scaled_plugin.scale=2.0",
            "epochs=2",
            "--resume",
        ]
    )
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    method, _, _ = restore_trained(checkpoint)
    assert type(method).__name__ == "Scaled" and method.options.scale == 2.0
    assert method.epochs_seen == 2  # its state went through the checkpoint and the resume
    capsys.readouterr()
    main(["eval", str(tmp_path / "run" / "last.pt"), "--split", "dev"])
    assert re.search(r"rSum\s+[\d.]+", capsys.readouterr().out)
    with pytest.raises(SystemExit):  # its options are checked like the bundled methods'
        main(["train", "--config", str(config_path), "--overwrite", "scaled_plugin.scale=0"])
    assert "scaled_plugin.scale must be > 0" in capsys.readouterr().err
