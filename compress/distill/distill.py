"""The ``distill`` pass: train the compressed model (the student) towards a teacher.

The teacher is the original model, or any model the recipe names that shares the tokenizer
(``teacher: HuggingFaceTB/SmolLM2-360M-Instruct``). The student is the model as the earlier
passes left it; what trains is decided by :mod:`compress.distill.student` (float weights,
quantization scales over frozen codes, masks kept). Training runs on ``accelerate``
(:mod:`compress.distill.trainer`), so the same recipe runs in one process, on a GPU, or under
``accelerate launch`` with several processes.

Data: ``samples`` windows of ``seq_len`` tokens from ``dataset`` (default: the recipe's
calibration dataset), and ``held_out`` more windows of the same split, disjoint from them, for
the held-out KL that drives early stopping and the training curve in the report.

Example recipe entry::

    passes:
      - {pass: prune, structure: layers, sparsity: 0.25}
      - {pass: distill, samples: 256, steps: 120, lr: 2.0e-4, max_minutes: 40}
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.data import calibration_batch
from compress.distill.losses import LossKind
from compress.distill.student import prepare_student
from compress.distill.trainer import History, TrainSettings, cpu_precision, train_student
from compress.errors import PassError
from compress.models import load_model
from compress.registry import PassConfig, PassContext, PassReport, register_pass

__all__ = ["DistillConfig", "distill"]


class DistillConfig(PassConfig):
    """Settings of the ``distill`` pass."""

    teacher: str | None = Field(
        default=None,
        description="model name or folder of the teacher; default: the original model",
    )
    loss: LossKind = Field(
        default="forward_kl", description="forward_kl, reverse_kl or jsd (generalized JSD, GKD)"
    )
    temperature: float = Field(default=1.0, gt=0, description="softens both distributions")
    beta: float = Field(default=0.5, gt=0, lt=1, description="jsd: weight of the teacher side")
    hidden_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of matching the last hidden state (through a learned projection "
        "when widths differ); 0 turns it off",
    )
    dataset: str | None = Field(
        default=None, description="training text; default: the recipe's calibration dataset"
    )
    samples: int = Field(default=256, gt=0, description="training windows")
    seq_len: int = Field(default=512, ge=8, description="tokens per window")
    held_out: int = Field(
        default=8, ge=0, description="held-out windows for KL evaluation (0: no evaluation)"
    )
    seed: int = Field(default=0, description="window choice and data order")
    steps: int | None = Field(
        default=None,
        gt=0,
        description="optimizer steps; default: one pass over the windows in one process (with "
        "N processes each step takes N times the windows)",
    )
    batch_size: int = Field(default=1, gt=0, description="windows per forward, per process")
    gradient_accumulation: int = Field(default=8, gt=0, description="forwards per step")
    lr: float = Field(default=1e-4, gt=0, description="learning rate of float weights")
    scale_lr: float = Field(default=1e-4, gt=0, description="learning rate of quantization scales")
    adapter_lr: float = Field(
        default=2e-4, gt=0, description="learning rate of adapters (lora_correct, qwha)"
    )
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    eval_every: int = Field(default=20, gt=0, description="steps between held-out evaluations")
    patience: int | None = Field(
        default=None, gt=0, description="stop after this many evaluations without improvement"
    )
    checkpoint_every: int = Field(default=20, gt=0, description="steps between checkpoints")
    max_minutes: float | None = Field(
        default=None, gt=0, description="stop training after this much wall time"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    teacher_top_k: int | None = Field(
        default=None,
        gt=0,
        description="cache the teacher's top-k log-probabilities of every window once (with "
        "the run's checkpoints) instead of running it every step",
    )
    on_policy: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="fraction of training windows the student continues itself (GKD's "
        "on-policy data): the window's first on_policy_prompt tokens are kept, the rest sampled "
        "from the student, and both models are scored on the result; 0: the dataset's text only",
    )
    on_policy_prompt: int | None = Field(
        default=None,
        gt=0,
        description="tokens of a window kept as the prompt of an on-policy sample; default: "
        "half the window",
    )
    quantized: Literal["scales", "frozen"] = Field(
        default="scales",
        description="quantized Linears: train their scales over frozen codes, or keep them",
    )
    train: list[str] | None = Field(
        default=None, description="glob patterns of parameter names to train; default: all"
    )
    freeze: list[str] = Field(default_factory=list, description="glob patterns to keep fixed")

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.teacher_top_k is not None and self.temperature != 1.0:
            raise ValueError(
                f"teacher_top_k {self.teacher_top_k} caches temperature-1 probabilities, but "
                f"temperature is {self.temperature}; drop one of them"
            )
        if self.teacher_top_k is not None and self.on_policy > 0:
            raise ValueError(
                f"teacher_top_k caches the teacher on the dataset's windows, but on_policy "
                f"{self.on_policy} scores it on the student's own samples; drop one of them"
            )
        if self.on_policy_prompt is not None and self.on_policy_prompt >= self.seq_len:
            raise ValueError(
                f"on_policy_prompt {self.on_policy_prompt} leaves nothing to sample in windows of "
                f"seq_len {self.seq_len}; use fewer prompt tokens"
            )
        if self.teacher_top_k is not None and self.hidden_weight > 0:
            raise ValueError(
                "teacher_top_k caches logits only, and hidden_weight > 0 needs the teacher's "
                "hidden states every step; drop one of them"
            )
        return self


def _settings(config: DistillConfig) -> TrainSettings:
    global_windows = config.batch_size * config.gradient_accumulation
    steps = config.steps or max(1, math.ceil(config.samples / global_windows))
    return TrainSettings(
        steps=steps,
        batch_size=config.batch_size,
        accumulation=config.gradient_accumulation,
        lr=config.lr,
        scale_lr=config.scale_lr,
        adapter_lr=config.adapter_lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        decay=config.decay,
        max_grad_norm=config.max_grad_norm,
        eval_every=config.eval_every,
        patience=config.patience,
        checkpoint_every=config.checkpoint_every,
        max_seconds=None if config.max_minutes is None else config.max_minutes * 60,
        loss=config.loss,
        temperature=config.temperature,
        beta=config.beta,
        hidden_weight=config.hidden_weight,
        mixed_precision=config.mixed_precision,
        gradient_checkpointing=config.gradient_checkpointing,
        optimizer=config.optimizer,
        teacher_top_k=config.teacher_top_k,
        on_policy=config.on_policy,
        on_policy_prompt=config.on_policy_prompt or config.seq_len // 2,
        seed=config.seed,
    )


def _teacher(config: DistillConfig, context: PassContext) -> nn.Module:
    if config.teacher is None:
        return context.teacher()
    context.progress.log(f"distill: loading the teacher {config.teacher}")
    model, _ = load_model(config.teacher, progress=context.progress)
    return model.eval()


def _vocab(model: nn.Module) -> int:
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", -1))


def _windows(config: DistillConfig, context: PassContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows: one seeded draw, split, so they never overlap."""
    if context.tokenizer is None:
        raise PassError(
            "distill needs the model's tokenizer to read its training text",
            hint="run it through compress apply, or Pipeline(..., tokenizer=...)",
        )
    dataset = config.dataset or context.calibration_source or "builtin:wiki"
    windows = calibration_batch(
        context.tokenizer, dataset, config.samples + config.held_out, config.seq_len, config.seed
    )
    return windows[: config.samples], windows[config.samples :]


@register_pass("distill", DistillConfig)
def distill(model: nn.Module, config: DistillConfig, context: PassContext) -> PassReport:
    """Teacher→student distillation of whatever the earlier passes left trainable."""
    if any(p.is_meta for p in model.parameters()):
        raise PassError(
            "distill trains every layer at once and needs the whole model in memory",
            hint="run without --offload (model.offload: false)",
        )
    train_windows, held_out = _windows(config, context)
    teacher = _teacher(config, context)
    if _vocab(teacher) != _vocab(model):
        raise PassError(
            f"distill: the teacher predicts {_vocab(teacher)} tokens, the student "
            f"{_vocab(model)}; they must share a tokenizer",
            hint="name a teacher of the same family and tokenizer",
        )
    settings = _settings(config)
    precision, precision_note = cpu_precision(settings.mixed_precision)
    if precision_note is not None:
        context.progress.log(f"distill: {precision_note}")
        settings = dataclasses.replace(settings, mixed_precision=precision)
    student = prepare_student(
        model, train=config.train, freeze=config.freeze, quantized=config.quantized
    )
    trainable = sum(p.numel() for p in student.named_trainable().values())
    context.progress.log(
        f"distill: {trainable:,} trainable parameters, {settings.steps} steps of "
        f"{config.batch_size * config.gradient_accumulation} windows × {config.seq_len} tokens"
    )
    start = time.perf_counter()
    try:
        history = train_student(
            student,
            teacher,
            train_windows,
            held_out,
            settings,
            checkpoint_dir=context.layers.pass_folder("distill"),
            resume=context.layers.resuming,
            progress=context.progress,
        )
    finally:
        student.finish()
    notes = student.frozen_notes + ([precision_note] if precision_note else [])
    return _report(history, notes, trainable, time.perf_counter() - start)


def _report(history: History, notes: list[str], trainable: int, seconds: float) -> PassReport:
    report = PassReport(name="distill", notes=list(notes))
    report.metrics.update(
        trainable_parameters=float(trainable),
        steps=float(history.step[-1] if history.step else 0),
        tokens=float(history.tokens),
        train_seconds=history.seconds,
        pass_seconds=seconds,
    )
    if history.eval_kl:
        report.metrics.update(
            held_out_kl_before=history.kl_before,
            held_out_kl_after=history.best_kl,
            best_step=float(history.best_step),
        )
    if history.stopped:
        report.notes.append(f"training ended: {history.stopped}")
    if history.resumed_at is not None:
        report.notes.append(f"resumed from the checkpoint at step {history.resumed_at}")
    report.series.update(
        step=[float(s) for s in history.step],
        loss=list(history.loss),
        eval_step=[float(s) for s in history.eval_step],
        eval_kl=list(history.eval_kl),
    )
    return report
