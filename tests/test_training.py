"""Training loop, checkpoints, run and data identity, configuration and the command line,
on a tiny synthetic dataset (every method's own checks: test_methods.py)."""

import contextlib
import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastalign.checkpoint import load_checkpoint, save_atomic
from fastalign.cli import main
from fastalign.config import bundled_configs, load_config
from fastalign.evaluation import chance_results
from fastalign.training import Trainer


def test_training_learns_and_writes_checkpoints(tiny_data, tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "run", epochs=3), progress=False)
    best = trainer.fit()
    chance = chance_results(12)  # 12 validation images: R@10 alone is ~80% by chance
    assert best["rsum"] > chance["rsum"] + 40, (best, chance)
    assert best["r1_i2t"] + best["r1_t2i"] > 2 * (chance["r1_i2t"] + chance["r1_t2i"])
    for name in ("best.pt", "last.pt", "log.csv"):
        assert (tmp_path / "run" / name).is_file()
    losses = [row["loss"] for row in trainer.history if "val_rsum" not in row]
    assert losses[-1] < losses[0]


def test_corrupt_and_incompatible_checkpoints(tiny_data, tiny_config, tmp_path):
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
    with pytest.raises(ValueError, match="resume: model.direction is .both. in this config but"):
        Trainer(other, resume=True, progress=False)


def test_config_files_and_overrides(tmp_path):
    config = load_config("chan_f30k", ["model.embed_dim=256", "epochs=3"])
    assert {"demo_synthetic", "chan_f30k", "vsepp_coco", "dias_synthetic"} <= set(bundled_configs())
    for name in bundled_configs():  # every bundled config loads
        load_config(name)
    assert config.model.embed_dim == 256 and config.epochs == 3
    assert config.model.aggregate == "lse" and config.margin == 0.05
    with pytest.raises(ValueError, match="unknown configuration keys: epoch, model.dim"):
        load_config(None, ["epoch=3", "model.dim=4"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(FileNotFoundError, match="nor a bundled config"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Trainer(load_config(None, ["optimizer=sgd", "data_root=/nonexistent"]), progress=False)


def test_command_line_train_and_eval(tiny_data, tiny_config, tmp_path, capsys):
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


def test_tensorboard_logging_when_installed(tiny_data, tiny_config, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    Trainer(tiny_config(tiny_data, tmp_path / "tb", epochs=1), progress=False).fit()
    assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_an_output_dir_holding_a_run_is_never_silently_replaced(
    tiny_data, tiny_config, tmp_path, capsys
):
    config = tiny_config(tiny_data, tmp_path / "run", epochs=1)
    Trainer(config, progress=False).fit()
    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        Trainer(config, progress=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(["train", "--no-progress", "--config", str(path)])
    assert refused.value.code == 2 and "holds a run" in capsys.readouterr().err
    before = load_checkpoint(tmp_path / "run" / "last.pt")["step"]
    main(["train", "--no-progress", "--config", str(path), "--overwrite"])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == before
    # resuming a finished run says so and trains nothing
    capsys.readouterr()
    main(["train", "--no-progress", "--config", str(path), "--resume"])
    assert "the run is finished (1 of 1 epochs)" in capsys.readouterr().err


def test_console_shows_every_loss_term(tiny_data, tiny_config, tmp_path, capsys):
    Trainer(tiny_config(tiny_data, tmp_path, "method=dias", epochs=1), progress=False).fit()
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("epoch 1:")][0]
    for term in ("match", "dim", "inter", "intra", "val rSum"):
        assert term in line, line


def test_runs_keep_their_data(tiny_data, tiny_config, tmp_path, capsys):
    """A checkpoint records its data's fingerprint: resuming on other data is an error, so is
    evaluating on other data by accident; on purpose (--data-root) it is a warning."""
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    captions = other / "dev_caps.txt"
    captions.write_text(captions.read_text().replace("a ", "the ", 1))
    Trainer(tiny_config(tiny_data, tmp_path / "run", epochs=1), progress=False).fit()
    moved = tiny_config(other, tmp_path / "run", epochs=2)
    with pytest.raises(ValueError, match="not the data the checkpoint was trained on"):
        Trainer(moved, resume=True, progress=False)
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    # as if the data changed under the run
    checkpoint["config"]["data_root"] = checkpoint["data"]["root"] = str(other)
    save_atomic(checkpoint, tmp_path / "moved.pt")
    with pytest.raises(ValueError, match="not the data the checkpoint was trained on"):
        main(["--debug", "eval", str(tmp_path / "moved.pt"), "--split", "dev"])
    capsys.readouterr()
    main(["eval", str(tmp_path / "run" / "best.pt"), "--data-root", str(other), "--split", "dev"])
    err = capsys.readouterr().err
    assert "warning: evaluating on" in err and str(tiny_data) in err and str(other) in err


def test_checkpoints_of_the_first_format_still_load(tiny_data, tiny_config, tmp_path, capsys):
    """Format 1 (before method plug-ins): a ``dias`` section on every config, no method state
    and no data fingerprint; it evaluates with a warning that its data cannot be checked."""
    Trainer(tiny_config(tiny_data, tmp_path / "run", epochs=1), progress=False).fit()
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    old = dict(checkpoint, format="fastalign-checkpoint-1")
    del old["method_state"], old["data"]
    old["config"] = dict(old["config"], dias={"dim_weight": 10.0})
    del old["config"]["baseline"], old["config"]["synthetic_preset"], old["config"]["data_seed"]
    save_atomic(old, tmp_path / "old.pt")
    capsys.readouterr()
    main(["eval", str(tmp_path / "old.pt"), "--split", "dev"])
    captured = capsys.readouterr()
    assert "predates data fingerprints" in captured.err
    main(["eval", str(tmp_path / "run" / "best.pt"), "--split", "dev"])
    assert captured.out == capsys.readouterr().out


def test_compare_trains_every_config_on_the_same_data(tiny_data, tiny_config, tmp_path, capsys):
    paths = []
    for name, overrides in [("chan", []), ("vsepp", ["method=vsepp"])]:
        config = tiny_config(tiny_data, tmp_path / name, *overrides, epochs=1)
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "compare"
    argv = ["compare", *map(str, paths), "--seeds", "2", "--output", str(out)]
    main(argv)
    table = capsys.readouterr().out
    assert "rSum" in table and "chan" in table and "vsepp" in table and "±" in table
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["config"], r["seed"]) for r in runs] == [
        ("chan", "0"),
        ("chan", "1"),
        ("vsepp", "0"),
        ("vsepp", "1"),
    ]
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    for row in summary:
        mine = [float(r["rsum"]) for r in runs if r["config"] == row["config"]]
        assert float(row["rsum_mean"]) == pytest.approx(sum(mine) / 2)
        assert float(row["rsum_std"]) == pytest.approx(abs(mine[0] - mine[1]) / 2**0.5)
        assert float(row["peak_mib"]) > 0 and float(row["epoch_seconds"]) > 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--debug", *argv])


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and PR_SET_PDEATHSIG are Linux's")
def test_killing_compare_stops_its_training(tiny_data, tiny_config, tmp_path):
    """SIGTERM to ``fastalign compare`` (not its process group) ends the run it started."""
    config = tiny_config(tiny_data, tmp_path / "run", epochs=500)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    argv = [sys.executable, "-m", "fastalign.cli", "compare", str(path), "--seeds", "1"]
    compare = subprocess.Popen([*argv, "--output", str(tmp_path / "out")])
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (children := _children(compare.pid)) and time.monotonic() < deadline:
            assert compare.poll() is None, "compare ended before it started a run"
            time.sleep(0.2)
        assert children, "compare started no training process within 120 s"
        time.sleep(2)  # the child is past its start-up
        compare.send_signal(signal.SIGTERM)
        compare.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [c for c in children if Path(f"/proc/{c}/stat").exists()]
        alive = [c for c in alive if Path(f"/proc/{c}/stat").read_text().split()[2] != "Z"]
        assert not alive, f"training processes {alive} outlived compare"
    finally:
        compare.kill()
        compare.wait()
        for child in children:  # after a failure: no run left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_a_run_does_not_depend_on_generating_its_data(tmp_path, monkeypatch):
    """The same run, bit for bit, whether it generated its synthetic data or found them, and
    whatever preparing the data drew from the global random generators."""
    import random

    import numpy as np

    from fastalign import training
    from fastalign.data import ensure_synthetic, synthetic_folder

    knobs = dict(
        n_train=32, n_val=8, n_test=8, n_concepts=8, n_regions=6, feature_dim=16, word_dim=16
    )
    generated, draw = [], []

    def ensure(base, preset, seed):  # a tiny dataset; records whether it was generated
        generated.append(not synthetic_folder(base, preset, seed, **knobs).exists())
        if draw:  # as a data library that uses the global generators would
            random.random(), np.random.rand(), torch.rand(1)
        return ensure_synthetic(base, preset=preset, seed=seed, **knobs)

    monkeypatch.setattr(training, "ensure_synthetic", ensure)

    def two_steps(name):
        config = load_config(
            None,
            [
                f"synthetic_root={tmp_path / 'synthetic'}",
                f"output_dir={tmp_path / name}",
                "seed=3",
                "epochs=1",
                "batch_size=80",  # 160 pairs: 2 steps
                "model.feature_dim=16",
                "model.word_dim=16",
                "model.embed_dim=16",
            ],
        )
        trainer = Trainer(config, progress=False)
        trainer.train_epoch()
        assert trainer.step == 2
        return trainer.model.state_dict()

    first = two_steps("generated")
    found = two_steps("found")
    draw.append(True)
    after_draws = two_steps("drawn")
    assert generated == [True, False, False]
    for name, value in first.items():
        assert torch.equal(value, found[name]), name
        assert torch.equal(value, after_draws[name]), name
