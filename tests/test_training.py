"""The training command: metrics, plots, checkpoints, resume after a kill, divergence, real data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pcfast.cli import main
from pcfast.train import TrainConfig, TrainingDiverged, run_training
from pcfast.train.checkpoint import load_checkpoint, read_metrics
from pcfast.train.loop import TIMING_FIELDS
from pcfast.train.rules import RULES, BPRule

TINY = dict(model="mlp", model_kwargs={"hidden": [32], "batchnorm": True}, synthetic=True,
            train_subset=512, test_subset=256, batch_size=64, optimizer="adam", lr=3e-3,
            lr_schedule="constant", progress=False, augment="flip-crop")


def _cfg(tmp_path, **kw):
    return TrainConfig.from_dict({**TINY, "out_dir": str(tmp_path / "run"), **kw})


def test_a_run_writes_metrics_curves_config_and_checkpoint(tmp_path):
    rows = run_training(_cfg(tmp_path, rule="bp", epochs=2), log=lambda s: None)
    out = tmp_path / "run"
    assert [r["epoch"] for r in rows] == [1, 2]
    assert read_metrics(out / "metrics.jsonl") == json.loads(json.dumps(rows))
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert len(rows[-1]["test_acc_per_class"]) == 10
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["rule"] == "bp"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_the_synthetic_set_is_learnable(tmp_path):
    rows = run_training(_cfg(tmp_path, rule="bp", epochs=3), log=lambda s: None)
    assert rows[-1]["test_acc"] > 0.5  # chance is 0.1


def test_pc_rule_through_the_trainer_reports_energy(tmp_path):
    rows = run_training(_cfg(tmp_path, rule="pc", T=3, rate=1.0, epochs=2), log=lambda s: None)
    assert all(r["energy"] > 0 for r in rows)
    assert rows[-1]["test_acc"] > 0.3


def test_ipc_trains_from_the_command_line_and_clips_every_weight_step(tmp_path, monkeypatch):
    """``pcfast train --no-fpa --ipc``: T optimizer steps per batch, each clipped, and it learns."""
    clips = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, c: clips.append(c) or real(params, c))
    out = tmp_path / "ipc"
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"hidden": [32]}', "--synthetic",
                 "--train-subset", "512", "--test-subset", "256", "--batch-size", "64",
                 "--rule", "pc", "--no-fpa", "--ipc", "--T", "3", "--rate", "0.5",
                 "--lr", "1e-3", "--grad-clip", "5", "--lr-schedule", "constant",
                 "--epochs", "2", "--no-progress", "--out-dir", str(out)]) == 0
    assert len(clips) == 2 * 8 * 3  # 2 epochs x 8 batches x T weight steps
    rows = read_metrics(out / "metrics.jsonl")
    assert json.loads((out / "config.json").read_text())["ipc"] is True
    assert rows[-1]["test_acc"] > 0.3  # chance is 0.1


def test_epc_trains_from_the_command_line(tmp_path):
    out = tmp_path / "epc"
    assert main(["train", "--model", "mlp", "--model-kwargs", '{"hidden": [32]}', "--synthetic",
                 "--train-subset", "512", "--test-subset", "256", "--batch-size", "64",
                 "--rule", "pc", "--no-fpa", "--epc", "--T", "3", "--rate", "0.3",
                 "--precision", '{"fc0": 2.0}',
                 "--lr", "3e-3", "--lr-schedule", "constant", "--epochs", "2", "--no-progress",
                 "--out-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["epc"] is True and config["precision"] == {"fc0": 2.0}
    assert read_metrics(out / "metrics.jsonl")[-1]["test_acc"] > 0.3  # chance is 0.1


@pytest.mark.parametrize("rule", ["bp", "pc"])
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, rule):
    extra = dict(rule=rule, T=2, rate=0.5)
    straight = run_training(_cfg(tmp_path / "a", epochs=3, **extra), log=lambda s: None)
    run_training(_cfg(tmp_path / "b", epochs=1, **extra), log=lambda s: None)
    resumed = run_training(_cfg(tmp_path / "b", epochs=3, resume=True, **extra), log=lambda s: None)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    # Bitwise: the data order, augmentation and weights of a resumed run are the straight
    # run's (CPU kernels are deterministic), so a resume cannot move a run's result.
    for a, b in zip(straight, resumed):
        assert a["test_loss"] == b["test_loss"] and a["train_loss"] == b["train_loss"]
    sa = load_checkpoint(tmp_path / "a" / "run" / "checkpoint.pt")["model"]
    sb = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["model"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_resume_with_another_cpu_thread_count_says_so(tmp_path):
    """The thread count changes a CPU run's bits (how kernels split their sums): the metrics
    record it, and a resume under another count says the run is no longer bit-exact."""
    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        torch.set_num_threads(1)
        rows = run_training(_cfg(tmp_path, rule="bp", epochs=1), log=lambda s: None)
        assert rows[0]["cpu_threads"] == 1
        # the share of its thread's time the epoch got: a CPU-bound run uses most of it
        assert 0.2 < rows[0]["cpu_busy"] < 1.5
        torch.set_num_threads(2)
        rows = run_training(_cfg(tmp_path, rule="bp", epochs=2, resume=True), log=lines.append)
    finally:
        torch.set_num_threads(before)
    assert [r["cpu_threads"] for r in rows] == [1, 2]
    assert any("trained with 1 CPU threads, this process has 2" in s
               and "OMP_NUM_THREADS=1" in s for s in lines), lines


def test_resume_drops_metrics_written_after_the_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, rule="bp", epochs=1)
    run_training(cfg, log=lambda s: None)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:  # as if killed after the metrics line but before the checkpoint
        f.write(json.dumps({"epoch": 2, "test_acc": 0.0}) + "\n" + '{"epoch": 3, "te')
    rows = run_training(cfg.replace(epochs=2, resume=True), log=lambda s: None)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["test_acc"] > 0


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run_training(_cfg(tmp_path, rule="bp", epochs=1), log=lambda s: None)
    with pytest.raises(ValueError, match="trained with model_kwargs"):
        run_training(_cfg(tmp_path, rule="bp", epochs=2, resume=True,
                          model_kwargs={"hidden": [16]}), log=lambda s: None)


class _NaNAfterFirstEpoch(BPRule):
    calls = 0

    def train_step(self, x, y, optimizer):
        out = super().train_step(x, y, optimizer)
        type(self).calls += 1
        if type(self).calls > 8:  # 512 / 64 = 8 batches per epoch: epoch 2 diverges
            out["energy"] = torch.tensor(float("nan"))
        return out


def test_a_nan_energy_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(RULES, "nan-test", _NaNAfterFirstEpoch)
    _NaNAfterFirstEpoch.calls = 0
    with pytest.raises(TrainingDiverged, match=r"epoch 2.*energy=nan.*epoch 1\) is intact"):
        run_training(_cfg(tmp_path, rule="nan-test", epochs=3), log=lambda s: None)
    out = tmp_path / "run"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_the_cli_reports_divergence_in_one_line_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(RULES, "nan-test", _NaNAfterFirstEpoch)
    _NaNAfterFirstEpoch.calls = 0
    code = main(["train", "--model", "mlp", "--model-kwargs", '{"hidden": [8]}', "--synthetic",
                 "--train-subset", "512", "--test-subset", "64", "--batch-size", "64",
                 "--rule", "nan-test", "--epochs", "2", "--no-progress",
                 "--out-dir", str(tmp_path / "cli")])
    assert code == 3
    assert "training diverged" in capsys.readouterr().err


def test_the_same_run_in_two_fresh_processes_is_bitwise_the_same(tmp_path):
    """Same seed, same code: a second process reproduces a run exactly (init, data order,
    augmentation, every weight), so two runs of one command differ only if the code did."""
    def run(out, seed=3):
        subprocess.run([sys.executable, "-m", "pcfast", "train", "--model", "cnn",
                        "--model-kwargs", '{"spec": [8, "p", 16, "p"]}', "--synthetic", "--train-subset",
                        "256", "--test-subset", "128", "--batch-size", "64", "--augment",
                        "flip-crop", "--preprocess", "channel", "--rule", "pc", "--T", "3",
                        "--epochs", "2", "--seed", str(seed), "--no-progress", "--out-dir", str(out)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = read_metrics(out / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
                for r in rows], load_checkpoint(out / "checkpoint.pt")["model"]

    (rows_a, model_a), (rows_b, model_b) = run(tmp_path / "a"), run(tmp_path / "b")
    assert len(rows_a) == 2 and rows_a == rows_b
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    rows_c, model_c = run(tmp_path / "c", seed=4)  # the comparison tells two seeds apart
    assert rows_c != rows_a and not all(torch.equal(model_a[k], model_c[k]) for k in model_a)


def test_a_killed_run_resumes_and_continues_its_metrics(tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "pcfast", "train", "--model", "mlp", "--model-kwargs",
            '{"hidden": [512, 512]}', "--synthetic", "--train-subset", "4096", "--test-subset",
            "256", "--batch-size", "32", "--rule", "bp", "--no-progress", "--out-dir", str(out)]
    proc = subprocess.Popen(args + ["--epochs", "50"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = read_metrics(out / "metrics.jsonl")
    assert 1 <= len(before) < 50, "the run should have been killed mid-way"
    done = load_checkpoint(out / "checkpoint.pt")["epoch"] + 1  # epochs fully checkpointed
    subprocess.run(args + ["--epochs", str(done + 1), "--resume"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in after] == list(range(1, done + 2))
    assert after[:done] == before[:done]


def test_no_data_falls_back_to_synthetic_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PCFAST_CIFAR10_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig.from_dict({**TINY, "synthetic": False, "rule": "bp", "epochs": 1,
                                 "out_dir": str(tmp_path / "r")})  # no location named
    run_training(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if "synthetic" in line]
    assert len(lines) == 2 and lines[0].startswith("No CIFAR-10 copy found")


def test_presets_and_flags_combine(tmp_path):
    from pcfast.cli import build_parser, config_from_args

    ns = build_parser().parse_args(["train", "--preset", "seed-pc", "--T", "7", "--strict",
                                    "--milestones", "3", "5", "--rule-option", "a=0.5"])
    cfg = config_from_args(ns)
    assert (cfg.batch_size, cfg.rate, cfg.schedule, cfg.T, cfg.fpa) == (256, 0.5, "jacobi", 7, False)
    assert cfg.milestones == (3, 5) and cfg.rule_options == {"a": 0.5} and cfg.preset == "seed-pc"
    bp = config_from_args(build_parser().parse_args(["train", "--preset", "seed-bp"]))
    assert (bp.rule, bp.batch_size, bp.lr, bp.milestones, bp.epochs) == ("bp", 128, 0.01, (10, 20), 25)


def test_seed_preset_learning_rate_schedule():
    from pcfast.train.presets import preset_config
    from pcfast.train.schedule import LRSchedule

    cfg = preset_config("seed-pc")
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = LRSchedule(opt, cfg)
    lrs = []
    for epoch in range(cfg.epochs):
        sched.on_epoch_start(epoch)
        lrs.append(sched.current_lr())
    assert lrs[:10] == [0.01] * 10
    assert lrs[10:20] == pytest.approx([0.001] * 10)
    assert lrs[20:] == pytest.approx([1e-4] * 5)


def test_real_cifar10_pc_run_beats_chance(tmp_path, cifar10_dir):
    """The quick start's ``demo`` preset on real images: Res-DualNet trained by PC (sequential
    schedule, T=2, rate 0.5) on 2,048 training images for 2 epochs, tested on 1,000.

    Measured on the CPU: 0.324 test accuracy (BP on the same set-up: 0.270; chance 0.10); the
    bar is 2.2x chance.
    """
    from pcfast.train.presets import preset_config

    cfg = preset_config("demo", data_dir=str(cifar10_dir), allow_unofficial_data=True,
                        progress=False, out_dir=str(tmp_path / "real"))
    rows = run_training(cfg, log=lambda s: None)
    assert rows[-1]["test_acc"] > 0.22


def test_a_corrupt_checkpoint_is_reported_in_one_line(tmp_path, capsys):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code = main(["train", "--model", "mlp", "--synthetic", "--epochs", "1", "--no-progress",
                 "--resume", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint" in err and "cannot be read" in err
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_the_main_job_tries_a_download_then_says_in_one_line_it_uses_synthetic_data(
        tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    from pcfast.train.presets import preset_config

    class Offline:
        def __init__(self, root, train, download):
            print("Downloading https://... (torchvision's own line)")
            raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.delenv("PCFAST_CIFAR10_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = preset_config("demo", out_dir=str(tmp_path / "r"), epochs=1, train_subset=64,
                        test_subset=64, progress=False)
    assert cfg.download
    run_training(cfg.replace(model="mlp", model_kwargs={"hidden": [8]}))
    out = capsys.readouterr().out
    assert "Downloading" not in out
    assert [line for line in out.splitlines() if "CIFAR-10" in line] == [
        "No CIFAR-10 copy found and none could be downloaded (--data-dir, PCFAST_CIFAR10_DIR "
        "or --download): training on the built-in synthetic dataset."]
