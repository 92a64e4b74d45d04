"""The engine: train / fine-tune (`fit`) and `evaluate` over any iterable of batches.

Fast on a small CPU by design (measured in benchmarks/train_throughput.py): convolutions run
channels_last, and the forward/backward runs under bf16 autocast where the processor supports it
(BatchNorm and the loss stay float32). caproj's own data sources keep images resident as uint8
tensors with batched augmentation; a user's DataLoader is read as it is. Evaluation runs in
float32 so reported accuracies are exact.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from caproj import batches as B
from caproj import dist
from caproj.config import TrainConfig
from caproj.data import random_crop, random_flip
from caproj.errors import CaprojError
from caproj.losses import (
    LossFn,
    OutputTransform,
    Taps,
    check_finite,
    check_targets,
    kd_loss,
    outputs_of,
    reconstruction,
    task_loss,
)
from caproj.resume import Checkpointer, rng_state, set_rng_state
from caproj.utils import seed_everything, steady_allocator

log = logging.getLogger(__name__)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def progress(iterable, total: int | None, desc: str, enabled: bool = True):
    """A tqdm bar on an interactive terminal (rank 0 only), else the iterable itself."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty() or not dist.is_main())


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, *, loss_fn: LossFn | None = None,
             output_transform: OutputTransform | None = None, max_batches: int | None = None,
             progress_bar: bool = True) -> dict[str, float]:
    """Top-1 accuracy (%), mean loss (cross-entropy or `loss_fn`) and image count over labelled
    batches, float32, eval mode (the model's mode is restored)."""
    device = model_device(model)
    if device.type == "cpu":
        steady_allocator()  # large forwards fault their activations in again otherwise
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    total = B.steps_per_pass(data)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    B.set_epoch(data, 0)
    try:
        for i, (x, y) in enumerate(progress(B.iterate(data, device, reread=False), total, "eval",
                                            progress_bar)):
            if max_batches is not None and i == max_batches:
                break
            if y is None:
                raise CaprojError("evaluation needs labelled batches (x, y); the data yields "
                                  "inputs only", param="data")
            out = outputs_of(model, x, output_transform).float()
            if i == 0 and loss_fn is None:
                check_targets(out, y)
            if loss_fn is not None:
                loss += float(loss_fn(out, y)) * len(y)
            else:
                loss += F.cross_entropy(out, y, reduction="sum").item()
            if out.dim() == 2 and y.dim() == 1:
                correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    finally:
        model.train(was)
    if n == 0:
        raise CaprojError("evaluation data is empty: it yielded no batch", param="data")
    return {"acc": 100.0 * correct / n, "loss": loss / n, "n": n}


def augment_images(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A batch of images (N, C, H, W), each shifted by up to 1/8 of its side (zero padding)
    and flipped left-right at random; seeded, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed)
    return random_flip(random_crop(x, max(1, min(x.shape[-2:]) // 8), g), g)


def mix_images(x: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """Each image of a float batch (N, C, H, W) blended with the image at the mirrored place
    in the batch (mixup), its own share drawn from Beta(alpha, alpha); seeded, so a resumed
    run sees the same batches."""
    r = random.Random(seed)
    lam = torch.tensor([r.betavariate(alpha, alpha) for _ in range(len(x))], dtype=x.dtype,
                       device=x.device).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x.flip(0)


class BestOnHoldout:
    """Keeps the weights that do best on held-out batches: their mean distillation loss from
    the teacher (KL at temperature 1), or without a teacher their task loss, measured at the
    start and after every epoch. `restore` loads the best (the start's included), so training
    never hands back a network worse on the held-out images than the one it was given."""

    def __init__(self, holdout: Iterable, teacher: nn.Module | None,
                 loss_fn: LossFn | None, output_transform: OutputTransform | None) -> None:
        B.check_iterable(holdout)
        self.holdout, self.teacher = holdout, teacher
        self.loss_fn, self.output_transform = loss_fn, output_transform
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.start: float | None = None  # the given network's score

    @torch.no_grad()
    def score(self, model: nn.Module) -> float:
        if self.teacher is None:  # labelled held-out batches: their task loss
            return evaluate(model, self.holdout, loss_fn=self.loss_fn,
                            output_transform=self.output_transform, progress_bar=False)["loss"]
        was, total, n = model.training, 0.0, 0
        model.eval()
        try:
            for x, _ in B.iterate(self.holdout, model_device(model)):
                out = outputs_of(model, x, self.output_transform).float()
                t_out = outputs_of(self.teacher, x, self.output_transform).float()
                total, n = total + float(kd_loss(out, t_out, 1.0)) * len(x), n + len(x)
        finally:
            model.train(was)
        if n == 0:
            raise CaprojError("holdout data is empty: it yielded no batch", param="holdout")
        return total / n

    def offer(self, model: nn.Module, epoch: int) -> float:
        """Score `model` after `epoch` epochs (0: the start) and keep it if it is the best."""
        s = self.score(model)
        if epoch == 0:
            self.start = s
        if self.best is None or s < self.best[0]:
            self.best = (s, epoch, copy.deepcopy(model.state_dict()))
        return s

    def restore(self, model: nn.Module) -> int:
        """Load the best weights into `model`; the epoch they were taken after."""
        assert self.best is not None
        model.load_state_dict(self.best[2])
        log.info("held-out distillation loss: best %.4f after epoch %d", self.best[0],
                 self.best[1])
        return self.best[1]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over `model`'s trainable parameters: weight decay on weights
    (dim > 1) only, and not on those the model's `no_weight_decay()` names (timm's
    convention); SGD (nesterov when momentum > 0) or AdamW."""
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) \
        else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 and name not in skip else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    if cfg.schedule == "onecycle" and total >= 4:  # shorter runs: one constant rate
        # warm-up over a quarter of the steps (at least two, which OneCycleLR needs)
        return torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total,
                                                   pct_start=max(0.25, 2 / total),
                                                   anneal_strategy="linear",
                                                   div_factor=10, final_div_factor=100)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def feature_layers_of(model: nn.Module, teacher: nn.Module) -> list[str]:
    """The layers a compression narrowed the input of but kept the output of (CaP's consumers,
    whose outputs its mixture loss reconstructs): convs and Linears named alike in `model` and
    `teacher`, of equal output width and a different weight shape."""
    tm = dict(teacher.named_modules())
    out = []
    for name, m in model.named_modules():
        t = tm.get(name)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and type(t) is type(m) and \
                m.weight.shape[0] == t.weight.shape[0] and m.weight.shape != t.weight.shape:
            out.append(name)
    return out


def planned_steps(data: Iterable, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per pass over `data`, steps `fit` will take with `cfg`): a re-iterable without
    len() is counted by one pass."""
    steps = B.steps_per_pass(data)
    if steps is None:
        steps = sum(1 for _ in data)
    if steps == 0:
        raise CaprojError("training data is empty: it yielded no batch", param="data")
    total = steps * cfg.epochs
    return steps, total if cfg.max_steps is None else min(total, cfg.max_steps)


def fit(model: nn.Module, data: Iterable, cfg: TrainConfig, *, teacher: nn.Module | None = None,
        eval_data: Iterable | None = None, loss_fn: LossFn | None = None,
        output_transform: OutputTransform | None = None,
        checkpoint: Checkpointer | None = None, progress_bar: bool = True,
        feature_layers: list[str] | None = None, eval_every: int = 1,
        holdout: Iterable | None = None) -> list[dict]:
    """Train `model` in place on the batches of `data`, `cfg.epochs` passes. Returns one
    record per epoch (train loss/accuracy, time, and test accuracy/loss when `eval_data`: after
    every `eval_every`-th epoch and the last).

    The loss is cross-entropy (or `loss_fn(outputs, y)`), mixed with distillation from
    `teacher` by `cfg.kd_weight`; batches without labels are distilled only (label-free).
    With `cfg.feature_weight` > 0, CaP's reconstruction term is added: the outputs of
    `feature_layers` (default `feature_layers_of(model, teacher)`) matched to the teacher's.
    With `holdout` (batches kept out of `data`), the weights that do best on it are returned,
    the start's included (`BestOnHoldout`); each record gets its `holdout_loss`.
    With a `checkpoint`, the whole training state is saved every `checkpoint.every` steps and
    on SIGTERM/SIGINT, and a resumed call continues from the saved step to the same result.
    On the CPU (glibc) it fixes the process's malloc thresholds (`utils.steady_allocator`):
    with a teacher, glibc's defaults fault every step's memory in again (30,000 page faults a
    step on ResNet-56, 10 % slower; benchmarks/train_allocator.py).
    """
    cfg.validate()
    B.check_iterable(data)
    if cfg.kd_weight > 0 and teacher is None:
        raise CaprojError("kd_weight > 0 needs a teacher model", param="teacher")
    taps = None
    if cfg.feature_weight > 0:
        if teacher is None:
            raise CaprojError("feature_weight > 0 needs a teacher model", param="teacher")
        names = feature_layers_of(model, teacher) if feature_layers is None else feature_layers
        if not names:
            raise CaprojError("feature_weight > 0 but no feature layers: none has the same "
                              "output width in the model and the teacher and a changed "
                              "input; pass feature_layers=[...]", param="feature_layers")
        taps = Taps(model, teacher, names)
        log.info("feature reconstruction on %d layers, weight %g", len(names),
                 cfg.feature_weight)
    try:
        return Fit(model, data, cfg, teacher=teacher, loss_fn=loss_fn,
                   output_transform=output_transform, checkpoint=checkpoint,
                   progress_bar=progress_bar, taps=taps,
                   keeper=BestOnHoldout(holdout, teacher, loss_fn, output_transform)
                   if holdout is not None else None).run(eval_data, max(1, int(eval_every)))
    finally:
        if taps is not None:
            taps.remove()


@dataclass
class Tally:
    """One epoch's running numbers (saved with a mid-epoch state)."""

    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    labelled: int = 0  # images whose labels were read
    seconds: float = 0.0


@dataclass
class FitState:
    """Where a training run is: the next step, epoch and batch, the finished epochs' records
    and the current epoch's tally."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    history: list[dict] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)


class Fit:
    """One training run of `fit`: the optimiser, schedule, (DDP, compiled) forward and EMA,
    built once; `run` trains epoch by epoch from a fresh or a resumed `FitState`."""

    def __init__(self, model: nn.Module, data: Iterable, cfg: TrainConfig, *,
                 teacher: nn.Module | None, loss_fn: LossFn | None,
                 output_transform: OutputTransform | None, checkpoint: Checkpointer | None,
                 progress_bar: bool, taps: Taps | None,
                 keeper: BestOnHoldout | None = None) -> None:
        seed_everything(cfg.seed)
        self.model, self.data, self.cfg, self.teacher = model, data, cfg, teacher
        self.loss_fn, self.output_transform = loss_fn, output_transform
        self.checkpoint, self.progress_bar, self.taps = checkpoint, progress_bar, taps
        self.keeper = keeper
        self.device = model_device(model)
        if self.device.type == "cpu":
            steady_allocator()
        self.bf16 = bf16_supported(self.device) if cfg.bf16 is None else cfg.bf16
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.steps_per_epoch, self.total = planned_steps(data, cfg)
        self.opt = make_optimizer(model, cfg)
        self.sched = make_scheduler(self.opt, cfg, self.total)
        if dist.world() > 1:  # torchrun: each rank trains on its shard of the global batch
            self.net: nn.Module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.net = model
        self.fwd = torch.compile(self.net) if cfg.compile else self.net
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema),
                                  use_buffers=True) if cfg.ema > 0 else None)
        if teacher is not None:
            teacher.eval()
        self.checked = False  # the labels of the first batch are checked against the outputs

    def restore(self) -> FitState:
        st = self.checkpoint.load() if self.checkpoint is not None else None
        if st is None:
            return FitState()
        self.model.load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        set_rng_state(st["rng"])
        if self.keeper is not None:
            self.keeper.best, self.keeper.start = st.get("best"), st.get("holdout_start")
        return FitState(st["step"], st["epoch"], st["batch"], st["history"],
                        Tally(**{"labelled": st["partial"]["seen"], **st["partial"]}))

    def save(self, st: FitState, t0: float) -> None:
        assert self.checkpoint is not None
        self.checkpoint.save(st.step, {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "sched": self.sched.state_dict(), "history": st.history, "epoch": st.epoch,
            "batch": st.batch, "rng": rng_state(),
            "best": self.keeper.best if self.keeper is not None else None,
            "holdout_start": self.keeper.start if self.keeper is not None else None,
            "partial": dataclasses.asdict(dataclasses.replace(
                st.tally, seconds=time.perf_counter() - t0))})

    def run(self, eval_data: Iterable | None, eval_every: int) -> list[dict]:
        st = self.restore()
        first_epoch = st.epoch
        if self.keeper is not None and self.keeper.best is None:
            self.keeper.offer(self.averaged(), 0)
        for epoch in range(first_epoch, self.cfg.epochs):
            if st.step >= self.total:
                break
            if epoch != first_epoch:
                st.batch, st.tally = 0, Tally()
            st.epoch = epoch
            rec = self.epoch(st)
            if eval_data is not None and ((epoch + 1) % eval_every == 0 or
                                          st.step >= self.total or epoch + 1 == self.cfg.epochs):
                rec.update(self.test(eval_data))
            if self.keeper is not None:
                rec["holdout_loss"] = self.keeper.offer(self.averaged(), epoch + 1)
            st.history.append(rec)
            log.info("epoch %d: train loss %.4f%s%s%s (%.0f s, %.0f img/s)", epoch + 1,
                     rec["train_loss"],
                     f", train acc {rec['train_acc']:.2f}%" if rec["train_acc"] is not None
                     else "", f", test acc {rec['test_acc']:.2f}%" if "test_acc" in rec else "",
                     f" (raw weights {rec['test_acc_raw']:.2f}%)" if "test_acc_raw" in rec
                     else "", rec["seconds"], rec["images_per_s"])
        if self.ema is not None:
            self.model.load_state_dict(self.ema.module.state_dict())
        if self.keeper is not None and self.keeper.best is not None:
            best = self.keeper.restore(self.model)
            if st.history:
                st.history[-1].update(holdout_best_epoch=best,
                                      holdout_start_loss=self.keeper.start)
        if self.cfg.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        return st.history  # the caller removes the checkpoint's state once the result is saved

    def averaged(self) -> nn.Module:
        """The network training hands back: the average with `ema`, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def epoch(self, st: FitState) -> dict[str, Any]:
        """Train from `st` to the end of its epoch (or the step budget); the epoch's record."""
        cfg, t = self.cfg, st.tally
        self.net.train()
        if cfg.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        skip = st.batch - B.set_epoch(self.data, st.epoch, st.batch)
        t0 = time.perf_counter() - t.seconds
        sharded = getattr(self.data, "sharded", False)  # caproj's streamed shares
        bar = progress(B.iterate(self.data, self.device),
                       min(self.steps_per_epoch - st.batch, self.total - st.step),
                       f"epoch {st.epoch + 1}/{cfg.epochs}", self.progress_bar)
        for x, y in bar:
            if skip > 0:  # resumed mid-epoch over data that cannot skip by itself
                skip -= 1
                continue
            if not sharded:  # torchrun: each rank takes its share of the global batch
                x = dist.shard(x)
                y = dist.shard(y) if y is not None else None
            loss, out = self.train_step(x, y, st)
            st.step, st.batch = st.step + 1, st.batch + 1
            t.seen += len(x)
            t.loss_sum += loss.item() * len(x)
            if y is not None and out.dim() == 2 and y.dim() == 1:
                t.correct += (out.argmax(1) == y).sum().item()
                t.labelled += len(x)
            if self.checkpoint is not None and self.checkpoint.due(st.step):
                self.save(st, t0)
            if st.step >= self.total or st.batch >= self.steps_per_epoch:
                break
        if dist.world() > 1:  # the epoch's numbers over the global batches
            tot = dist.all_reduce_(torch.tensor([t.seen, t.loss_sum, t.correct, t.labelled],
                                                dtype=torch.float64, device=self.device))
            t.seen, t.loss_sum, t.correct = int(tot[0]), float(tot[1]), int(tot[2])
            t.labelled = int(tot[3])
        return {"epoch": st.epoch + 1, "train_loss": t.loss_sum / max(t.seen, 1),
                # over the batches that had labels; None for label-free training
                "train_acc": 100.0 * t.correct / t.labelled if t.labelled else None,
                "seconds": time.perf_counter() - t0,
                "images_per_s": t.seen / (time.perf_counter() - t0)}

    def train_step(self, x: torch.Tensor, y: torch.Tensor | None, st: FitState
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on (this rank's share of) a batch; (its loss, the model's
        outputs)."""
        cfg = self.cfg
        if cfg.augment and y is None and x.dim() == 4:
            x = augment_images(x, cfg.seed * 1_000_003 + st.step)
        if cfg.mixup > 0 and y is None and x.dim() >= 2 and x.is_floating_point():
            x = mix_images(x, cfg.mixup, cfg.seed * 1_000_033 + st.step)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = outputs_of(self.fwd, x, self.output_transform).float()
            if self.loss_fn is None and not self.checked:
                check_targets(out, y)
                self.checked = True
            t_out = None
            if self.teacher is not None and (cfg.kd_weight > 0 or y is None or self.taps):
                with torch.no_grad():
                    t_out = outputs_of(self.teacher, x, self.output_transform).float()
            loss, _ = task_loss(out, y, t_out, kd=cfg.kd_weight, temperature=cfg.kd_temperature,
                                loss_fn=self.loss_fn, label_smoothing=cfg.label_smoothing)
            if self.taps is not None:
                loss = loss + cfg.feature_weight * reconstruction(self.taps.pairs(),
                                                                  self.taps.names)
        check_finite(loss, step=st.step, what="loss", detail=f" (epoch {st.epoch + 1})",
                     advice=f"lower the learning rate lr (now {self.sched.get_last_lr()[0]:.4g})",
                     param="lr", inputs=x, checkpoint=self.checkpoint)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss, out

    def test(self, eval_data: Iterable) -> dict[str, float]:
        """Test accuracy and loss (of the EMA weights, and of the raw ones, with `ema`)."""
        rec: dict[str, float] = {}
        kw = {"loss_fn": self.loss_fn, "output_transform": self.output_transform,
              "progress_bar": self.progress_bar}
        if self.ema is not None:  # the raw weights' accuracy too, to show what averaging adds
            rec["test_acc_raw"] = evaluate(self.model, eval_data, **kw)["acc"]
        rec.update({f"test_{k}": v for k, v in evaluate(
            self.ema.module if self.ema is not None else self.model, eval_data, **kw).items()
            if k != "n"})
        return rec
