"""The one source of defaults: CaP's settings, the training recipe, and the fine-tune recipe
for compressed networks. The library, the CLI (its flags' defaults are read from here) and the
benchmark all take them from these frozen dataclasses, so a setting cannot drift after it is
resolved: change one with `dataclasses.replace` (or `.replace(**changes)`), which validates.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from caproj.errors import CaprojError

CHANNEL_MULTIPLE = 8  # widths at multiples of 8 where a site is wide enough (CPU kernel blocks)
TARGET_MACS = 0.5  # what `compress` aims for when neither target_macs nor keep is given
LATENCY_CHECKS = 2  # re-solves when the measured latency of the chosen widths misses the target
LATENCY_MARGIN = 0.02  # latency budgets aim this far under the target (one measurement's noise)
SAVE_EVERY = 50  # steps between resumable state saves
# CaP's default rates hold for a training set the steps pass over at most SMALL_SET_PASSES
# times (CIFAR-10's 50,000 images: 1.5 passes). A set re-used more often gets at most a third
# of them, and sqrt(SMALL_SET_RATE / passes) when that is lower. Measured on ResNet-56 at 50 %
# MACs (RESULTS.md, issue 19): at the full rates the loss climbed from step ~75 on with 1,000
# images (73.7 %) and with 5,000 synthetic ones (65.5 % at 0.81 of the rates); at about a third,
# 86.1 % and 85.2 %; 100 images at 0.11 of the rates, 83.0 %.
SMALL_SET_PASSES = 2.0
SMALL_SET_RATE = 10.0


def _finite_nonneg(name: str, v: Any) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
        raise CaprojError(f"{name} must be a finite number >= 0, got {v}", param=name)


@dataclass(frozen=True)
class CapConfig:
    """Cascaded Projection's settings (see caproj.cap)."""

    init: str = "select"  # select | pca
    calib_images: int = 2000
    steps: int = 600
    # Adam learning rates of the projection proxies and the relaxed weights. None: 1e-3 / 3e-4
    # (best on ResNet-56; weight lr 1e-3 diverges there), or 2e-4 / 1e-4 when a residual stream
    # is compressed: one stream P moves every layer of a stage at once, and at the internal
    # rates ResNet-20's optimisation diverged (batch accuracy 70 % -> 23 %; RESULTS.md).
    # `resolve` fills them in once; the optimisation reads only resolved values.
    lr: float | None = None
    weight_lr: float | None = None
    weight_opt: str = "adam"  # adam | sgd (nesterov, momentum 0.9) for the relaxed weights
    batch_size: int = 128
    recon_weight: float = 1.0
    kd: float = 0.5  # share of distillation in the classification term (1 without labels)
    kd_temperature: float = 4.0
    relax: str = "all"  # projection | consumer | all
    refit: bool = True
    alternate: bool = True
    retraction: str = "qr"
    # the least-squares refit's ridge, relative to the mean diagonal of its Gram matrix, and
    # what it pulls toward: "zero" (plain ridge) or "projected", the original consumer read
    # through P (min ||X W' - Y||^2 + lambda ||W' - W P||^2: keeps the refit near the original)
    ridge: float = 1e-4
    ridge_to: str = "zero"
    # BatchNorm as fine-tuning runs it, during the optimisation: batch statistics in every BN
    # (running statistics untouched); each site's fresh BN normalises its batch too, with its
    # forward value kept (scale-invariant gradients for the projected producers)
    bn_train: bool = False
    bn_recalibrate: bool = False  # re-estimate every BN's statistics on the compressed net
    # after any method: rescale each layer that feeds a BN to the original layer's weight size
    # (eval function unchanged; fine-tuning's effective step size restored), see
    # caproj.surgery.match_weight_scale
    match_scale: bool = False
    # distinct training images the optimisation draws from (compress fills it in from the
    # data when it can tell); with default rates, many passes over few images lower them
    train_images: int | None = None
    # label-free steps only: blend each image with another of its batch, the other's share
    # ~ U(0, mix) (0 = off; at most 0.5). The original model labels the blend.
    mix: float = 0.0
    seed: int = 0
    bf16: bool | None = None
    log_every: int = 25

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.init not in ("select", "pca"):
            raise CaprojError(f"init must be select or pca, got {self.init!r}", param="init")
        if self.weight_opt not in ("adam", "sgd"):
            raise CaprojError(f"weight_opt must be adam or sgd, got {self.weight_opt!r}",
                              param="weight_opt")
        if self.relax not in ("projection", "consumer", "all"):
            raise CaprojError(f"relax must be projection, consumer or all, got {self.relax!r}",
                              param="relax")
        if self.ridge_to not in ("zero", "projected"):
            raise CaprojError(f"ridge_to must be zero or projected, got {self.ridge_to!r}",
                              param="ridge_to")
        if self.retraction not in ("qr", "polar"):
            raise CaprojError(f"retraction must be qr or polar, got {self.retraction!r}",
                              param="retraction")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise CaprojError(f"steps must be an integer >= 0, got {self.steps}", param="steps")
        if not isinstance(self.calib_images, int) or self.calib_images < 1:
            raise CaprojError(f"calib_images must be >= 1, got {self.calib_images}",
                              param="calib_images")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CaprojError(f"batch_size must be >= 1, got {self.batch_size}",
                              param="batch_size")
        for name in ("lr", "weight_lr", "recon_weight", "ridge", "kd_temperature"):
            v = getattr(self, name)
            if v is None and name in ("lr", "weight_lr"):
                continue
            _finite_nonneg(name, v)
        if not 0 <= self.kd <= 1:
            raise CaprojError(f"kd must be in [0, 1], got {self.kd}", param="kd")
        if not (isinstance(self.mix, (int, float)) and 0 <= self.mix <= 0.5):
            raise CaprojError(f"mix must be in [0, 0.5], got {self.mix}", param="mix")
        if self.train_images is not None and (not isinstance(self.train_images, int)
                                              or self.train_images < 1):
            raise CaprojError(f"train_images must be an integer >= 1, got {self.train_images}",
                              param="train_images")

    def rate_scale(self) -> float:
        """What the default rates are multiplied by: 1, or min(1/3, sqrt(SMALL_SET_RATE /
        passes)) when the steps pass over `train_images` more than SMALL_SET_PASSES times."""
        if self.train_images is None:
            return 1.0
        passes = self.steps * self.batch_size / self.train_images
        if passes <= SMALL_SET_PASSES:
            return 1.0
        return min(1 / 3, math.sqrt(SMALL_SET_RATE / passes))

    def resolve(self, streams: bool) -> CapConfig:
        """Learning rates filled in for this job (`streams`: a residual stream is narrowed;
        a small training set lowers the defaults, `rate_scale`). Given rates stay as given."""
        k = self.rate_scale()
        return self.replace(lr=self.lr if self.lr is not None else
                            (2e-4 if streams else 1e-3) * k,
                            weight_lr=self.weight_lr if self.weight_lr is not None
                            else (1e-4 if streams else 3e-4) * k)

    def replace(self, **changes: Any) -> CapConfig:
        return dataclasses.replace(self, **_known(self, changes))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe (the engine's: caproj.train.fit)."""

    epochs: int = 3
    lr: float = 0.02
    batch_size: int = 128  # what the CLI's own data sources batch by; user loaders keep theirs
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    optimizer: str = "sgd"  # sgd (nesterov) | adam (AdamW: the optimiser CaP itself runs)
    label_smoothing: float = 0.0
    seed: int = 0
    bf16: bool | None = None  # None: on where the hardware runs bf16 fast
    channels_last: bool = True
    compile: bool = False
    kd_weight: float = 0.0  # weight of distillation from `teacher` (0 = plain cross-entropy)
    kd_temperature: float = 4.0
    # CaP's mixture loss carried into training: + feature_weight * mean over feature layers of
    # ||f - f_teacher||^2 / ||f_teacher||^2 (the layers' outputs in the model and the teacher)
    feature_weight: float = 0.0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    # BatchNorm keeps its running statistics while training (affine still learned), so the
    # network being fine-tuned is exactly the one that was evaluated (no batch-statistics shift)
    freeze_bn: bool = False
    # exponential moving average of the weights (and BN statistics), decay per step; 0 = off.
    # The averaged network is what is evaluated and returned.
    ema: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise CaprojError(f"epochs must be >= 0, got {self.epochs}", param="epochs")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise CaprojError(f"lr must be a positive number, got {self.lr}", param="lr")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise CaprojError(f"schedule must be onecycle, cosine or constant, "
                              f"got {self.schedule!r}", param="schedule")
        if self.optimizer not in ("sgd", "adam"):
            raise CaprojError(f"optimizer must be sgd or adam, got {self.optimizer!r}",
                              param="optimizer")
        if not 0 <= self.label_smoothing < 1:
            raise CaprojError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
                              param="label_smoothing")
        if not 0 <= self.kd_weight <= 1:
            raise CaprojError(f"kd_weight must be in [0, 1], got {self.kd_weight}",
                              param="kd_weight")
        if not 0 <= self.ema < 1:
            raise CaprojError(f"ema must be in [0, 1), got {self.ema}", param="ema")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CaprojError(f"batch_size must be >= 1, got {self.batch_size}",
                              param="batch_size")
        if self.max_steps is not None and self.max_steps < 1:
            raise CaprojError(f"max_steps must be >= 1, got {self.max_steps}", param="max_steps")
        _finite_nonneg("weight_decay", self.weight_decay)
        _finite_nonneg("feature_weight", self.feature_weight)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **_known(self, changes))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SynthConfig:
    """Data-free calibration images (caproj.synth): optimise random inputs so that every
    BatchNorm layer sees batch statistics equal to its running ones (DeepInversion / ZeroQ)."""

    steps: int = 200  # Adam steps per batch (DeepInversion: 2,000; ZeroQ: 500; CPU-sized)
    batch_size: int = 256  # images optimised together: their batch statistics are matched
    lr: float = 0.25  # Adam, cosine-decayed to 0 over the steps (DeepInversion: 0.25)
    bn_weight: float = 1.0  # BN-statistics term: sum over layers of ||mu - rm|| + ||var - rv||
    first_bn_weight: float = 10.0  # extra weight of the first BN (low-level image statistics)
    ce_weight: float = 0.2  # logit prior: cross-entropy toward a balanced set of random classes
    tv_weight: float = 1e-4  # smoothness prior: squared total variation per pixel
    l2_weight: float = 1e-5  # mean squared input
    jitter: float = 1 / 16  # random shift each step, as a fraction of the image side
    flip: bool = True  # random horizontal flip each step
    seed: int = 0
    bf16: bool | None = None  # bf16 autocast (None: where the hardware runs it fast)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise CaprojError(f"{name} must be an integer >= 1, got {v}", param=name)
        for name in ("lr", "bn_weight", "first_bn_weight", "ce_weight", "tv_weight",
                     "l2_weight", "jitter"):
            _finite_nonneg(name, getattr(self, name))
        if self.jitter >= 0.5:
            raise CaprojError(f"jitter must be below 0.5 (a fraction of the image side), got "
                              f"{self.jitter}", param="jitter")

    def replace(self, **changes: Any) -> SynthConfig:
        return dataclasses.replace(self, **_known(self, changes))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _known(cfg: Any, changes: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cfg)}
    for k in changes:
        if k not in names:
            raise CaprojError(f"unknown {type(cfg).__name__} option {k!r}; known: "
                              f"{', '.join(sorted(names))}", param=k)
    return changes


# Training from scratch or adapting a model to new data (`caproj train`).
TRAIN = TrainConfig()
# Fine-tuning a compressed network, as measured on ResNet-56 (RESULTS.md): peak lr 0.005 with
# KD 0.5 from the original keeps CaP's head start (89.05 % after 3 epochs) where lr 0.02 without
# KD falls to 75 % first (87.63 %).
FINETUNE = TrainConfig(epochs=3, lr=0.005, kd_weight=0.5)
# ... and when the original does not fit the training data yet (a checkpoint trained on other
# data or preprocessing: the PNG-trained ResNet-20/56 on JPEG CIFAR-10 gain 1.8-2.4 points over
# FINETUNE with this, RESULTS.md issue 17 item 4): peak lr 0.02, no distillation (in CaP too).
FINETUNE_LEARN = TrainConfig(epochs=3, lr=0.02, kd_weight=0.0)
RECIPES = {"polish": FINETUNE, "learn": FINETUNE_LEARN}
# recipe="auto": "learn" when the original's loss on unaugmented training images exceeds this
# share of its test loss (0.20-0.35 for the two shared starts that fit their data, 0.54-0.64 for
# the two that do not: benchmarks/recipe_probe.py), else "polish".
LEARN_RATIO = 0.45
CAP = CapConfig()
SYNTH = SynthConfig()
