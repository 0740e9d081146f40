"""Named presets: the set-ups people reproduce. ``pcfast train --preset NAME``; flags override."""

from __future__ import annotations

from typing import Any

from pcfast.train.config import TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    # The seed project's PC set-up: Res-DualNet, batch 256, T=100, rate 0.5, jacobi,
    # Adam 0.01 -> 0.001 -> 1e-4 over 10/10/5 epochs, flip-only augmentation, the seed's init
    # (Kaiming fan-out for every conv, the dual-path ones included; classifier N(0, 0.01)). The
    # main-job presets fetch CIFAR-10 through torchvision when no copy is found (synthetic data
    # if offline).
    "seed-pc": dict(model="resdualnet", rule="pc", init="seed", epochs=25, batch_size=256, T=100,
                    rate=0.5, schedule="jacobi", fpa=True, optimizer="adam", lr=0.01,
                    lr_schedule="step", milestones=(10, 20), milestone_unit="epoch",
                    lr_gamma=0.1, augment="flip", preprocess="cifar10", download=True),
    # The seed project's BP set-up: the same schedule and init at batch 128.
    "seed-bp": dict(model="resdualnet", rule="bp", init="seed", epochs=25, batch_size=128,
                    optimizer="adam", lr=0.01, lr_schedule="step", milestones=(10, 20),
                    milestone_unit="epoch", lr_gamma=0.1, augment="flip", preprocess="cifar10",
                    download=True),
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


# ----------------------------------------------------------------------------------------------
# The PCX benchmark's CIFAR-10 PC set-ups (Pinchetti et al., "Benchmarking Predictive Coding
# Networks -- Made Simple", ICLR 2025, arXiv 2407.01163; github.com/liukidar/pcx before commit
# 3778164 removed the paper's experiments). Both are PCX's "PC-SE" runs: strict PC (predictions
# recomputed every inference step; all nodes updated together = pcfast's jacobi schedule),
# squared-error output energy 0.5 ||onehot - logits||^2, hidden nodes initialised by a feedforward
# pass, weights updated once per batch from the energy at the relaxed state, AdamW, batch 128,
# 50 epochs, random crop (pad 4) + horizontal flip, per-channel normalisation.
#
# The states take PCX's SGD with heavy-ball momentum (lr_x, m) as pcfast's state momentum
# (``rate`` = lr_x, ``state_momentum`` = m; optax's and torch's SGD share the convention).
# ``pc_backend="auto"``: the fast backend's strict PC (on CUDA and on a CPU).
#
# What differs from PCX (pcfast cannot do it today, or does it differently):
# - State gradient scale: PCX differentiates the batch mean of the energy (pmean under vmap); we
#   read its state gradient as the per-sample dE_i/dh_i, as pcfast's is (with a 1/batch factor
#   its state rates of ~0.02 would leave float32 states nearly unmoved); this reading is not
#   verified by running PCX.
# - Weight learning rate: PCX uses optax.warmup_cosine_decay_schedule (lr -> 1.1 lr over the
#   first 10 % of the steps, cosine down to 0.1 lr at the end); pcfast has step/plateau/constant
#   schedules, so the lr is constant here.
# - Normalisation: PCX divides by std (0.2023, 0.1994, 0.2010); pcfast's ``cifar10`` preprocessing
#   uses the same means with std (0.2470, 0.2435, 0.2616).
# - Batches: PCX drops the last incomplete batch; weight gradients are on the scale of a mean over
#   the batch in pcfast (AdamW makes the scale irrelevant up to eps).
# VGG-5, PC-SE on CIFAR-10: hps/VGG5/CIFAR10/VGG5_PC-SE_CIFAR10.yaml (commit c722834) — T=7,
# GELU, AdamW lr 2.658e-4 wd 6.656e-3, state SGD lr 0.02349 momentum 0.3, batch 128, 50 epochs.
register_preset("pcx-vgg5", dict(
    model="vgg5", model_kwargs=dict(activation="gelu"), rule="pc", epochs=50, batch_size=128,
    T=7, rate=0.02348681827141059, state_momentum=0.3, schedule="jacobi", fpa=False,
    output_loss="mse", pc_backend="auto", optimizer="adamw", lr=2.657691155688603e-4,
    weight_decay=6.6559627972820395e-3, lr_schedule="constant", augment="flip-crop",
    preprocess="cifar10", download=True))

# VGG-7, PC-SE on CIFAR-10: time_benchmarking/VGG7/cifar10/PC_SE.yaml (the paper's only VGG-7
# CIFAR-10 set-up; its 6 epochs were for timing, the paper's CIFAR runs train 50) — T=11, hard
# tanh, AdamW lr 1.576e-4 wd 2.748e-5, state SGD lr 0.01927 momentum 0.85, batch 128.
register_preset("pcx-vgg7", dict(
    model="vgg7", model_kwargs=dict(activation="hard_tanh"), rule="pc", epochs=50,
    batch_size=128, T=11, rate=0.01927208236479854, state_momentum=0.85,
    schedule="jacobi", fpa=False, output_loss="mse", pc_backend="auto", optimizer="adamw",
    lr=1.5756692930515384e-4, weight_decay=2.7480603900710354e-5, lr_schedule="constant",
    augment="flip-crop", preprocess="cifar10", download=True))
