"""The losses CaP's optimisation (`caproj.cap`) and training (`caproj.train.fit`) share.

- `task_loss`: the task loss (cross-entropy or the user's `loss_fn`) mixed with distillation
  from a teacher; batches without labels are distilled only (label-free).
- `kd_loss`: distillation, averaged over every prediction (each pixel of a dense output too).
- `Taps` + `reconstruction`: the outputs of matching layers in a student and a teacher, and
  their mean relative squared error (CaP's reconstruction term).
- `check_finite`: the one guard against a loss that became NaN or infinite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caproj import dist
from caproj.errors import CaprojError
from caproj.resume import Checkpointer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OutputTransform = Callable[[object], torch.Tensor]


def logits_of(out: Any, output_transform: OutputTransform | None = None) -> torch.Tensor:
    """A model's output as a tensor of logits (through `output_transform` for tuple/dict
    outputs)."""
    if output_transform is not None:
        out = output_transform(out)
    if not isinstance(out, torch.Tensor):
        raise CaprojError(f"the model returns {type(out).__name__}, not a tensor of logits; "
                          f"pass output_transform=... to pick the logits", param="output_transform")
    return out


def outputs_of(model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor,
               output_transform: OutputTransform | None = None) -> torch.Tensor:
    """The model's logits for `x` (through `output_transform` for tuple/dict outputs)."""
    return logits_of(model(x), output_transform)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Distillation at temperature `t`: KL(teacher || student) over the class dimension (1),
    averaged over every prediction (each image; each pixel of a dense (N, C, H, W) output, as
    the per-pixel cross-entropy it is mixed with is), times t^2."""
    if student.dim() > 2:  # dense outputs: one prediction per position
        student = student.movedim(1, -1).reshape(-1, student.shape[1])
        teacher = teacher.movedim(1, -1).reshape(-1, teacher.shape[1])
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                    reduction="batchmean", log_target=True) * t * t


def check_targets(out: torch.Tensor, y: torch.Tensor | None) -> None:
    """Class-index labels must index the model's outputs (checked on a loop's first batch:
    out of range, cross-entropy fails with an IndexError on the CPU and a device assert on a
    GPU). Labels of another kind (a custom `loss_fn`'s) are left alone; -100 is ignored."""
    if y is None or y.is_floating_point() or y.dtype == torch.bool or out.dim() < 2 or \
            y.numel() == 0 or y.dim() != out.dim() - 1:
        return
    valid = y[y != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= out.shape[1]):
        raise CaprojError(f"labels must be class indices in [0, {out.shape[1]}) for a model "
                          f"with {out.shape[1]} outputs; the first batch has labels from "
                          f"{int(valid.min())} to {int(valid.max())}", param="data")


def task_loss(out: torch.Tensor, y: torch.Tensor | None, teacher_out: torch.Tensor | None, *,
              kd: float, temperature: float, loss_fn: LossFn | None = None,
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mixed loss, the plain task loss): (1 - kd) task + kd KD(teacher), the task loss
    being cross-entropy or `loss_fn(out, y)`. Without labels (`y` None) both are the
    distillation from the teacher alone."""
    if y is None:
        if teacher_out is None:
            raise CaprojError("the training data has no labels: it needs a teacher to distil "
                              "from", param="teacher")
        d = kd_loss(out, teacher_out, temperature)
        return d, d
    task = loss_fn(out, y) if loss_fn is not None else \
        F.cross_entropy(out, y, label_smoothing=label_smoothing)
    if kd > 0:
        assert teacher_out is not None
        return (1 - kd) * task + kd * kd_loss(out, teacher_out, temperature), task
    return task, task


def relative_error(student: torch.Tensor, teacher: torch.Tensor, over_ranks: bool = False
                   ) -> torch.Tensor:
    """||s - t||^2 / ||t||^2; `over_ranks`: the denominator summed over the processes of a
    torchrun job (each rank's numerator then adds up to the global error)."""
    den = teacher.pow(2).sum().detach()
    if over_ranks:
        den = dist.all_reduce_(den)
    return (student - teacher).pow(2).sum() / den.clamp_min(1e-12)


class Taps:
    """Forward hooks that keep the latest output of layer `names[i]` of a student and of a
    teacher network (a name may repeat). Use as a context manager, or call `remove`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, names: Sequence[str]) -> None:
        sm, tm = dict(student.named_modules()), dict(teacher.named_modules())
        missing = [n for n in names if n not in sm or n not in tm]
        if missing:
            raise CaprojError(f"feature layers not in both the model and the teacher: "
                              f"{', '.join(missing[:5])}", param="feature_layers")
        self.names = list(names)
        self.student: list[torch.Tensor | None] = [None] * len(names)
        self.teacher: list[torch.Tensor | None] = [None] * len(names)
        self._hooks = []
        for i, n in enumerate(self.names):
            self._hooks.append(sm[n].register_forward_hook(self._keep(self.student, i)))
            self._hooks.append(tm[n].register_forward_hook(self._keep(self.teacher, i)))

    @staticmethod
    def _keep(into: list[torch.Tensor | None], i: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            into[i] = output
        return hook

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student output, teacher output) per tap, as float32, from the latest forwards."""
        if any(t is None for t in self.student + self.teacher):
            raise CaprojError("a feature layer did not run in the forward pass",
                              param="feature_layers")
        return [(s.float(), t.float()) for s, t in zip(self.student, self.teacher,  # type: ignore[union-attr]
                                                       strict=True)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def reconstruction(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], names: Sequence[str],
                   over_ranks: bool = False) -> torch.Tensor:
    """Mean over layers of ||f - f_teacher||^2 / ||f_teacher||^2 (CaP's reconstruction
    term)."""
    terms = []
    for n, (s, t) in zip(names, pairs, strict=True):
        if s.shape != t.shape:
            raise CaprojError(f"feature layer {n}: output {tuple(s.shape)} in the model, "
                              f"{tuple(t.shape)} in the teacher", param="feature_layers")
        terms.append(relative_error(s, t, over_ranks))
    return torch.stack(terms).mean()


def check_finite(loss: torch.Tensor, *, step: int, what: str, advice: str, param: str,
                 detail: str = "", inputs: torch.Tensor | None = None,
                 checkpoint: Checkpointer | None = None) -> None:
    """Raise if `loss` is not finite on any rank: naming the inputs when they hold NaN or
    infinite values (then no learning rate is at fault), else the learning rate to lower and
    the last state saved."""
    if not dist.any_rank(not bool(torch.isfinite(loss))):
        return
    if inputs is not None and inputs.is_floating_point() and \
            not bool(torch.isfinite(inputs).all()):
        raise CaprojError(f"the input batch at step {step} holds NaN or infinite values; "
                          f"check the data", param="data")
    last = (f"; last good state: {checkpoint.path} (step {step - step % checkpoint.every})"
            if checkpoint is not None and checkpoint.path is not None
            and checkpoint.path.exists() else "")
    raise CaprojError(f"{what} became {loss.item()} at step {step}{detail}; {advice}{last}",
                      param=param)
