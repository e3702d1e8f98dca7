"""The trainer when things go wrong: non-finite values in the data, a kill between writes,
a full or read-only disk, and a resume with other settings than the run's."""

import csv
import errno
import math
import os

import pytest
import torch
import yaml

from fastalign.checkpoint import save_atomic
from fastalign.cli import main
from fastalign.data import ensure_synthetic
from fastalign.training import Trainer


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
