"""The model-zoo experiments end to end (``--quick``), their resume, presets and reporting."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pcfast.experiments import load_all
from pcfast.experiments.report import final_metrics, markdown_table, pct
from pcfast.train import TrainConfig, preset_config
from pcfast.train.rules import build_optimizer
from pcfast.train.schedule import LRSchedule


def _args(run_dir: Path, **kw) -> SimpleNamespace:
    values = dict(run_dir=str(run_dir), epochs=None, iterations=None, device="cpu",
                  data_dir=None, seed=0, quick=True,
                  allow_unofficial_data=True)
    values.update(kw)
    return SimpleNamespace(**values)


@pytest.fixture(autouse=True)
def _synthetic_data(monkeypatch, tmp_path):
    # CI speed: the built-in synthetic set instead of reading CIFAR-10 once per run.
    monkeypatch.delenv("PCFAST_CIFAR10_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RUNS = {
    "resnet-depth": [f"{k}{d}" for k in ("plain", "resnet") for d in (20, 32, 44, 56)],
    "preprocessing": ["pixel-mean", "pixel-mean-div255", "zca"],
    "model-zoo": ["mlp", "cnn", "rescnn", "mixer-p4-c128", "mixer-p2-c128", "mixer-p4-c192",
                  "mixer-p2-c192"],
    "resnet18-34": ["resnet18", "resnet34"],
    "pc-vs-bp": [f"{net}-{rule}-s{seed}" for net in ("cnn", "rescnn")
                 for rule in ("bp", "fpa", "strict") for seed in (0, 1)],
    "deep-pc": [f"{net}-{rule}" for net in ("resdualnet", "resnet18")
                for rule in ("bp", "fpa", "strict", "ipc", "epc", "precision")],
    "seed-gap": ["bp", "pc"],
}
PLOTS = {"resnet-depth": "degradation.png", "preprocessing": "curves.png",
         "model-zoo": "curves.png", "resnet18-34": "curves.png", "pc-vs-bp": "curves.png",
         "deep-pc": "curves.png", "seed-gap": "curves.png"}


@pytest.mark.parametrize("name", list(RUNS))
def test_quick_experiment_end_to_end(name, tmp_path):
    experiments = load_all()
    assert name in experiments
    results = experiments[name].fn(_args(tmp_path))
    for run in RUNS[name]:
        rows = _rows(tmp_path / run / "metrics.jsonl")
        assert len(rows) == 1 and rows[0]["step"] == 2  # --quick: two optimizer steps
        assert (tmp_path / run / "checkpoint.pt").stat().st_size > 0
    assert (tmp_path / PLOTS[name]).read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(table) >= 2 + len(RUNS[name])
    for run in RUNS[name]:
        assert f"| {run} |" in summary or f"-{run[-2:]} |" in summary
    if name == "resnet-depth":
        for paper in ("8.75", "7.51", "7.17", "6.97"):
            assert f"| {paper} |" in summary
        assert set(results) == {"plain", "resnet"}
    if name == "pc-vs-bp":  # T = 3 x depth: cnn has 10 nodes in a chain, rescnn depth 20
        assert "| cnn-fpa-s0 | PC FPA jacobi T=30 rate 0.5 |" in summary
        assert "| rescnn-fpa-s1 | PC FPA jacobi T=60 rate 0.5 |" in summary
        configs = {r: json.loads((tmp_path / r / "config.json").read_text()) for r in RUNS[name]}
        assert configs["cnn-strict-s1"]["seed"] == 1 and configs["cnn-strict-s1"]["fpa"] is False
        assert configs["rescnn-bp-s0"]["rule"] == "bp"
    if name == "deep-pc":
        configs = {r: json.loads((tmp_path / r / "config.json").read_text()) for r in RUNS[name]}
        assert configs["resnet18-epc"]["epc"] and configs["resnet18-epc"]["T"] == 3  # quick cap
        assert configs["resnet18-epc"]["rate"] == 0.001
        assert configs["resdualnet-ipc"]["ipc"] and not configs["resdualnet-ipc"]["fpa"]
        assert configs["resdualnet-precision"]["precision"] == {"*": {"decaying": [4.0, 0.5]}}
        assert "| resnet18-epc | PC ePC jacobi T=3 rate 0.001 |" in summary
    if name == "seed-gap":  # the seed's recipe, PC with the demo's inference
        configs = {r: json.loads((tmp_path / r / "config.json").read_text()) for r in RUNS[name]}
        assert (configs["bp"]["preset"], configs["bp"]["rule"], configs["bp"]["init"]) == (
            "seed-bp", "bp", "seed")
        pc = configs["pc"]
        assert (pc["preset"], pc["init"], pc["fpa"], pc["schedule"], pc["T"], pc["rate"]) == (
            "seed-pc", "seed", True, "sequential", 2, 0.5)
        assert pc["milestones"] == [10, 20] and pc["lr"] == 0.01  # 25 epochs: the seed's own
        assert "| 87.85 % (BP, same net) |" in summary
    if name == "model-zoo":
        assert "| 1,132,170 |" in summary  # MLP-Mixer p4 C128 N8 D_S 64 D_C 512, by hand:
        # patch 3*4*4*128+128 + 8 * (4*128 + 64*64*2+64+64 + 128*512*2+512+128) + 256 + 1290


def test_experiment_resumes_and_skips_finished_runs(tmp_path):
    run = load_all()["preprocessing"].fn
    run(_args(tmp_path, epochs=1))
    first = _rows(tmp_path / "zca" / "metrics.jsonl")
    run(_args(tmp_path, epochs=2))  # as after an interruption: continue to epoch 2
    rows = _rows(tmp_path / "zca" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == first[0]  # epoch 1 was restored, not retrained
    assert rows[1]["step"] == 8  # 32 images / batch 8 = 4 steps per epoch
    ckpt = tmp_path / "zca" / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns
    run(_args(tmp_path, epochs=2))  # finished: nothing is trained again
    assert ckpt.stat().st_mtime_ns == stamp
    assert len(_rows(tmp_path / "zca" / "metrics.jsonl")) == 2


def _lr_at(cfg: TrainConfig, step: int, train_error: float | None = None) -> float:
    model = torch.nn.Linear(2, 2)
    schedule = LRSchedule(build_optimizer([{"params": model.parameters()}], cfg), cfg)
    schedule.on_epoch_start(0)
    schedule.on_iteration(step, train_error)
    return schedule.current_lr()


def test_he_preset_schedule():
    cfg = preset_config("he-cifar")
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay) == ("sgd", 0.9, 1e-4)
    assert cfg.batch_size == 128
    assert cfg.iterations == 64000 and cfg.val_split == 5000 and cfg.augment == "flip-crop"
    lrs = [_lr_at(cfg, s) for s in (0, 31999, 32000, 47999, 48000, 63999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_resnet110_warmup_until_training_error_below_80_percent():
    cfg = preset_config("he-cifar-110")
    assert cfg.model == "resnet110"
    assert _lr_at(cfg, 10, train_error=0.85) == pytest.approx(0.01)
    assert _lr_at(cfg, 10, train_error=0.79) == pytest.approx(0.1)


def test_other_presets():
    r18 = preset_config("resnet18-cifar")
    assert (r18.optimizer, r18.lr, r18.batch_size, r18.lr_schedule) == ("sgd", 0.1, 256, "plateau")
    tpl = preset_config("model-template")
    assert (tpl.optimizer, tpl.lr, tpl.betas, tpl.weight_decay, tpl.grad_clip, tpl.batch_size,
            tpl.preprocess) == ("adam", 1e-3, (0.9, 0.999), 1e-4, 1.0, 500, "half")


def test_report_helpers():
    rows = [{"epoch": 1, "step": 4, "train_error": 0.5, "test_acc": 0.6},
            {"epoch": 2, "step": 8, "train_error": 0.4, "test_acc": 0.55, "val_acc": 0.7}]
    m = final_metrics(rows)
    assert m["final_test_error"] == pytest.approx(0.45)
    assert m["best_test_error"] == pytest.approx(0.4)
    assert m["final_val_error"] == pytest.approx(0.3)
    assert pct(0.0875) == "8.75" and pct(None) == "—"
    table = markdown_table(["net", "err"], [["a", "8.75"], ["b", "—"]]).splitlines()
    assert table[1] == "| :--- | ---: |" and table[3] == "| b | — |"
    with pytest.raises(ValueError, match="no metric rows"):
        final_metrics([])
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b"], [["x"]])


def test_seed_gap_scales_the_seeds_milestones_with_the_epochs(tmp_path):
    from pcfast.experiments.seed_gap import scaled_milestones

    assert scaled_milestones(25) == (10, 20)  # the seed's schedule
    assert scaled_milestones(10) == (4, 8)
    assert scaled_milestones(2) == (1,)  # 0.4 x 2 rounds to 1; 0.8 x 2 would be the end
    assert scaled_milestones(1) == ()
    load_all()["seed-gap"].fn(_args(tmp_path, epochs=10, iterations=2, rules=["pc"]))
    config = json.loads((tmp_path / "pc" / "config.json").read_text())
    assert config["milestones"] == [4, 8] and not (tmp_path / "bp").exists()
    assert "after epochs 4, 8" in (tmp_path / "summary.md").read_text()


def test_equal_epoch_gaps_pair_each_epoch_both_runs_finished():
    from pcfast.experiments.report import equal_epoch_gaps

    base = [{"epoch": 1, "test_acc": 0.50}, {"epoch": 2, "test_acc": 0.60},
            {"epoch": 3, "test_acc": 0.70}]
    # epoch 1 twice (an interrupted epoch re-run after a resume): the last row counts
    other = [{"epoch": 1, "test_acc": 0.40}, {"epoch": 1, "test_acc": 0.45},
             {"epoch": 2, "test_acc": 0.65}, {"epoch": 4, "test_acc": 0.9}]
    got = equal_epoch_gaps(base, other)
    assert [g[0] for g in got] == [1, 2]
    assert [g[1:3] for g in got] == [(0.50, 0.45), (0.60, 0.65)]
    assert [round(g[3], 10) for g in got] == [-0.05, 0.05]
    assert equal_epoch_gaps(base, []) == []


def test_seed_gap_summary_of_runs_still_training(tmp_path):
    from pcfast.experiments.seed_gap import report

    def rows(*accs):
        return [{"epoch": i + 1, "step": 10 * (i + 1), "train_error": 0.5, "test_acc": a,
                 "epoch_seconds": 60.0 + i} for i, a in enumerate(accs)]

    results = {"bp": rows(0.60, 0.70, 0.75), "pc": rows(0.55, 0.72)}
    report(_args(tmp_path, epochs=10, quick=False), results, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "`bp` has 3 of 10 epochs; `pc` has 2 of 10 epochs" in text
    assert "| 1 | 60.00 | 55.00 | -5.00 |" in text
    assert "| 2 | 70.00 | 72.00 | +2.00 |" in text
    assert "| 3 |" not in text.split("equal epochs")[1]  # PC has no epoch 3 yet
    assert (tmp_path / "curves.png").stat().st_size > 0
    finished = {"bp": rows(*[0.6] * 10), "pc": rows(*[0.6] * 10)}
    report(_args(tmp_path, epochs=10, quick=False), finished, tmp_path)
    assert "Still training" not in (tmp_path / "summary.md").read_text()


def test_report_flag_tabulates_finished_epochs_and_trains_nothing(tmp_path):
    run = load_all()["seed-gap"].fn
    run(_args(tmp_path, epochs=10, iterations=2, rules=["pc"]))
    before = (tmp_path / "pc" / "checkpoint.pt").stat().st_mtime_ns
    trained = _rows(tmp_path / "pc" / "metrics.jsonl")
    (tmp_path / "summary.md").unlink()
    # a larger step budget: a run that trained would go on to step 4
    got = run(_args(tmp_path, epochs=10, iterations=4, rules=["pc"], report=True))
    assert got["pc"] == trained and trained[-1]["step"] == 2
    assert (tmp_path / "pc" / "checkpoint.pt").stat().st_mtime_ns == before
    assert "| pc |" in (tmp_path / "summary.md").read_text()
    from pcfast.cli import main

    (tmp_path / "summary.md").unlink()
    assert main(["experiment", "seed-gap", "--run-dir", str(tmp_path), "--epochs", "10",
                 "--rules", "pc", "--report"]) == 0
    assert "`pc` has 1 of 10 epochs" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "pc" / "checkpoint.pt").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"run 'bp' has no finished epoch .*--rules"):
        run(_args(tmp_path, epochs=10, rules=["bp", "pc"], report=True))
    assert not (tmp_path / "bp").exists()


def test_median_epoch_seconds_leaves_out_epochs_that_shared_the_cpu():
    from pcfast.experiments.report import median_epoch_seconds

    def rows(*pairs):
        return [{"epoch_seconds": t, "cpu_busy": b} for t, b in pairs]

    assert median_epoch_seconds([]) == "—"
    assert median_epoch_seconds(rows((10.0, 0.99), (12.0, 0.97), (50.0, 0.95))) == "12.0"
    assert median_epoch_seconds(rows((10.0, 0.99), (12.0, 0.5), (30.0, 0.6), (11.0, 0.98))) \
        == "10.5 (2 of 4 epochs alone on the CPU)"
    assert median_epoch_seconds(rows((20.0, 0.5), (30.0, 0.6), (40.0, 0.7))) \
        == "30.0 (every epoch shared the CPU)"
    # rows without the field (GPU runs, older runs): the plain median
    assert median_epoch_seconds([{"epoch_seconds": 5.0}, {"epoch_seconds": 9.0}]) == "7.0"
    # a run resumed across the field's introduction: its older epochs count as unmeasured
    older = [{"epoch_seconds": 900.0}, {"epoch_seconds": 1900.0}]
    assert median_epoch_seconds(older + rows((830.0, 0.97), (880.0, 0.96), (1500.0, 0.6))) \
        == "855.0 (2 of 5 epochs measured alone on the CPU)"
    assert median_epoch_seconds(older + rows((1500.0, 0.6))) \
        == "1500.0 (no epoch measured alone on the CPU)"


def test_pc_vs_bp_gap_is_mean_and_half_range_over_seeds():
    from pcfast.experiments.pc_vs_bp import gap_rows

    def rows(*accs):
        return [{"epoch": i + 1, "train_error": 0.5, "test_acc": a} for i, a in enumerate(accs)]

    results = {"cnn-bp-s0": rows(0.50, 0.60), "cnn-bp-s1": rows(0.62, 0.58),
               "cnn-fpa-s0": rows(0.55, 0.52), "cnn-fpa-s1": rows(0.57, 0.59),
               "cnn-strict-s0": rows(0.40, 0.45), "cnn-strict-s1": rows(0.46, 0.44)}
    got = {r[1]: r for r in gap_rows(results, ["cnn"], [0, 1])}
    # best accuracies: bp 0.60 / 0.62, fpa 0.55 / 0.59, strict 0.45 / 0.46
    assert got["fpa"][3:] == ["-4.00", "1.00"]  # gaps -5, -3 points
    assert got["strict"][3:] == ["-15.50", "0.50"]  # gaps -15, -16 points

    # a run short of the planned epochs (still training) stays out of the gaps
    results["cnn-strict-s1"] = rows(0.46)
    got = {r[1]: r for r in gap_rows(results, ["cnn"], [0, 1], epochs=2)}
    assert got["strict"][2:] == [1, "-15.00", "0.00"]  # seed 0 alone
    results["cnn-strict-s0"] = rows(0.40)
    assert "strict" not in {r[1] for r in gap_rows(results, ["cnn"], [0, 1], epochs=2)}
    assert got["fpa"][2:] == [2, "-4.00", "1.00"]


def test_pc_vs_bp_summary_names_unfinished_runs(tmp_path):
    from pcfast.experiments.pc_vs_bp import report

    def rows(*accs):
        return [{"epoch": i + 1, "train_error": 0.5, "test_acc": a, "test_error": 1 - a}
                for i, a in enumerate(accs)]

    results = {"cnn-bp-s0": rows(0.50, 0.60), "cnn-strict-s0": rows(0.20)}
    report(tmp_path, results, ["cnn"], [0], epochs=2)
    text = (tmp_path / "summary.md").read_text()
    assert "Still training: `cnn-strict-s0` has 1 of 2 epochs" in text
    assert "| cnn | strict |" not in text  # no gap from the unfinished run
    report(tmp_path, {**results, "cnn-strict-s0": rows(0.20, 0.30)}, ["cnn"], [0], epochs=2)
    text = (tmp_path / "summary.md").read_text()
    assert "Still training" not in text and "| cnn | strict | 1 | -30.00 |" in text


def test_experiments_train_subset_and_nets_flags(tmp_path):
    results = load_all()["pc-vs-bp"].fn(_args(tmp_path, nets=["cnn"], train_subset=16,
                                              quick=False, iterations=1, epochs=None))
    assert sorted(results) == sorted(r for r in RUNS["pc-vs-bp"] if r.startswith("cnn-"))
    assert json.loads((tmp_path / "cnn-bp-s0" / "config.json").read_text())["train_subset"] == 16
    with pytest.raises(ValueError, match="unknown"):
        load_all()["pc-vs-bp"].fn(_args(tmp_path, nets=["vgg"]))
    with pytest.raises(ValueError, match=r"deep-pc runs the nets .*unknown: \['cnn'\]"):
        load_all()["deep-pc"].fn(_args(tmp_path, nets=["cnn"]))


def test_rules_and_seeds_flags_pick_the_runs(tmp_path):
    """``--rules`` and ``--seeds`` train a subset (a CPU-sized piece of a long experiment that a
    later call with more rules or seeds resumes); the gap table covers what trained."""
    results = load_all()["pc-vs-bp"].fn(_args(tmp_path, nets=["cnn"], rules=["fpa", "bp"],
                                              seeds=1))
    assert sorted(results) == ["cnn-bp-s0", "cnn-fpa-s0"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| cnn | fpa | 1 |" in summary and "| cnn | strict |" not in summary
    assert not (tmp_path / "cnn-strict-s0").exists()
    results = load_all()["deep-pc"].fn(_args(tmp_path / "deep", nets=["resnet20"],
                                             rules=["epc"]))
    assert sorted(results) == ["resnet20-epc"]
    with pytest.raises(ValueError, match=r"pc-vs-bp trains the rules .*unknown: \['ipc'\]"):
        load_all()["pc-vs-bp"].fn(_args(tmp_path, rules=["ipc"]))
    with pytest.raises(ValueError, match="--seeds must be at least 1"):
        load_all()["pc-vs-bp"].fn(_args(tmp_path, seeds=0))


def test_cli_passes_rules_and_seeds(tmp_path, monkeypatch):
    import pcfast.experiments as experiments
    from pcfast import cli

    seen = {}
    experiments.load_all()
    monkeypatch.setitem(experiments.EXPERIMENTS, "pc-vs-bp", experiments.Experiment(
        "pc-vs-bp", lambda args: seen.update(rules=args.rules, seeds=args.seeds), "stub"))
    assert cli.main(["experiment", "pc-vs-bp", "--rules", "bp", "fpa", "--seeds", "1",
                     "--run-dir", str(tmp_path)]) == 0
    assert seen == {"rules": ["bp", "fpa"], "seeds": 1}


def test_pc_vs_bp_strict_rate_lowers_the_energy_at_every_step():
    """The strict row's inference must be stable on cnn: each of 6 sequential sweeps (twice the
    row's T) lowers the energy, on a random batch at init. At the seed's rate 0.5 the energy
    rises from the 4th sweep (the rate the row had; its mid-layer gradients then pointed
    against BP's)."""
    from pcfast.experiments.model_zoo import ZOO
    from pcfast.experiments.pc_vs_bp import rule_options
    from pcfast.models import build_model
    from pcfast.pc import PCEngine

    options = rule_options("cnn")["strict"]
    model, kwargs = ZOO["cnn"]
    torch.manual_seed(0)
    net = build_model(model, **kwargs)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def trace(rate):
        engine = PCEngine(net.pc_graph(), fpa=False, schedule=options["schedule"], T=6,
                          rate=rate, record_energy=True)
        return [float(e) for e in engine.compute_gradients(x, y).energy_trace]

    energies = trace(options["rate"])
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    unstable = trace(0.5)
    assert any(b > a for a, b in zip(unstable, unstable[1:])), unstable
