"""The engine: train / fine-tune (`fit`) and `evaluate` over any iterable of batches.

Fast on a small CPU by design (measured in benchmarks/train_throughput.py): convolutions run
channels_last, and the forward/backward runs under bf16 autocast where the processor supports it
(BatchNorm and the loss stay float32). caproj's own data sources keep images resident as uint8
tensors with batched augmentation; a user's DataLoader is read as it is. Evaluation runs in
float32 so reported accuracies are exact.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
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
from caproj.resume import Checkpointer, rng_state, set_rng_state
from caproj.utils import seed_everything, steady_allocator

log = logging.getLogger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OutputTransform = Callable[[object], torch.Tensor]


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


def outputs_of(model: nn.Module, x: torch.Tensor,
               output_transform: OutputTransform | None = None) -> torch.Tensor:
    """The model's logits for `x` (through `output_transform` for tuple/dict outputs)."""
    out = model(x)
    if output_transform is not None:
        out = output_transform(out)
    if not isinstance(out, torch.Tensor):
        raise CaprojError(f"the model returns {type(out).__name__}, not a tensor of logits; "
                          f"pass output_transform=... to pick the logits", param="output_transform")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, *, loss_fn: LossFn | None = None,
             output_transform: OutputTransform | None = None, max_batches: int | None = None,
             progress_bar: bool = True) -> dict[str, float]:
    """Top-1 accuracy (%), mean loss (cross-entropy or `loss_fn`) and image count over labelled
    batches, float32, eval mode (the model's mode is restored)."""
    device = model_device(model)
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    total = B.steps_per_pass(data)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    B.set_epoch(data, 0)
    try:
        for i, (x, y) in enumerate(progress(B.iterate(data, device), total, "eval",
                                            progress_bar)):
            if max_batches is not None and i == max_batches:
                break
            if y is None:
                raise CaprojError("evaluation needs labelled batches (x, y); the data yields "
                                  "inputs only", param="data")
            out = outputs_of(model, x, output_transform).float()
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


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Distillation at temperature `t`: KL(teacher || student) over the class dimension (1),
    averaged over every prediction (each image; each pixel of a dense (N, C, H, W) output, as
    the per-pixel cross-entropy it is mixed with is), times t^2."""
    if student.dim() > 2:  # dense outputs: one prediction per position
        student = student.movedim(1, -1).reshape(-1, student.shape[1])
        teacher = teacher.movedim(1, -1).reshape(-1, teacher.shape[1])
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def augment_images(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A batch of images (N, C, H, W), each shifted by up to 1/8 of its side (zero padding)
    and flipped left-right at random; seeded, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed)
    return random_flip(random_crop(x, max(1, min(x.shape[-2:]) // 8), g), g)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over `model`'s trainable parameters: weight decay on weights
    (dim > 1) only; SGD (nesterov when momentum > 0) or AdamW."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
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


def _feature_hooks(model: nn.Module, teacher: nn.Module, names: list[str]
                   ) -> tuple[list[Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    mm, tm = dict(model.named_modules()), dict(teacher.named_modules())
    missing = [n for n in names if n not in mm or n not in tm]
    if missing:
        raise CaprojError(f"feature layers not in both the model and the teacher: "
                          f"{', '.join(missing[:5])}", param="feature_layers")
    got_s: dict[str, torch.Tensor] = {}
    got_t: dict[str, torch.Tensor] = {}
    hooks = [mm[n].register_forward_hook(lambda m, i, o, n=n: got_s.__setitem__(n, o))
             for n in names]
    hooks += [tm[n].register_forward_hook(lambda m, i, o, n=n: got_t.__setitem__(n, o))
              for n in names]
    return hooks, got_s, got_t


def feature_loss(got_s: dict[str, torch.Tensor], got_t: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Mean over layers of ||f - f_teacher||^2 / ||f_teacher||^2 (CaP's reconstruction term)."""
    terms = []
    for n, t in got_t.items():
        s, t = got_s[n].float(), t.float()
        if s.shape != t.shape:
            raise CaprojError(f"feature layer {n}: output {tuple(s.shape)} in the model, "
                              f"{tuple(t.shape)} in the teacher", param="feature_layers")
        terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def fit(model: nn.Module, data: Iterable, cfg: TrainConfig, *, teacher: nn.Module | None = None,
        eval_data: Iterable | None = None, loss_fn: LossFn | None = None,
        output_transform: OutputTransform | None = None,
        checkpoint: Checkpointer | None = None, progress_bar: bool = True,
        feature_layers: list[str] | None = None, eval_every: int = 1) -> list[dict]:
    """Train `model` in place on the batches of `data`, `cfg.epochs` passes. Returns one
    record per epoch (train loss/accuracy, time, and test accuracy/loss when `eval_data`: after
    every `eval_every`-th epoch and the last).

    The loss is cross-entropy (or `loss_fn(outputs, y)`), mixed with distillation from
    `teacher` by `cfg.kd_weight`; batches without labels are distilled only (label-free).
    With `cfg.feature_weight` > 0, CaP's reconstruction term is added: the outputs of
    `feature_layers` (default `feature_layers_of(model, teacher)`) matched to the teacher's.
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
    feat_hooks: list[Any] = []
    if cfg.feature_weight > 0:
        if teacher is None:
            raise CaprojError("feature_weight > 0 needs a teacher model", param="teacher")
        names = feature_layers_of(model, teacher) if feature_layers is None else feature_layers
        if not names:
            raise CaprojError("feature_weight > 0 but no feature layers: none has the same "
                              "output width in the model and the teacher and a changed "
                              "input; pass feature_layers=[...]", param="feature_layers")
        feat_hooks, got_s, got_t = _feature_hooks(model, teacher, names)
        log.info("feature reconstruction on %d layers, weight %g", len(names),
                 cfg.feature_weight)
    try:
        return _fit(model, data, cfg, teacher, eval_data, loss_fn, output_transform,
                    checkpoint, progress_bar, (got_s, got_t) if feat_hooks else None,
                    max(1, int(eval_every)))
    finally:
        for h in feat_hooks:
            h.remove()


def _fit(model: nn.Module, data: Iterable, cfg: TrainConfig, teacher: nn.Module | None,
         eval_data: Iterable | None, loss_fn: LossFn | None,
         output_transform: OutputTransform | None, checkpoint: Checkpointer | None,
         progress_bar: bool,
         feats: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None,
         eval_every: int = 1) -> list[dict]:
    seed_everything(cfg.seed)
    device = model_device(model)
    if device.type == "cpu":
        steady_allocator()
    use_bf16 = bf16_supported(device) if cfg.bf16 is None else cfg.bf16
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    steps_per_epoch = B.steps_per_pass(data)
    if steps_per_epoch is None:  # a re-iterable without len(): count one pass
        steps_per_epoch = sum(1 for _ in data)
    if steps_per_epoch == 0:
        raise CaprojError("training data is empty: it yielded no batch", param="data")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total)
    if dist.world() > 1:  # torchrun: each rank trains on its shard of the global batch
        net: nn.Module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = model
    fwd = torch.compile(net) if cfg.compile else net
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    if teacher is not None:
        teacher.eval()
    sharded = getattr(data, "sharded", False)  # caproj's streamed batches are already shares
    history: list[dict] = []
    step, first_epoch, first_batch = 0, 0, 0
    partial = {"seen": 0, "loss_sum": 0.0, "correct": 0, "labelled": 0, "seconds": 0.0}
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
        skip = start - B.set_epoch(data, epoch, start)
        if start == 0:
            partial = {"seen": 0, "loss_sum": 0.0, "correct": 0, "labelled": 0, "seconds": 0.0}
        t0 = time.perf_counter() - partial["seconds"]
        seen, loss_sum, correct = partial["seen"], partial["loss_sum"], partial["correct"]
        labelled = partial.get("labelled", seen)  # images whose labels were read
        bar = progress(B.iterate(data, device), min(steps_per_epoch - start, total - step),
                       f"epoch {epoch + 1}/{cfg.epochs}", progress_bar)
        i = start - 1
        for x, y in bar:
            if skip > 0:  # resumed mid-epoch over data that cannot skip by itself
                skip -= 1
                continue
            i += 1
            if not sharded:  # torchrun: each rank takes its share of the global batch
                x = dist.shard(x)
                y = dist.shard(y) if y is not None else None
            if cfg.augment and y is None and x.dim() == 4:
                x = augment_images(x, cfg.seed * 1_000_003 + step)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = outputs_of(fwd, x, output_transform).float()
                if teacher is not None and (cfg.kd_weight > 0 or y is None or feats):
                    with torch.no_grad():
                        t_out = outputs_of(teacher, x, output_transform).float()
                if y is None:  # label-free: distillation only
                    if teacher is None:
                        raise CaprojError("the training data has no labels: fine-tuning "
                                          "needs a teacher to distil from", param="teacher")
                    loss = kd_loss(out, t_out, cfg.kd_temperature)
                else:
                    loss = (loss_fn(out, y) if loss_fn is not None else
                            F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing))
                    if cfg.kd_weight > 0:
                        loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_loss(
                            out, t_out, cfg.kd_temperature)
                if feats is not None:
                    loss = loss + cfg.feature_weight * feature_loss(*feats)
            if dist.any_rank(not torch.isfinite(loss)):
                last = (f"; last good state: {checkpoint.path} (step "
                        f"{step - step % checkpoint.every})" if checkpoint is not None
                        and checkpoint.path is not None and checkpoint.path.exists() else "")
                raise CaprojError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; "
                                  f"lower the learning rate lr (now "
                                  f"{sched.get_last_lr()[0]:.4g}){last}", param="lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            seen += len(x)
            loss_sum += loss.item() * len(x)
            if y is not None and out.dim() == 2 and y.dim() == 1:
                correct += (out.argmax(1) == y).sum().item()
                labelled += len(x)
            if checkpoint is not None and checkpoint.due(step):
                checkpoint.save(step, {
                    "model": model.state_dict(), "opt": opt.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "sched": sched.state_dict(), "history": history, "epoch": epoch,
                    "batch": i + 1, "rng": rng_state(),
                    "partial": {"seen": seen, "loss_sum": loss_sum, "correct": correct,
                                "labelled": labelled,
                                "seconds": time.perf_counter() - t0}})
            if step >= total or i + 1 >= steps_per_epoch:
                break
        if dist.world() > 1:  # the epoch's numbers over the global batches
            tot = dist.all_reduce_(torch.tensor([seen, loss_sum, correct, labelled],
                                                dtype=torch.float64, device=device))
            seen, loss_sum, correct = int(tot[0]), float(tot[1]), int(tot[2])
            labelled = int(tot[3])
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               # over the batches that had labels; None for label-free training
               "train_acc": 100.0 * correct / labelled if labelled else None,
               "seconds": time.perf_counter() - t0,
               "images_per_s": seen / (time.perf_counter() - t0)}
        if eval_data is not None and ((epoch + 1) % eval_every == 0 or step >= total
                                      or epoch + 1 == cfg.epochs):
            if ema is not None:  # the raw weights' accuracy too, to show what averaging adds
                rec["test_acc_raw"] = evaluate(model, eval_data, loss_fn=loss_fn,
                                               output_transform=output_transform,
                                               progress_bar=progress_bar)["acc"]
            rec.update({f"test_{k}": v for k, v in evaluate(
                ema.module if ema is not None else model, eval_data, loss_fn=loss_fn,
                output_transform=output_transform, progress_bar=progress_bar).items()
                if k != "n"})
        history.append(rec)
        log.info("epoch %d: train loss %.4f%s%s%s (%.0f s, %.0f img/s)", epoch + 1,
                 rec["train_loss"],
                 f", train acc {rec['train_acc']:.2f}%" if rec["train_acc"] is not None else "",
                 f", test acc {rec['test_acc']:.2f}%" if "test_acc" in rec else "",
                 f" (raw weights {rec['test_acc_raw']:.2f}%)" if "test_acc_raw" in rec else "",
                 rec["seconds"], rec["images_per_s"])
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history  # the caller removes the checkpoint's state once the result is saved
