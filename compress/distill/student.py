"""Make a compressed model trainable for distillation, and put it back afterwards.

What the earlier passes left decides what trains:

* float weights (a pruned or untouched model) train as they are, in float32 for the duration
  (Adam steps below bf16's resolution would otherwise round away);
* quantized Linears keep their integer codes frozen and train their **scales**: the forward
  pre-hook rebuilds ``weight = dequantize(codes, scales, zeros)`` from a float32 scales parameter,
  so bits per weight are unchanged and the export writes the same codes with new scales;
* pruned weights keep their masks: gradients of pruned positions are zeroed and the weights are
  re-masked after every optimizer step, so the sparsity pattern survives training exactly;
* adapters an earlier pass attached (``lora_correct``, ``qwha``) train beside their frozen
  base layers: they become parameters named ``<module>.adapter_*`` with a forward hook
  (:mod:`compress.adapters.runtime`), and :meth:`Student.finish` writes them back into the
  :class:`~compress.ir.Adapter` records;
* ``train`` / ``freeze`` glob patterns (on parameter names) narrow the selection further
  (``train: ["*.adapter_*"]`` trains the adapters alone).

:meth:`Student.finish` writes the trained scales back into the
:class:`~compress.ir.QuantizedWeight` records, restores every tensor's original dtype and the
modules' ordinary ``weight`` parameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.adapters.runtime import ADAPTER_PREFIX, AdapterHooks
from compress.ir import QuantizedWeight, SparsityMask, get, get_quantized, set_quantized

__all__ = ["Student", "prepare_student"]

_SCALES = "quant_scales"


@dataclass
class _TrainedScales:
    module: nn.Linear
    record: QuantizedWeight
    hook: Any


@dataclass
class Student:
    """A model made trainable by :func:`prepare_student`; :meth:`finish` undoes it."""

    model: nn.Module
    dtypes: dict[str, torch.dtype]
    scales: dict[str, _TrainedScales] = field(default_factory=dict)
    masks: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    frozen_notes: list[str] = field(default_factory=list)
    adapters: AdapterHooks = field(default_factory=AdapterHooks)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Every parameter the optimizer updates, by qualified name (stable across runs)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def parameter_groups(
        self, lr: float, scale_lr: float, adapter_lr: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer groups: float weights at ``lr``, quantization scales at ``scale_lr``,
        adapters at ``adapter_lr`` (default ``lr``)."""
        weights: list[nn.Parameter] = []
        scales: list[nn.Parameter] = []
        adapters: list[nn.Parameter] = []
        for name, parameter in self.named_trainable().items():
            if name.endswith("." + _SCALES):
                scales.append(parameter)
            elif name.rpartition(".")[2].startswith(ADAPTER_PREFIX):
                adapters.append(parameter)
            else:
                weights.append(parameter)
        groups = []
        if weights:
            groups.append({"params": weights, "lr": lr, "name": "weights"})
        if scales:
            groups.append({"params": scales, "lr": scale_lr, "name": "scales", "weight_decay": 0.0})
        if adapters:
            rate = lr if adapter_lr is None else adapter_lr
            groups.append({"params": adapters, "lr": rate, "name": "adapters", "weight_decay": 0.0})
        return groups

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights again (after an optimizer step)."""
        for name, (parameter, mask) in self.masks.items():
            if mask.device != parameter.device:
                mask = mask.to(parameter.device)
                self.masks[name] = (parameter, mask)
            parameter.mul_(mask)

    def finish(self) -> None:
        """Write trained scales and adapters into their records; restore dtypes and plain
        weights."""
        for module in self.model.modules():
            module.train(False)
        self.adapters.close()
        for trained in self.scales.values():
            module, record = trained.module, trained.record
            trained.hook.remove()
            scales = module._parameters.pop(_SCALES)
            assert scales is not None
            record.scales = scales.detach().to(record.scales.dtype).cpu()
            if "weight" in module.__dict__:
                del module.__dict__["weight"]
            module.weight = nn.Parameter(torch.empty(record.shape), requires_grad=False)
            set_quantized(module, record)
        self.scales.clear()
        with torch.no_grad():
            for name, tensor in _named_tensors(self.model):
                dtype = self.dtypes.get(name)
                if dtype is not None and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        for parameter in self.model.parameters():
            parameter.requires_grad_(True)
            parameter.grad = None


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    return named


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns
    )


def _rebuild_weight(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: the weight from frozen codes and the trainable scales."""
    record = get_quantized(module)
    assert record is not None
    scales = getattr(module, _SCALES)
    codes = record.codes.to(scales.device)
    zeros = None if record.zeros is None else record.zeros.to(scales.device)
    module.__dict__["weight"] = record.fmt.dequantize(codes, scales, zeros, scales.dtype)


def prepare_student(
    model: nn.Module,
    *,
    train: Sequence[str] | None = None,
    freeze: Sequence[str] = (),
    quantized: str = "scales",
) -> Student:
    """Select and set up the trainable tensors of ``model`` (see the module docstring).

    ``train``: glob patterns of parameter (or module) names to train, default all;
    ``freeze``: patterns to keep fixed; ``quantized``: ``"scales"`` or ``"frozen"``.
    """
    student = Student(model, {name: t.dtype for name, t in _named_tensors(model)})
    shared = _shared_parameters(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.float()
    student.adapters.attach_all(model, parameters=True)  # trainable below, as train/freeze allow

    def wanted(name: str) -> bool:
        return (train is None or _matches(name, train)) and not _matches(name, freeze)

    quantized_params: set[int] = set()
    for name, module in model.named_modules():
        record = get_quantized(module)
        if record is None:
            continue
        quantized_params.add(id(module.weight))
        if quantized != "scales" or not wanted(name):
            continue
        if not isinstance(module, nn.Linear):
            student.frozen_notes.append(f"{name}: a quantized {type(module).__name__} stays frozen")
            continue
        if id(module.weight) in shared:
            student.frozen_notes.append(f"{name}: its quantized weight is tied; kept frozen")
            continue
        if not record.scales.is_floating_point():
            student.frozen_notes.append(
                f"{name}: format {record.fmt.label()} stores its scales as codes "
                f"({record.scales.dtype}); kept frozen"
            )
            continue
        scales = nn.Parameter(record.scales.to(torch.float32).clone())
        if not _differentiable(record, scales):
            student.frozen_notes.append(
                f"{name}: format {record.fmt.to_dict().get('kind')} has no differentiable "
                "dequantization; kept frozen"
            )
            continue
        del module.weight
        module.register_parameter(_SCALES, scales)
        hook = module.register_forward_pre_hook(_rebuild_weight)
        student.scales[name] = _TrainedScales(module, record, hook)

    for name, parameter in model.named_parameters():
        if name.endswith("." + _SCALES):
            continue
        if id(parameter) in quantized_params or not wanted(name):
            continue
        parameter.requires_grad_(True)

    for name, module in model.named_modules():
        mask = get(module, SparsityMask)
        weight = module._parameters.get("weight")
        if mask is None or weight is None or not weight.requires_grad:
            continue
        keep = mask.mask.to(device=weight.device, dtype=weight.dtype)
        weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device))
        student.masks[name] = (weight, keep)
    return student


def _shared_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters reachable under more than one name (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _differentiable(record: QuantizedWeight, scales: torch.Tensor) -> bool:
    """Whether the format's dequantization carries a gradient to the scales."""
    probe = record.fmt.dequantize(record.codes, scales, record.zeros, scales.dtype)
    return bool(probe.requires_grad)
