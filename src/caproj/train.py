"""Train / fine-tune / evaluate.

Fast on a small CPU by design (measured in benchmarks/train_throughput.py): data stays resident as
uint8 tensors with batched augmentation, convolutions run channels_last, and the forward/backward
runs under bf16 autocast where the processor supports it (BatchNorm and the loss stay float32).
Evaluation runs in float32 so reported accuracies are exact.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from caproj import dist
from caproj.data import Batches, Data
from caproj.errors import CaprojError
from caproj.resume import Checkpointer, rng_state, set_rng_state
from caproj.utils import seed_everything


@dataclass
class TrainConfig:
    epochs: int = 3
    lr: float = 0.02
    batch_size: int = 128
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
    max_steps: int | None = None  # stop early (tests, smoke runs)
    # BatchNorm keeps its running statistics while training (affine still learned), so the
    # network being fine-tuned is exactly the one that was evaluated (no batch-statistics shift)
    freeze_bn: bool = False
    # exponential moving average of the weights (and BN statistics), decay per step; 0 = off.
    # The averaged network is what is evaluated and returned.
    ema: float = 0.0

    def validate(self) -> None:
        if self.epochs < 0:
            raise CaprojError(f"epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CaprojError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise CaprojError(f"schedule must be onecycle, cosine or constant, "
                              f"got {self.schedule!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise CaprojError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if not 0 <= self.label_smoothing < 1:
            raise CaprojError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.kd_weight <= 1:
            raise CaprojError(f"kd weight must be in [0, 1], got {self.kd_weight}")
        if not 0 <= self.ema < 1:
            raise CaprojError(f"ema decay must be in [0, 1), got {self.ema}")
        if self.batch_size < 1:
            raise CaprojError(f"batch size must be >= 1, got {self.batch_size}")


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


def progress(iterable, total: int, desc: str):
    return tqdm(iterable, total=total, desc=desc, leave=False,
                disable=not sys.stderr.isatty() or not dist.is_main(), dynamic_ncols=True)


@torch.no_grad()
def evaluate(model: nn.Module, splits: Data, batch_size: int = 500,
             max_batches: int | None = None) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on the test split, float32, eval mode."""
    device = model_device(model)
    was = model.training
    model.eval()
    batches = Batches.test_of(splits, batch_size, device=device)
    correct, loss, n = 0, 0.0, 0
    total = len(batches) if max_batches is None else min(max_batches, len(batches))
    for i, (x, y) in enumerate(progress(batches, total, "eval")):
        if i == total:
            break
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was)
    return {"acc": 100.0 * correct / n, "loss": loss / n, "n": n}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(total, 1),
                                                   pct_start=0.25, anneal_strategy="linear",
                                                   div_factor=10, final_div_factor=100)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def train(model: nn.Module, splits: Data, cfg: TrainConfig, teacher: nn.Module | None = None,
          log: Callable[[str], None] = print, eval_each_epoch: bool = True,
          checkpoint: Checkpointer | None = None) -> list[dict]:
    """Train `model` in place on `splits.train`. Returns one record per epoch.

    With a `checkpoint`, the whole training state is saved every `checkpoint.every` steps and on
    SIGTERM/SIGINT, and a resumed call continues from the saved step to the same result.
    """
    cfg.validate()
    if cfg.kd_weight > 0 and teacher is None:
        raise CaprojError("kd_weight > 0 needs a teacher model")
    seed_everything(cfg.seed)
    device = model_device(model)
    use_bf16 = bf16_supported(device) if cfg.bf16 is None else cfg.bf16
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    batches = Batches.train_of(splits, cfg.batch_size, seed=cfg.seed, device=device,
                               channels_last=cfg.channels_last)
    steps_per_epoch = len(batches)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.momentum > 0)
    sched = make_scheduler(opt, cfg, total)
    if dist.world() > 1:  # torchrun: each rank trains on its shard of the global batch
        dist.check_divisible(cfg.batch_size)
        net: nn.Module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    fwd = torch.compile(net) if cfg.compile else net
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    if teacher is not None:
        teacher.eval()
    history: list[dict] = []
    step, first_epoch, first_batch = 0, 0, 0
    partial = {"seen": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0}
    st = checkpoint.load() if checkpoint is not None else None
    if st is not None:
        model.load_state_dict(st["model"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        history, partial = st["history"], st["partial"]
        step, first_epoch, first_batch = st["step"], st["epoch"], st["batch"]
        set_rng_state(st["rng"])
    for epoch in range(first_epoch, cfg.epochs):
        if step >= total:
            break
        net.train()
        if cfg.freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        start = first_batch if epoch == first_epoch else 0
        batches.set_epoch(epoch, start)
        if start == 0:
            partial = {"seen": 0, "loss_sum": 0.0, "correct": 0, "seconds": 0.0}
        t0 = time.perf_counter() - partial["seconds"]
        seen, loss_sum, correct = partial["seen"], partial["loss_sum"], partial["correct"]
        bar = progress(batches, min(steps_per_epoch - start, total - step),
                       f"epoch {epoch + 1}/{cfg.epochs}")
        for i, (x, y) in enumerate(bar, start=start):
            if not batches.sharded:  # torchrun: each rank takes its share of the global batch
                x, y = dist.shard(x), dist.shard(y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = fwd(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
                if cfg.kd_weight > 0:
                    with torch.no_grad():
                        t_out = teacher(x).float()  # type: ignore[misc]
                    loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_loss(
                        out.float(), t_out, cfg.kd_temperature)
            if dist.any_rank(not torch.isfinite(loss)):
                last = (f"; last good state: {checkpoint.path} (step "
                        f"{step - step % checkpoint.every})" if checkpoint is not None
                        and checkpoint.path is not None and checkpoint.path.exists() else "")
                raise CaprojError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; "
                                  f"lower the learning rate (now {sched.get_last_lr()[0]:.4g})"
                                  f"{last}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            if checkpoint is not None and checkpoint.due(step):
                checkpoint.save(step, {
                    "model": model.state_dict(), "opt": opt.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "sched": sched.state_dict(), "history": history, "epoch": epoch,
                    "batch": i + 1, "rng": rng_state(),
                    "partial": {"seen": seen, "loss_sum": loss_sum, "correct": correct,
                                "seconds": time.perf_counter() - t0}})
            if step >= total:
                break
        if dist.world() > 1:  # the epoch's numbers over the global batches
            tot = dist.all_reduce_(torch.tensor([seen, loss_sum, correct], dtype=torch.float64,
                                                device=device))
            seen, loss_sum, correct = int(tot[0]), float(tot[1]), int(tot[2])
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_acc": 100.0 * correct / max(seen, 1),
               "seconds": time.perf_counter() - t0,
               "images_per_s": seen / (time.perf_counter() - t0)}
        if eval_each_epoch:
            if ema is not None:  # the raw weights' accuracy too, to show what averaging adds
                rec["test_acc_raw"] = evaluate(model, splits)["acc"]
            rec.update({f"test_{k}": v for k, v in evaluate(
                ema.module if ema is not None else model, splits).items() if k != "n"})
        history.append(rec)
        log(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}, train acc "
            f"{rec['train_acc']:.2f}%" + (f", test acc {rec['test_acc']:.2f}%"
                                          if eval_each_epoch else "")
            + (f" (raw weights {rec['test_acc_raw']:.2f}%)" if "test_acc_raw" in rec else "")
            + f" ({rec['seconds']:.0f} s, {rec['images_per_s']:.0f} img/s)")
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history  # the caller removes the checkpoint's state once the result is saved


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
