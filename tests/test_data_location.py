"""A data location the user named (--data-dir, PCFAST_CIFAR10_DIR) never falls back to synthetic
data; a synthetic run says so in its config, metrics and curves; the seed preset on a CPU says up
front how long an epoch will take."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pcfast.cli import main
from pcfast.data import cifar10 as c10
from pcfast.train import loop
from pcfast.train.checkpoint import read_metrics
from pcfast.train.config import TrainConfig
from pcfast.train.plots import curves_figure
from pcfast.train.presets import preset_config

TINY_ARGS = ["train", "--model", "mlp", "--model-kwargs", '{"hidden": [8]}', "--rule", "bp",
             "--epochs", "1", "--batch-size", "16", "--train-subset", "32", "--test-subset", "16",
             "--device", "cpu", "--no-progress"]


def _tiny_copy(root: Path, n: int = 4) -> Path:
    """``root/cifar-10-batches-py`` in the official format, ``n`` images per file."""
    rng = np.random.default_rng(0)
    folder = root / c10.FOLDER
    folder.mkdir(parents=True)
    for name in c10.TRAIN_FILES + c10.TEST_FILES:
        entry = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    return root


@pytest.fixture(autouse=True)
def _no_other_copy(monkeypatch, tmp_path):
    # No copy in the environment or in ~/.cache/pcfast, and never a real download.
    monkeypatch.delenv("PCFAST_CIFAR10_DIR", raising=False)
    monkeypatch.delenv("PCFAST_ALLOW_UNOFFICIAL_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("no network in the tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)


def _train(out: Path, *extra: str) -> int:
    return main([*TINY_ARGS, "--out-dir", str(out), *extra])


def test_a_missing_data_dir_is_an_error_and_nothing_is_written(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    out = tmp_path / "run"
    assert _train(out, "--data-dir", str(missing)) == 2
    captured = capsys.readouterr()
    assert f"--data-dir, {missing}" in captured.err and "does not exist" in captured.err
    assert "synthetic" not in captured.out  # no fallback line, no synthetic run
    assert not out.exists()


def test_a_named_folder_without_a_copy_is_an_error_even_with_download(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(tmp_path / "run", "--data-dir", str(empty), "--download") == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no cifar-10-batches-py folder" in err and "download" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("allow", [True, False])
def test_a_truncated_file_is_named_and_nothing_is_written(tmp_path, capsys, allow):
    root = _tiny_copy(tmp_path / "data")
    batch = root / c10.FOLDER / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    out = tmp_path / "run"
    flags = ["--allow-unofficial-data"] if allow else []
    assert _train(out, "--data-dir", str(root), *flags) == 2
    err = capsys.readouterr().err
    # Reported as truncated (not as an md5 mismatch), whether or not unofficial copies are allowed.
    assert str(batch) in err and "truncated or corrupt" in err
    assert not out.exists()


def test_an_incomplete_copy_names_the_missing_files(tmp_path, capsys):
    root = _tiny_copy(tmp_path / "data")
    (root / c10.FOLDER / "test_batch").unlink()
    (root / c10.FOLDER / "data_batch_4").unlink()
    assert _train(tmp_path / "run", "--data-dir", str(root), "--allow-unofficial-data") == 2
    err = capsys.readouterr().err
    assert "data_batch_4, test_batch are missing" in err and str(root) in err
    assert not (tmp_path / "run").exists()


def test_the_flag_wins_over_the_environment(tmp_path, capsys, monkeypatch):
    good = _tiny_copy(tmp_path / "good")
    missing = tmp_path / "missing"
    monkeypatch.setenv("PCFAST_CIFAR10_DIR", str(good))
    assert _train(tmp_path / "a", "--data-dir", str(missing), "--allow-unofficial-data") == 2
    assert f"--data-dir, {missing}" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    # The reverse: a valid copy in the flag, a broken one in the environment.
    monkeypatch.setenv("PCFAST_CIFAR10_DIR", str(missing))
    assert _train(tmp_path / "b", "--data-dir", str(good), "--allow-unofficial-data") == 0
    source = f"cifar10:{good}"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"] == source
    assert [r["data"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [source]


def test_a_missing_environment_location_is_an_error(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "env-missing"
    monkeypatch.setenv("PCFAST_CIFAR10_DIR", str(missing))
    assert _train(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"PCFAST_CIFAR10_DIR, {missing}" in err and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_the_environment_copy_is_read_when_no_flag_is_given(tmp_path, monkeypatch):
    good = _tiny_copy(tmp_path / "good")
    monkeypatch.setenv("PCFAST_CIFAR10_DIR", str(good))
    assert _train(tmp_path / "run", "--allow-unofficial-data") == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == f"cifar10:{good}" and config["data_dir"] is None


@pytest.mark.parametrize("extra", [["--synthetic"], []], ids=["--synthetic", "fallback"])
def test_a_synthetic_run_says_synthetic_everywhere(tmp_path, capsys, monkeypatch, extra):
    titles = []
    real_plot = loop.plot_curves

    def plot(rows, path, title=""):
        titles.append(title)
        return real_plot(rows, path, title=title)

    monkeypatch.setattr(loop, "plot_curves", plot)
    out = tmp_path / "run"
    assert _train(out, "--epochs", "2", *extra) == 0
    stdout = capsys.readouterr().out
    assert ("No CIFAR-10 copy found" in stdout) == (not extra)  # the fallback says so in one line
    assert json.loads((out / "config.json").read_text())["data"] == "synthetic"
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["data"] == "synthetic" for r in rows)
    assert len(titles) == 2 and all("synthetic" in t for t in titles)


def test_the_curves_figure_carries_the_title():
    fig = curves_figure([{"epoch": 1, "train_loss": 1.0, "test_acc": 0.5, "data": "synthetic"}],
                        title="mlp / bp / synthetic data")
    assert fig.get_suptitle() == "mlp / bp / synthetic data"


def test_a_cifar10_run_title_does_not_say_synthetic(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(loop, "plot_curves", lambda rows, path, title="": titles.append(title))
    good = _tiny_copy(tmp_path / "good")
    assert _train(tmp_path / "run", "--data-dir", str(good), "--allow-unofficial-data") == 0
    assert titles == ["mlp / bp / CIFAR-10"]


def test_the_cpu_estimate_scales_with_the_config():
    per_step = loop.CPU_PC_STEP_SECONDS_PER_256["resdualnet"]
    seed = preset_config("seed-pc")
    batches = -(-50_000 // seed.batch_size)
    assert loop.estimate_cpu_epoch_seconds(seed, batches) == pytest.approx(
        per_step * seed.T * batches)
    half = seed.replace(T=seed.T // 2, batch_size=seed.batch_size // 2)
    assert loop.estimate_cpu_epoch_seconds(half, batches) == pytest.approx(
        per_step * seed.T * batches / 4)
    assert loop.estimate_cpu_epoch_seconds(preset_config("seed-bp"), batches) is None
    assert loop.estimate_cpu_epoch_seconds(TrainConfig(model="mlp", rule="pc"), batches) is None


def test_the_seed_preset_note_names_the_estimate_and_the_demo_preset():
    seed = preset_config("seed-pc")
    batches = -(-50_000 // seed.batch_size)
    note = loop.cpu_time_note(seed, batches)
    hours = loop.estimate_cpu_epoch_seconds(seed, batches) / 3600
    assert note is not None and "\n" not in note
    assert f"about {hours:.1f} h per epoch" in note and "estimate" in note
    assert "--preset demo" in note
    demo = preset_config("demo")
    assert loop.cpu_time_note(demo, -(-demo.train_subset // demo.batch_size)) is None


def test_the_seed_preset_on_a_cpu_prints_the_note_before_training(tmp_path, capsys, monkeypatch):
    printed_before_training = []

    def stop(self, total_epochs):  # do not train seed-pc: record what was said, then stop
        printed_before_training.append(capsys.readouterr().out)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop._Run, "train_epoch", stop)
    code = main(["train", "--preset", "seed-pc", "--synthetic", "--device", "cpu",
                 "--no-progress", "--out-dir", str(tmp_path / "run")])
    assert code == 130 and len(printed_before_training) == 1
    notes = [line for line in printed_before_training[0].splitlines() if "--preset demo" in line]
    assert len(notes) == 1 and "per epoch" in notes[0]


def test_the_unofficial_data_variable_is_honoured_by_train(tmp_path, capsys, monkeypatch):
    good = _tiny_copy(tmp_path / "good")  # valid format, other md5 sums than the official copy
    assert _train(tmp_path / "a", "--data-dir", str(good)) == 2
    assert "md5" in capsys.readouterr().err
    monkeypatch.setenv("PCFAST_ALLOW_UNOFFICIAL_DATA", "1")
    assert _train(tmp_path / "b", "--data-dir", str(good)) == 0
