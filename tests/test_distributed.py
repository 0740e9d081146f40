"""Data-parallel training (``pcfast.distributed``): 2 Gloo ranks on the CPU against one process.

The equivalence tests spawn two ranks once (``torch.multiprocessing``, a free port on
127.0.0.1, short collective timeouts) and run every case in them; the parent process runs the
same cases on the global batch and compares the weights in float64.
"""

from __future__ import annotations

import datetime
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcfast.data.loader import DeviceLoader
from pcfast.distributed import (
    DistContext,
    DistributedError,
    GradientReducer,
    ShardedLoader,
    SyncBatchNorm,
    convert_sync_batchnorm,
    distribute_rule,
    init_distributed,
    shard_eval_loader,
)
from pcfast.models import build_model
from pcfast.train.checkpoint import load_checkpoint, read_metrics
from pcfast.train.config import TrainConfig
from pcfast.train.loop import TrainingDiverged, run_training
from pcfast.train.rules import RULES, BPRule, build_optimizer, build_rule

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 3
SPAWN_TIMEOUT_S = 90

MLP = dict(model="mlp", model_kwargs={"hidden": [16, 16], "in_features": 12, "num_classes": 4})
MLP_BN = dict(model="mlp", model_kwargs={"hidden": [16, 16], "in_features": 12, "num_classes": 4,
                                         "batchnorm": True})
CNN_BN = dict(model="cnn", model_kwargs={"spec": [4, "p", 4], "num_classes": 4, "image_size": 8},
              shape=(3, 8, 8))
PC = dict(rule="pc", pc_backend="reference", T=4, rate=0.5, schedule="jacobi")

CASES: dict[str, dict] = {
    "bp": dict(**MLP, rule="bp"),
    "pc-fpa-jacobi": dict(**MLP, **PC, grad_clip=0.5),
    "pc-fpa-sequential": {**MLP, **PC, "schedule": "sequential", "T": 2},
    "pc-fast-backend": {**MLP, **PC, "pc_backend": "fast"},
    "pc-strict": {**MLP, **PC, "fpa": False, "T": 3},
    "pc-strict-sequential": {**MLP, **PC, "fpa": False, "T": 2, "schedule": "sequential"},
    "pc-small-buckets": dict(**MLP, **PC, bucket_mb=1e-4),
    "pc-unequal-local-batches": dict(**MLP, **PC, split=(5, 3)),
    "dtp": dict(model="dtp-mlp", model_kwargs={"sizes": [12, 10, 10, 10, 4]}, rule="dtp",
                grad_clip=0.5, rule_options={"sigma": 0.0, "feedback_updates": 2,
                                             "feedback_lr": 0.02}),
    "bp-dtp-net": dict(model="dtp-mlp", model_kwargs={"sizes": [12, 10, 10, 4]}, rule="bp"),
    "sync-bn-bp": dict(**MLP_BN, rule="bp", sync_bn=True),
    "sync-bn-pc-fast-backend": {**MLP_BN, **PC, "pc_backend": "fast", "sync_bn": True},
    "sync-bn-pc-fpa": dict(**MLP_BN, **PC, sync_bn=True),
    "sync-bn-pc-strict": {**MLP_BN, **PC, "fpa": False, "T": 2, "sync_bn": True},
    "sync-bn-cnn-pc": dict(**CNN_BN, **PC, sync_bn=True),
    "sync-bn-cnn-bp": dict(**CNN_BN, rule="bp", sync_bn=True),
}


def run_case(name: str, rank: int, world: int, ctx: DistContext | None = None):
    """Train case ``name`` for STEPS steps in float64 on this rank's slice of each global batch
    (the whole batch when ``world == 1``); returns the state dict and the reducer's buckets."""
    spec = dict(CASES[name])
    shape = spec.pop("shape", (12,))
    split = spec.pop("split", None)
    bucket_mb = spec.pop("bucket_mb", 25.0)
    sync_bn = spec.pop("sync_bn", False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = build_model(spec["model"], **spec["model_kwargs"])
        if sync_bn and world > 1:
            model = convert_sync_batchnorm(model)
        cfg = TrainConfig.from_dict({"optimizer": "adam", "lr": 0.01, "device": "cpu", **spec})
        rule = build_rule(model, cfg)
        optimizer = build_optimizer(rule.parameter_groups(), cfg)
        if world > 1:
            assert ctx is not None
            distribute_rule(rule, ctx, bucket_cap_mb=bucket_mb)
        sizes = split or (GLOBAL_BATCH // world,) * world
        lo = sum(sizes[:rank]) if world > 1 else 0
        hi = lo + sizes[rank] if world > 1 else GLOBAL_BATCH
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            x = torch.randn(GLOBAL_BATCH, *shape, generator=g)
            y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
            rule.train_step(x[lo:hi], y[lo:hi], optimizer)
        reducer = getattr(rule, "gradient_reducer", None)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return state, (reducer.last_buckets if reducer is not None else None)
    finally:
        torch.set_default_dtype(previous)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        ctx = init_distributed("cpu")
        results = {name: run_case(name, rank, world, ctx) for name in CASES}
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # leave together (a Gloo rank leaving early can abort at exit)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, args: tuple, world: int = WORLD, timeout: float = SPAWN_TIMEOUT_S) -> None:
    """Run ``fn(rank, *args)`` on ``world`` spawned processes; fail (and stop them) on an
    error in any rank or after ``timeout`` seconds."""
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {timeout} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()
            p.join(5)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_worker, (WORLD, _free_port(), str(out)))
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_gloo_ranks_train_like_one_process_on_the_global_batch(name, two_rank_results):
    single, _ = run_case(name, 0, 1)
    (rank0, buckets), (rank1, _) = (r[name] for r in two_rank_results)
    assert rank0.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, k=key: f"{name} {k}: {m}")
        torch.testing.assert_close(rank1[key], rank0[key], rtol=1e-12, atol=1e-13)
    moved = [k for k in single if single[k].is_floating_point()
             and not torch.equal(single[k], run_case_initial(name)[k])]
    assert moved, "the weights should have changed"
    if name == "pc-small-buckets":
        assert buckets > 3  # the gradients went over the wire in several buckets
    elif buckets is not None:
        assert buckets == 1


def run_case_initial(name: str) -> dict[str, torch.Tensor]:
    spec = CASES[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        return build_model(spec["model"], **spec["model_kwargs"]).state_dict()
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------- single-process units
def _loader(n: int = 50, batch: int = 8, shuffle: bool = True, **kw) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    return DeviceLoader(images, labels, batch, shuffle=shuffle, seed=3, **kw)


def test_sharded_loader_ranks_are_disjoint_cover_the_epoch_and_match_one_process():
    full = _loader(flip=True, crop_padding=2)
    shards = [ShardedLoader(_loader(flip=True, crop_padding=2), r, 2) for r in range(2)]
    for epoch in (0, 1):
        full.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        batches = [list(s) for s in shards]
        assert len(batches[0]) == len(batches[1]) == len(shards[0]) == 7  # 6 full + 2 of 2
        labels = []
        for (x0, y0), (x1, y1), (x, y) in zip(*batches, full):
            assert x0.shape == x1.shape and x0.shape[0] in (4, 1)
            n = x0.shape[0] + x1.shape[0]
            # the same images, flips and crops as one process on the global batch
            torch.testing.assert_close(torch.cat([x0, x1]), x[:n])
            assert torch.equal(torch.cat([y0, y1]), y[:n])
            labels.append(torch.cat([y0, y1]))
        # 50 images: 48 in full batches, the last 2 split 1 + 1; none twice
        assert sum(len(t) for t in labels) == 50


def test_sharded_loader_uses_each_image_once_per_epoch():
    loader = _loader(n=37, batch=6)
    loader.labels = torch.arange(37)  # label = image index
    seen = []
    for r in range(3):
        shard = ShardedLoader(loader, r, 3)
        shard.set_epoch(4)
        seen += [int(i) for _, y in shard for i in y]
    assert len(seen) == len(set(seen)) == 36  # 6 full batches; the 37th image is left out


def test_sharded_loader_wants_a_global_batch_divisible_by_the_ranks():
    with pytest.raises(DistributedError, match="global batch and must be a multiple"):
        ShardedLoader(_loader(batch=9), 0, 2)


def test_eval_shards_are_disjoint_blocks_of_the_whole_set():
    loader = _loader(n=23, batch=5, shuffle=False)
    parts = [shard_eval_loader(loader, r, 3) for r in range(3)]
    got = torch.cat([y for p in parts for _, y in p])
    assert torch.equal(got, torch.cat([y for _, y in loader]))


def test_sync_batchnorm_is_plain_batchnorm_in_one_process_and_keeps_the_state_dict():
    torch.manual_seed(0)
    net = build_model("cnn", spec=[4, "p"], num_classes=3, image_size=8)
    ref = build_model("cnn", spec=[4, "p"], num_classes=3, image_size=8)
    ref.load_state_dict(net.state_dict())
    net = convert_sync_batchnorm(net)
    assert any(isinstance(m, SyncBatchNorm) for m in net.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    assert net.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(net(x), ref(x))
    for a, b in zip(net.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)
    net.eval(), ref.eval()
    torch.testing.assert_close(net(x), ref(x))


def test_gradient_reducer_is_a_no_op_in_one_process_and_buckets_by_size():
    params = [torch.nn.Parameter(torch.ones(1000)) for _ in range(4)]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    reducer = GradientReducer(params, bucket_cap_mb=2 * 4000 / 2**20)
    assert [len(b) for b in reducer.buckets(params)] == [2, 2]
    reducer.all_reduce(count=3)
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in params)
    assert init_distributed("cpu").world_size == 1 or dist.is_initialized()
    assert distribute_rule("any rule", DistContext()) == "any rule"
    assert os.environ.get("MASTER_ADDR", "127.0.0.1") == "127.0.0.1"


# ------------------------------------------------------------------ whole runs (run_training)
class _NaNOnRank1(BPRule):
    """BP whose reported loss turns NaN on rank 1 only, from the second epoch on."""

    calls = 0

    def train_step(self, x, y, optimizer):
        out = super().train_step(x, y, optimizer)
        type(self).calls += 1
        if dist.get_rank() == 1 and type(self).calls > 8:  # 8 batches per epoch
            out["loss"] = torch.tensor(float("nan"))
        return out


TINY = dict(model="mlp", model_kwargs={"hidden": [32]}, synthetic=True, train_subset=512,
            test_subset=64, batch_size=64, lr_schedule="constant", progress=False,
            device="cpu")


def _diverging_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        RULES["nan-rank1"] = _NaNOnRank1
        cfg = TrainConfig.from_dict({**TINY, "rule": "nan-rank1", "epochs": 2,
                                     "out_dir": str(Path(out) / "run")})
        try:
            run_training(cfg, log=lambda s: None)
            message = "no error"
        except TrainingDiverged as exc:
            message = str(exc)
        (Path(out) / f"rank{rank}.txt").write_text(message)
        dist.barrier()  # leave together (a Gloo rank leaving early can abort at exit)
    finally:
        dist.destroy_process_group()


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_batch_and_keeps_the_checkpoint(
        tmp_path):
    spawn_ranks(_diverging_worker, (WORLD, _free_port(), str(tmp_path)))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert messages[0] == messages[1]
    assert "training diverged at epoch 2, batch 8: loss=nan" in messages[0]
    assert "checkpoint.pt, epoch 1) is intact" in messages[0]
    out = tmp_path / "run"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]


LAST_RANK_DELAY_S = 1.5


def _closing_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PCFAST_DIST_TIMEOUT="30")
    ctx = init_distributed("cpu")
    assert ctx.owns_group and ctx.enabled
    if rank == 0:
        time.sleep(LAST_RANK_DELAY_S)  # rank 0 still writing its last checkpoint
    start = time.monotonic()
    ctx.close()
    waited = time.monotonic() - start
    (Path(out) / f"rank{rank}.txt").write_text(f"{waited} {dist.is_initialized()}")


def test_a_rank_that_finishes_first_leaves_the_group_only_with_the_others(tmp_path):
    """``close`` waits for every rank before tearing the group down: a Gloo rank that exits
    while another still works can abort in its teardown and fail a finished run."""
    spawn_ranks(_closing_worker, (WORLD, _free_port(), str(tmp_path)))
    waited = {}
    for r in range(WORLD):
        seconds, still_in = (tmp_path / f"rank{r}.txt").read_text().split()
        assert still_in == "False", "close() leaves the process group"
        waited[r] = float(seconds)
    assert waited[1] >= LAST_RANK_DELAY_S - 0.5, waited


# ----------------------------------------------------------------------- whole runs (torchrun)
TINY_RUN = ["--model", "mlp", "--model-kwargs", '{"hidden": [64, 64], "batchnorm": true}',
            "--rule", "pc", "--T", "2", "--pc-backend", "reference", "--synthetic",
            "--train-subset", "512", "--test-subset", "300", "--eval-batch-size", "64",
            "--batch-size", "32", "--lr", "0.002", "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "PCFAST_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int = WORLD) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "pcfast", "train"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _config(args: list[str]) -> TrainConfig:
    from pcfast.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(["train", *args]))


def _single_process_eval(args: list[str], state: dict) -> dict:
    """The checkpoint's model evaluated in this process on the whole test set."""
    from pcfast.data.pipeline import build_data
    from pcfast.train.loop import evaluate

    cfg = _config(args)
    model = build_model(cfg.model, **cfg.model_kwargs)
    model.load_state_dict(state)
    return evaluate(model, build_data(cfg, torch.device("cpu"), log=lambda s: None).test)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
def test_a_two_rank_run_killed_mid_epoch_resumes_and_reports_whole_test_set_accuracy(tmp_path):
    out = tmp_path / "run"
    args = TINY_RUN + ["--out-dir", str(out)]
    proc = subprocess.Popen(_torchrun() + args + ["--epochs", "40"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == WORLD, "torchrun runs one process per rank"
        time.sleep(0.3)
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-epoch ...
        proc.wait(timeout=60)  # ... and torchrun stops the other one
    finally:
        for pid in [*workers, proc.pid]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode != 0 and not any(_alive(pid) for pid in workers)
    before = read_metrics(out / "metrics.jsonl")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    done = ckpt["epoch"] + 1
    assert 1 <= done <= len(before) <= done + 1 < 40, "the run should have been killed mid-way"
    assert ckpt["world_size"] == WORLD

    # The 2-rank metrics are those of the whole test set: this checkpoint's model, evaluated
    # again in one process, gives the same accuracy, per-class accuracy and loss.
    row = before[done - 1]
    single = _single_process_eval(args, ckpt["model"])
    assert single["acc"] == row["test_acc"]
    assert single["acc_per_class"] == row["test_acc_per_class"]
    assert single["loss"] == pytest.approx(row["test_loss"], rel=1e-5)

    # Resume on 2 ranks for one more epoch, then on 1 rank for another.
    subprocess.run(_torchrun() + args + ["--epochs", str(done + 1), "--resume"], env=_env(),
                   check=True, timeout=120, stdout=subprocess.DEVNULL)
    lines: list[str] = []
    run_training(_config(args + ["--epochs", str(done + 2), "--resume"]), log=lines.append)
    assert any("trained on 2 ranks, this run has 1 rank" in line for line in lines)
    after = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in after] == list(range(1, done + 3))
    assert after[:done] == before[:done]
    assert load_checkpoint(out / "checkpoint.pt")["world_size"] == 1


def test_the_readme_two_rank_cpu_demo_command_runs(tmp_path):
    """The README's torchrun command for 2 CPU ranks, as written, on a tiny subset."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.strip() for line in readme.splitlines()
             if line.strip().startswith("torchrun") and "--device cpu" in line]
    assert len(lines) == 1, "the README shows one 2-rank CPU command"
    argv = shlex.split(lines[0])
    assert argv[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "demo")
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run([str(torchrun), *argv[1:], "--synthetic", "--train-subset", "128",
                             "--test-subset", "100", "--epochs", "1", "--no-progress"],
                            env=_env(), timeout=150, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "on 2 ranks (cpu, 32 images each)" in result.stdout
    rows = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1] and 0 <= rows[0]["test_acc"] <= 1
    assert result.stdout.count("done: test accuracy") == 1  # rank 0 alone reports


def test_the_cli_reports_shared_errors_on_rank_0_only_and_a_rank_s_own_crash_itself(
        monkeypatch, capsys, tmp_path):
    import pcfast.train.loop as loop
    from pcfast.cli import main

    argv = ["train", "--model", "mlp", "--synthetic", "--epochs", "1", "--no-progress",
            "--out-dir", str(tmp_path)]

    def fail(exc):
        def run(cfg, log=print):
            raise exc
        return run

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, exc, code, said in [
            ("1", TrainingDiverged("training diverged at epoch 2"), 3, ""),
            ("0", TrainingDiverged("training diverged at epoch 2"), 3, "training diverged"),
            ("1", ValueError("bad option"), 2, ""),
            ("1", RuntimeError("boom"), 1, "pcfast: rank 1 of 2 failed (RuntimeError: boom)")]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(loop, "run_training", fail(exc))
        assert main(argv) == code
        err = capsys.readouterr().err
        assert (said in err) if said else err == ""
