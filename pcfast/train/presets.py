"""Named presets: the set-ups people reproduce. ``pcfast train --preset NAME``; flags override."""

from __future__ import annotations

from typing import Any

from pcfast.train.config import TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    # The seed project's PC set-up: Res-DualNet, batch 256, T=100, rate 0.5, jacobi,
    # Adam 0.01 -> 0.001 -> 1e-4 over 10/10/5 epochs, flip-only augmentation. The main-job
    # presets fetch CIFAR-10 through torchvision when no copy is found (synthetic data if offline).
    "seed-pc": dict(model="resdualnet", rule="pc", epochs=25, batch_size=256, T=100, rate=0.5,
                    schedule="jacobi", fpa=True, optimizer="adam", lr=0.01,
                    lr_schedule="step", milestones=(10, 20), milestone_unit="epoch",
                    lr_gamma=0.1, augment="flip", preprocess="cifar10", download=True),
    # The seed project's BP set-up: the same schedule at batch 128.
    "seed-bp": dict(model="resdualnet", rule="bp", epochs=25, batch_size=128, optimizer="adam",
                    lr=0.01, lr_schedule="step", milestones=(10, 20), milestone_unit="epoch",
                    lr_gamma=0.1, augment="flip", preprocess="cifar10", download=True),
    # A few-minute CPU version of the seed PC run (the README's quick start): 2,048 training
    # images, and the sequential schedule, whose sweep reaches every node in one step, so that
    # T=2 (rate 0.5) trains the whole network.
    "demo": dict(model="resdualnet", rule="pc", epochs=2, batch_size=64, T=2, rate=0.5,
                 schedule="sequential", optimizer="adam", lr=0.005, lr_schedule="constant",
                 augment="flip", preprocess="cifar10", train_subset=2048, test_subset=1000,
                 out_dir="runs/demo", download=True),
    # He et al. 2016, CIFAR-10 (Sec. 4.2): SGD 0.9, wd 1e-4, batch 128, lr 0.1 / 10 at 32k and
    # 48k iterations, stop at 64k, 45k/5k split, pad-4 crop + flip, per-pixel mean, He init.
    "he-cifar": dict(model="resnet20", rule="bp", init="he", optimizer="sgd", lr=0.1,
                     momentum=0.9, weight_decay=1e-4, batch_size=128, iterations=64000,
                     lr_schedule="step", milestones=(32000, 48000), milestone_unit="iteration",
                     lr_gamma=0.1, val_split=5000, augment="flip-crop",
                     preprocess="pixel-mean-div255"),
    # ResNet-110: the same, warming up at lr 0.01 until the training error is below 80 %.
    "he-cifar-110": dict(model="resnet110", rule="bp", init="he", optimizer="sgd", lr=0.1,
                         momentum=0.9, weight_decay=1e-4, batch_size=128, iterations=64000,
                         lr_schedule="step", milestones=(32000, 48000),
                         milestone_unit="iteration", lr_gamma=0.1, warmup_lr=0.01,
                         warmup_until_train_error=0.8, val_split=5000, augment="flip-crop",
                         preprocess="pixel-mean-div255"),
    # CIFAR ResNet-18/34: SGD 0.9, wd 1e-4, batch 256, lr 0.1 / 10 when the validation error
    # plateaus (no improvement for 5 epochs), pad-4 crop + flip.
    "resnet18-cifar": dict(model="resnet18", rule="bp", init="he", optimizer="sgd", lr=0.1,
                           momentum=0.9, weight_decay=1e-4, batch_size=256, epochs=120,
                           lr_schedule="plateau", plateau_patience=5, lr_gamma=0.1,
                           val_split=5000, augment="flip-crop", preprocess="cifar10"),
    # The model-template recipe: Adam 1e-3 (0.9, 0.999), wd 1e-4, clip grad norm at 1.0,
    # batch 500, normalisation (0.5, 0.5, 0.5), no augmentation.
    "model-template": dict(model="mlp", rule="bp", optimizer="adam", lr=1e-3, betas=(0.9, 0.999),
                           weight_decay=1e-4, grad_clip=1.0, batch_size=500, epochs=30,
                           lr_schedule="constant", augment="none", preprocess="half"),
    # The DTP baseline MLP (Lee et al. 2015): 3072-1000-1000-1000-10 tanh, LogSoftmax output,
    # eta_hat 0.5, noise sigma 0.1, one feedback update per forward update, Adam 1e-4 (forward)
    # and 1e-3 (feedback), batch 128, 100 epochs, no augmentation, per-channel normalisation.
    "dtp-baseline": dict(model="dtp-mlp", rule="dtp", optimizer="adam", lr=1e-4, batch_size=128,
                         epochs=100, lr_schedule="constant", augment="none", preprocess="channel",
                         rule_options=dict(eta_hat=0.5, sigma=0.1, feedback_lr=1e-3,
                                           feedback_updates=1, feedback_loss="dtp")),
}


def register_preset(name: str, values: dict[str, Any]) -> None:
    """Add a preset (used by the model zoo and DTP)."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} exists already")
    TrainConfig.from_dict(values)  # validates the option names
    PRESETS[name] = dict(values)


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    try:
        values = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from: {', '.join(sorted(PRESETS))}") from None
    values.update(overrides)
    values["preset"] = name
    return TrainConfig.from_dict(values)
