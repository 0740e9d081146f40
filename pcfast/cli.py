"""The ``pcfast`` command line: ``pcfast train``, ``pcfast experiment NAME``, ``pcfast list``,
``pcfast doctor``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
import typing
from typing import Any

HELP = {
    "model": "model name (see `pcfast list`)",
    "model_kwargs": "JSON object of model constructor arguments, e.g. '{\"depth\": 20}'",
    "rule": "learning rule: pc (predictive coding), bp (backprop), dtp (target propagation)",
    "rule_options": "rule-specific option KEY=VALUE (repeatable; VALUE parsed as JSON when it can be)",
    "init": "weight initialisation: default (PyTorch's), he (Kaiming fan-out convs, "
            "dual-path ones included) or seed (he, classifier N(0, 0.01))",
    "epochs": "number of epochs",
    "iterations": "stop after this many optimizer steps (overrides --epochs)",
    "batch_size": "training batch size",
    "eval_batch_size": "evaluation batch size",
    "optimizer": "adam, adamw or sgd",
    "lr": "base learning rate",
    "momentum": "SGD momentum",
    "nesterov": "SGD Nesterov momentum",
    "weight_decay": "weight decay",
    "betas": "Adam betas",
    "grad_clip": "clip the gradient norm to this value",
    "lr_schedule": "step (milestones), plateau (on validation error) or constant",
    "milestones": "lr milestones (epochs or iterations, see --milestone-unit)",
    "milestone_unit": "epoch or iteration",
    "lr_gamma": "lr factor at each milestone or plateau",
    "plateau_patience": "epochs without improvement before the plateau schedule lowers the lr",
    "warmup_lr": "hold this lr until the training error falls below --warmup-until-train-error",
    "warmup_until_train_error": "training error that ends the warm-up",
    "T": "PC inference steps per batch",
    "rate": "PC inference rate",
    "schedule": "PC inference schedule: jacobi or sequential",
    "fpa": "fixed prediction assumption (--no-fpa: strict PC, predictions recomputed every step)",
    "output_loss": "PC output energy: ce or mse",
    "error_clamp": "clamp the propagated PC errors to [-c, c]",
    "state_momentum": "momentum of the PC inference steps on the values (0: plain steps)",
    "state_nesterov": "Nesterov momentum for the PC inference steps",
    "ipc": "incremental PC: strict PC whose weights take an optimizer step at every inference "
           "step (needs --no-fpa; auto runs it on the reference backend)",
    "tol": "adaptive inference: stop when the energy changes by at most this fraction between "
           "two readings (T becomes the maximum)",
    "check_every": "inference steps between two energy readings under --tol",
    "precision": "JSON object node -> precision of its energy term (strict PC, iPC, ePC), e.g. "
                 "'{\"layer0\": 2.0}'; unnamed nodes keep 1",
    "epc": "error-based PC: the errors are the free variables, one forward+backward per step "
           "(needs --no-fpa, jacobi)",
    "pc_backend": "PC engine backend: auto (fast on CUDA and for strict PC/ePC on a CPU, "
                  "else reference; iPC: reference), fast, reference",
    "data_dir": "folder holding cifar-10-batches-py (default: $PCFAST_CIFAR10_DIR, ~/.cache/pcfast)",
    "download": "download CIFAR-10 through torchvision when no copy is found",
    "allow_unofficial_data": "accept a CIFAR-10 copy whose md5 sums are not the official ones",
    "synthetic": "train on the built-in synthetic dataset",
    "train_subset": "use only the first N training images",
    "test_subset": "use only the first N test images",
    "val_split": "hold out N training images for validation (e.g. 5000 for 45k/5k)",
    "augment": "none, flip or flip-crop (pad 4 + random crop + flip)",
    "extra_augment": "extra training augmentation (e.g. fancy-pca)",
    "preprocess": "preprocessing, fitted on the training split (channel, cifar10, half, ...)",
    "seed": "random seed",
    "device": "auto, cpu, cuda or cuda:N",
    "out_dir": "run folder: metrics.jsonl, curves.png, checkpoint.pt, config.json",
    "resume": "continue from the checkpoint in --out-dir",
    "progress": "progress bar",
    "sync_bn": "under torchrun: BatchNorm statistics of the global batch (default: per rank)",
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from pcfast.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    p.add_argument("--preset", default=None, help="start from a named preset (see `pcfast list`)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in (None, {}, "") else f" (default: {default})"
        kw: dict[str, Any] = {"default": None, "dest": f.name, "help": HELP.get(f.name, "") + shown}
        args = typing.get_args(hint)
        if f.name in ("model_kwargs", "precision"):
            p.add_argument(flag, type=json.loads, **kw)
        elif f.name == "rule_options":
            p.add_argument("--rule-option", action="append", metavar="KEY=VALUE", **kw)
        elif hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in ("milestones", "betas"):
            p.add_argument(flag, type=float if f.name == "betas" else int,
                           nargs=2 if f.name == "betas" else "*", **kw)
        else:
            base = next((a for a in args if a is not type(None)), hint)
            p.add_argument(flag, type=base, **kw)
    p.add_argument("--strict", dest="fpa", action="store_false",
                   help="strict PC (same as --no-fpa)")


def config_from_args(ns: argparse.Namespace):
    """A TrainConfig from the preset (if any) and the flags that were given."""
    from pcfast.train.config import TrainConfig
    from pcfast.train.presets import preset_config

    given = {k: v for k, v in vars(ns).items()
             if v is not None and k in {f.name for f in dataclasses.fields(TrainConfig)}}
    if "rule_options" in given:
        opts = {}
        for item in given["rule_options"]:
            if "=" not in item:
                raise SystemExit(f"pcfast: --rule-option expects KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            opts[key] = _parse_value(value)
        given["rule_options"] = opts
    if ns.preset:
        return preset_config(ns.preset, **given)
    return TrainConfig.from_dict(given)


def _cmd_train(ns: argparse.Namespace) -> int:
    from pcfast.data.cifar10 import CIFAR10Error
    from pcfast.distributed import env_rank
    from pcfast.train.checkpoint import CheckpointError
    from pcfast.train.loop import TrainingDiverged, run_training

    rank, world = env_rank()  # under torchrun every rank meets the same errors: rank 0 says so

    def report(message: str) -> None:
        if rank == 0:
            print(message, file=sys.stderr)

    where = "the run folder"
    try:
        cfg = config_from_args(ns)
        where = cfg.out_dir
        rows = run_training(cfg)
    except TrainingDiverged as exc:
        report(f"pcfast: {exc}")
        return 3
    except KeyboardInterrupt:
        report(f"pcfast: interrupted; {where} keeps the checkpoint of the last complete epoch: "
               "run the same command with --resume to continue")
        return 130
    except (ValueError, CIFAR10Error, CheckpointError) as exc:  # bad input: one line, no trace
        report(f"pcfast: {exc}")
        return 2
    except Exception as exc:
        if world == 1:
            raise
        traceback.print_exc()  # this rank failed on its own: it reports, whichever it is
        print(f"pcfast: rank {rank} of {world} failed ({type(exc).__name__}: {exc}); torchrun "
              f"stops the other ranks, and {where} keeps the checkpoint of the last complete "
              "epoch: run the same command with --resume to continue", file=sys.stderr)
        return 1
    if rows and rank == 0:
        last = rows[-1]
        print(f"done: test accuracy {last['test_acc']:.4f} (best {last['best_test_acc']:.4f}); "
              f"metrics, curves and checkpoint in {cfg.out_dir}")
    return 0


def _cmd_experiment(ns: argparse.Namespace) -> int:
    from pcfast.experiments import load_all

    experiments = load_all()
    if ns.name not in experiments:
        print(f"pcfast: unknown experiment {ns.name!r}; choose from: "
              f"{', '.join(sorted(experiments))}", file=sys.stderr)
        return 2
    ns.run_dir = ns.run_dir or f"runs/{ns.name}"
    experiments[ns.name].fn(ns)
    return 0


def _cmd_list(ns: argparse.Namespace) -> int:
    from pcfast.experiments import load_all
    from pcfast.models import MODELS
    from pcfast.train.presets import PRESETS
    from pcfast.train.rules import RULES, load_rule_modules

    load_all()
    load_rule_modules()
    print("models:      " + ", ".join(sorted(MODELS)))
    print("rules:       " + ", ".join(sorted(RULES)))
    print("presets:     " + ", ".join(sorted(PRESETS)))
    from pcfast.experiments import EXPERIMENTS

    for e in sorted(EXPERIMENTS.values(), key=lambda e: e.name):
        print(f"experiment   {e.name}: {e.help}")
    return 0


def _cmd_doctor(ns: argparse.Namespace) -> int:
    from pcfast.doctor import run

    return run(ns.device, ns.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model with PC, BP or DTP",
                           description="Train a model. A --preset fills every option; the flags "
                           "given override it.")
    _add_train_flags(train)
    train.set_defaults(func=_cmd_train)
    exp = sub.add_parser("experiment", help="run a named reproduction")
    exp.add_argument("name")
    exp.add_argument("--run-dir", default=None)
    exp.add_argument("--epochs", type=int, default=None, help="override the epochs of every run")
    exp.add_argument("--iterations", type=int, default=None,
                     help="override the optimizer steps of every run")
    exp.add_argument("--train-subset", type=int, default=None, metavar="N",
                     help="train every run on the first N training images")
    exp.add_argument("--nets", nargs="+", default=None,
                     help="pc-vs-bp (default: cnn rescnn) and deep-pc (default: resdualnet "
                          "resnet18): the nets to train")
    exp.add_argument("--rules", nargs="+", default=None,
                     help="pc-vs-bp (bp fpa strict) and deep-pc (bp fpa strict ipc epc "
                          "precision), seed-gap (bp pc): train only these rules (default: all)")
    exp.add_argument("--seeds", type=int, default=None, metavar="N",
                     help="pc-vs-bp: seeds per net and rule, --seed, --seed + 1, ... (2)")
    exp.add_argument("--device", default="auto")
    exp.add_argument("--data-dir", default=None)
    exp.add_argument("--allow-unofficial-data", action="store_true")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--quick", action="store_true",
                     help="tiny subsets and few steps: checks the experiment end to end")
    exp.add_argument("--report", action="store_true",
                     help="train nothing: write summary.md and curves.png from the epochs the "
                          "runs have finished so far (also while they train in another process)")
    exp.set_defaults(func=_cmd_experiment)
    lst = sub.add_parser("list", help="models, rules, presets and experiments")
    lst.set_defaults(func=_cmd_list)
    doc = sub.add_parser("doctor", help="check this install: versions, compiled ops, every op "
                         "against its reference, the PC engines")
    doc.add_argument("--device", default=None,
                     help="check only this device: cpu, cuda or cuda:N (default: cpu and cuda)")
    doc.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON")
    doc.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
