"""The command line as a user meets it: every user error is one ``error:`` line naming the
key, file or path (exit code 2), the traceback only with --debug, and nothing on disk lost
or left behind."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers.cli import one_error_line, run_main

from fastalign.cli import main
from fastalign.data import generate_synthetic

REPO = Path(__file__).resolve().parent.parent


def _tiny_overrides(root: Path, out: Path) -> list[str]:
    return [
        f"data_root={root}",
        f"word_vectors={root / 'glove_synthetic.txt'}",
        f"output_dir={out}",
        "epochs=1",
        "batch_size=16",
        "model.word_dim=16",
        "model.embed_dim=32",
    ]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A finished one-epoch run on the tiny data: its output folder."""
    out = tmp_path_factory.mktemp("cli") / "run"
    main(["train", "--no-progress", *_tiny_overrides(tiny_data, out)])
    return out


@pytest.mark.parametrize(
    "override, key",
    [
        ("epochs=abc", "epochs"),
        ("lr=abc", "lr"),
        ("seed=abc", "seed"),
        ("model.embed_dim=abc", "model.embed_dim"),
        ("grad_clip=abc", "grad_clip"),
        ("lr_decay_epochs=3", "lr_decay_epochs"),
        ("epochs=1.5", "epochs"),
        ("epochs=-1", "epochs"),
        ("val_every=0", "val_every"),
        ("lr=0", "lr"),
        ("margin=-0.5", "margin"),
        ("device=gpu", "device"),
        ("loss=hinj", "loss"),
        ("model.direction=sideways", "model.direction"),
        ("dias.dim_weight=abc", "dias.dim_weight"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_config_values_name_their_key(capsys, tiny_data, tmp_path, override, key):
    out = tmp_path / "run"
    argv = ["train", "--config", "dias_synthetic", *_tiny_overrides(tiny_data, out), override]
    code, lines = run_main(capsys, *argv)
    assert code == 2
    one_error_line(lines, "train", key)
    assert not out.exists()  # nothing written before the config is known to be good


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_device_without_cuda_says_so(capsys, tiny_data, tmp_path):
    out = tmp_path / "run"
    code, lines = run_main(capsys, "train", *_tiny_overrides(tiny_data, out), "device=cuda")
    assert code == 2
    one_error_line(lines, "train", "device=cuda", "no CUDA device")
    assert not out.exists()


def test_yaml_syntax_error_names_the_file(capsys, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("epochs: 3\nmodel: [embed_dim: 4\n")
    code, lines = run_main(capsys, "train", "--config", str(config))
    assert code == 2
    one_error_line(lines, "train", str(config), "not valid YAML")


def test_resume_without_a_run_suggests_starting_it(capsys, tiny_data, tmp_path):
    out = tmp_path / "run"
    code, lines = run_main(capsys, "train", "--resume", *_tiny_overrides(tiny_data, out))
    assert code == 2
    one_error_line(lines, "train", str(out / "last.pt"), "without --resume")


def test_feature_size_that_is_not_the_models_names_the_file(capsys, tiny_data, tmp_path):
    out = tmp_path / "run"
    argv = ["train", *_tiny_overrides(tiny_data, out), "model.feature_dim=1024"]
    code, lines = run_main(capsys, *argv)
    assert code == 2
    one_error_line(lines, "train", "train_ims.npy", "size 2048", "expects 1024")


def test_eval_of_a_folder_points_at_its_checkpoints(capsys, trained):
    code, lines = run_main(capsys, "eval", str(trained))
    assert code == 2
    one_error_line(lines, "eval", str(trained), "is a folder", "best.pt")


def test_eval_of_a_checkpoint_without_vocabulary(capsys, trained, tmp_path):
    checkpoint = torch.load(trained / "best.pt", weights_only=False)
    del checkpoint["vocab"]
    damaged = tmp_path / "damaged.pt"
    torch.save(checkpoint, damaged)
    code, lines = run_main(capsys, "eval", str(damaged))
    assert code == 2
    one_error_line(lines, "eval", str(damaged), "vocab")


def test_coco1k_on_a_split_that_is_not_coco_test(capsys, trained):
    before = _digest(trained / "best.pt")
    code, lines = run_main(capsys, "eval", str(trained / "best.pt"), "--protocol", "coco1k")
    assert code == 2
    one_error_line(lines, "eval", "coco1k", "5000", "has 12")
    assert _digest(trained / "best.pt") == before


def test_eval_on_data_of_another_feature_size(capsys, trained, tmp_path):
    other = generate_synthetic(
        tmp_path / "other", seed=3, n_train=8, n_val=4, n_test=4, n_regions=12,
        word_dim=16, feature_dim=64,
    )  # fmt: skip
    argv = ["eval", str(trained / "best.pt"), "--data-root", str(other)]
    code, lines = run_main(capsys, *argv)
    assert code == 2
    one_error_line(lines, "eval", str(other / "test_ims.npy"), "size 64", "expects 2048")


def test_checkpoint_records_absolute_data_and_evaluates_from_elsewhere(
    capsys, tiny_data, tmp_path, monkeypatch
):
    # Trained with a data root relative to the folder it ran in ...
    monkeypatch.chdir(tiny_data.parent.parent)
    out = tmp_path / "run"
    overrides = _tiny_overrides(Path(tiny_data.parent.name, tiny_data.name), out)
    main(["train", "--no-progress", *overrides])
    recorded = torch.load(out / "best.pt", weights_only=False)["data"]["root"]
    assert Path(recorded) == tiny_data.resolve()
    # ... and evaluated from another one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    main(["eval", str(out / "best.pt")])
    assert "rSum" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []  # no data generated here


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "fastalign.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_user_error_in_a_subprocess_is_one_line_and_debug_shows_the_traceback(tmp_path):
    plain = _cli("train", "epochs=abc", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert plain.returncode == 2
    one_error_line(plain.stderr.splitlines(), "train", "epochs")
    debug = _cli("--debug", "train", "epochs=abc", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "epochs must be an integer" in debug.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no data


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_examples_are_whole_shell_lines(capsys):
    text = _help(capsys)
    assert "testall \\\n" in text and "testall       --" not in text
    bench = _help(capsys, "bench")
    assert "region_word" in bench and "eval" in bench
    assert "TrainConfig" in _help(capsys, "train")


def test_good_values_load_and_only_int_becomes_float():
    from fastalign.config import load_config

    config = load_config(None, ["lr=1", "max_val_images=null", "lr_decay_epochs=[2, 4]"])
    assert isinstance(config.lr, float) and config.lr == 1.0
    assert config.max_val_images is None and config.lr_decay_epochs == [2, 4]
    assert load_config(None, ["margin=0"]).margin == 0.0


def test_eval_progress_bars_and_no_progress(capsys, monkeypatch, trained):
    import fastalign.progress

    monkeypatch.setattr(fastalign.progress, "_interactive", lambda: True)  # as on a terminal
    main(["eval", str(trained / "best.pt")])
    shown = capsys.readouterr()
    assert "rSum" in shown.out and "%" in shown.err
    main(["eval", str(trained / "best.pt"), "--no-progress"])
    quiet = capsys.readouterr()
    assert "rSum" in quiet.out and quiet.err == ""
