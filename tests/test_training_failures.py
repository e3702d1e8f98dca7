"""The trainer when things go wrong: non-finite values in the data, a kill between writes,
a full or read-only disk, and a resume with other settings than the run's."""

import csv
import errno
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from fastalign.checkpoint import load_checkpoint, save_atomic
from fastalign.cli import main
from fastalign.data import EpochSampler, ensure_synthetic, make_loader
from fastalign.training import Trainer

BAD_ROW = 37  # the training image whose features hold a NaN


@pytest.fixture(scope="module")
def nan_data(tiny_data, tmp_path_factory):
    """tiny_data with one NaN in the features of training image BAD_ROW."""
    root = tmp_path_factory.mktemp("nan") / "data"
    shutil.copytree(tiny_data, root)
    images = np.load(root / "train_ims.npy")
    images[BAD_ROW, 2, 5] = np.nan
    np.save(root / "train_ims.npy", images)
    return root


def _batches_with_bad_row(config, epoch: int, n_captions: int) -> int:
    """How many batches of ``epoch`` hold a caption of image BAD_ROW."""
    order = EpochSampler(n_captions, seed=config.seed).order(epoch)
    per_image = config.captions_per_image
    return sum(
        any(j // per_image == BAD_ROW for j in order[k : k + config.batch_size])
        for k in range(0, n_captions, config.batch_size)
    )


def _finite_weights(path) -> bool:
    return all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())


def test_non_finite_batches_are_skipped_or_stop_the_run(nan_data, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    # skip_nonfinite: the batches holding the NaN image are skipped and counted
    config = tiny_config(nan_data, out, "skip_nonfinite=true", epochs=1)
    trainer = Trainer(config, progress=False)
    trainer.fit()
    expected = _batches_with_bad_row(config, 0, len(trainer.data.train_set))
    assert expected > 0
    steps = [row for row in trainer.history if "val_rsum" not in row]
    assert sum(row.get("skipped_batches", 0) for row in steps) == expected
    assert trainer.history[-1]["skipped_batches"] == expected
    err = capsys.readouterr().err
    assert f"skipped {expected} non-finite batch" in err and f"row {BAD_ROW}" in err
    with open(out / "log.csv") as f:
        assert "skipped_batches" in next(csv.reader(f))
    assert _finite_weights(out / "last.pt") and _finite_weights(out / "best.pt")
    before = (out / "last.pt").read_bytes()

    # without it the run stops at the first such batch, naming the step and the data row,
    # and keeps the last good checkpoint (turning the option off on resume is allowed)
    resumed = Trainer(tiny_config(nan_data, out, epochs=2), resume=True, progress=False)
    with pytest.raises(RuntimeError, match=r"epoch 2, step \d+: non-finite") as failure:
        resumed.fit()
    message = str(failure.value)
    assert f"row {BAD_ROW} of " in message and "train_ims.npy" in message
    assert "captions [" in message and "skip_nonfinite" in message
    assert str(out / "last.pt") in message
    assert (out / "last.pt").read_bytes() == before
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_a_finished_run_repairs_its_log_on_resume(tiny_data, tiny_config, tmp_path, capsys):
    """A kill between the last checkpoint and the log write left the log an epoch short."""
    config = tiny_config(tiny_data, tmp_path / "run", epochs=2)
    Trainer(config, progress=False).fit()
    log = tmp_path / "run" / "log.csv"
    full = log.read_text()
    with open(log) as f:
        rows = list(csv.DictReader(f))
    short = [row for row in rows if row["epoch"] != "2"]
    with open(log, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(short)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    capsys.readouterr()
    main(["train", "--no-progress", "--config", str(path), "--resume"])
    captured = capsys.readouterr()
    assert "the run is finished (2 of 2 epochs)" in captured.err
    assert str(tmp_path / "run" / "best.pt") in captured.err + captured.out
    assert "rSum" in captured.out  # the best validation results are shown again
    assert log.read_text() == full


def test_a_full_disk_names_the_file_and_leaves_no_partial(
    tiny_data, tiny_config, tmp_path, monkeypatch
):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        """Writes a little, then the disk is full."""
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as file:
                file.write(b"PK")
        else:
            f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "ckpt" / "last.pt"
    with pytest.raises(OSError, match="no space left on device") as failure:
        save_atomic({"x": 1}, target)
    assert str(target) in str(failure.value) and failure.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []
    # a run fails the same way at its first save, and leaves nothing half-written
    config = tiny_config(tiny_data, tmp_path / "run", epochs=1)
    with pytest.raises(OSError, match="no space left on device"):
        Trainer(config, progress=False).fit()
    assert not list((tmp_path / "run").glob("*.partial"))
    monkeypatch.setattr(torch, "save", real_save)
    # partials left by a kill are removed when a run starts in that folder
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("last.pt.partial", "best.pt.partial", "log.csv.partial"):
        (stale / name).write_bytes(b"half")
    Trainer(tiny_config(tiny_data, stale, epochs=1), progress=False)
    assert not list(stale.glob("*.partial"))


def test_a_read_only_synthetic_root_is_named(tmp_path, monkeypatch):
    base = tmp_path / "read_only"
    base.mkdir()
    base.chmod(0o555)
    try:
        if os.access(base, os.W_OK):  # root: chmod does not stop it, so the OS is told to
            import tempfile

            def refused(dir, prefix, **kwargs):
                name = os.path.join(dir, prefix + "abcd")
                raise PermissionError(errno.EACCES, "Permission denied", name)

            monkeypatch.setattr(tempfile, "mkdtemp", refused)
        with pytest.raises(PermissionError, match="permission denied") as failure:
            ensure_synthetic(base, n_train=8, n_val=4, n_test=4)
        message = str(failure.value)
        assert f"{base}/easy-seed0-8x4x4" in message and "tmp-" not in message
    finally:
        base.chmod(0o755)


def test_resume_refuses_other_settings_and_names_them(tiny_data, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny_config(tiny_data, out, epochs=1), progress=False).fit()
    other = tiny_config(
        tiny_data, out, "batch_size=32", "lr=0.001", "model.direction=both", epochs=2
    )
    with pytest.raises(ValueError) as failure:
        Trainer(other, resume=True, progress=False)
    message = str(failure.value)
    assert f"resume: batch_size is 32 in this config but 16 in the run at {out}" in message
    assert "lr is 0.001 in this config but 0.002" in message
    assert "model.direction is 'both' in this config but 't2i'" in message
    assert "epochs" not in message.split(";")[0] and "ModelConfig(" not in message
    other = tiny_config(tiny_data, out, "method=dias", epochs=1)
    with pytest.raises(ValueError, match="method is 'dias' in this config but 'baseline'"):
        Trainer(other, resume=True, progress=False)
    # the settings that may change mid-run are accepted, and said
    capsys.readouterr()
    allowed = tiny_config(tiny_data, out, "val_every=2", "name=renamed", epochs=3)
    trainer = Trainer(allowed, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "resume: epochs is 3 (was 1)" in err and "val_every is 2 (was 1)" in err
    assert trainer.epoch == 1 and math.isfinite(trainer.best_rsum)


def test_nan_gradients_behind_unchecked_operators(nan_data, tiny_config, tmp_path, monkeypatch):
    """On CUDA the operators do not check their inputs (a sync each): the NaN feature reaches
    the loss and the gradients, which are checked before the weights change."""
    from fastalign.ops import _checks

    monkeypatch.setattr(_checks, "finite_check_applies", lambda device: False)
    config = tiny_config(
        nan_data, tmp_path / "skip", "skip_nonfinite=true", "model.backend=reference", epochs=1
    )
    trainer = Trainer(config, progress=False)
    trainer.fit()
    expected = _batches_with_bad_row(config, 0, len(trainer.data.train_set))
    assert trainer.history[-1]["skipped_batches"] == expected
    assert _finite_weights(tmp_path / "skip" / "last.pt")
    config = tiny_config(nan_data, tmp_path / "stop", "model.backend=reference", epochs=1)
    trainer = Trainer(config, progress=False)
    with pytest.raises(RuntimeError, match=r"epoch 1, step 1: non-finite .*gradient norm \(nan\)"):
        trainer.fit()
    assert not (tmp_path / "stop" / "last.pt").exists()


def test_a_finite_loss_with_nan_gradients_changes_no_weight(tiny_data, tiny_config, tmp_path):
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "run", epochs=1), progress=False)
    batch = next(iter(make_loader(trainer.data.train_set, 16, shuffle=True, seed=0)))
    weight = next(trainer.model.parameters())
    weight.register_hook(lambda grad: grad * math.nan)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="step 1: non-finite gradient norm .nan. on") as failure:
        trainer.train_step(batch)
    assert "every feature of the batch is finite" in str(failure.value)
    trainer.config.skip_nonfinite = True
    values = trainer.train_step(batch)
    assert values["skipped_batches"] == 1 and math.isfinite(values["loss"])
    assert trainer.step == 1 and trainer.history[-1]["skipped_batches"] == 1
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key
