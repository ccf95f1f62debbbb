"""The distillation loop, on ``accelerate``: one CPU process, one GPU, or many processes.

The same code runs in a plain process and under ``accelerate launch`` (DDP; gloo on CPU, NCCL on
GPUs). What keeps runs comparable and resumable:

* **Data order** comes from a generator seeded per epoch, not from a sampler's state: the
  global batch of step ``s`` is the same windows whatever the number of processes, each process
  taking its slice, so one process with gradient accumulation ``k·n`` and ``n`` processes with
  ``k`` see the same batches and, gradients being averaged, take the same steps.
* **Checkpoints** hold the trainable tensors, the optimizer and schedule states, the history and
  the early-stopping state, written atomically every ``checkpoint_every`` steps and at the end;
  a resumed run continues at the next step and, on CPU, ends with bit-identical weights.
* **Evaluation** is forward KL (teacher ‖ student) on held-out windows, every ``eval_every``
  steps and before the first, split across processes and summed; with ``patience`` the run stops
  after that many evaluations without improvement and keeps the best weights seen.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from compress.distill.losses import LossKind, TopK, distillation_loss, top_k_of
from compress.distill.student import Student
from compress.errors import PassError
from compress.utils.native import bf16_arithmetic
from compress.utils.progress import NullProgress, Progress

__all__ = ["History", "TrainSettings", "train_student"]

_CHECKPOINT = "distill-state.pt"


Precision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainSettings:
    """How to train (see :class:`compress.distill.distill.DistillConfig` for each key)."""

    steps: int
    batch_size: int = 1
    accumulation: int = 8
    lr: float = 1e-4
    scale_lr: float = 1e-4
    adapter_lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    eval_every: int = 20
    patience: int | None = None
    checkpoint_every: int = 20
    max_seconds: float | None = None
    loss: LossKind = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    hidden_weight: float = 0.0
    mixed_precision: Precision = "no"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    teacher_top_k: int | None = None
    on_policy: float = 0.0
    on_policy_prompt: int = 0
    seed: int = 0

    def resumable_key(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be continued (not the time budget)."""
        return {k: v for k, v in asdict(self).items() if k not in ("max_seconds", "patience")}


@dataclass
class History:
    """The training curve and how the run ended."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_kl: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    best_step: int = 0
    best_kl: float = math.inf
    bad_evals: int = 0
    stopped: str = ""
    resumed_at: int | None = None

    @property
    def kl_before(self) -> float:
        return self.eval_kl[0] if self.eval_kl else math.nan


class _Distillee(nn.Module):
    """The student plus what trains beside it (a hidden-state projection), wrapped as one
    module so that DDP synchronises every trainable tensor."""

    def __init__(self, student: nn.Module, projection: nn.Linear | None) -> None:
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        want_hidden = self.projection is not None
        out = self.student(input_ids=input_ids, use_cache=False, output_hidden_states=want_hidden)
        hidden = None
        if self.projection is not None:
            hidden = self.projection(out.hidden_states[-1])
        return out.logits, hidden


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None)
    if not isinstance(width, int):
        raise PassError("distill: hidden-state matching needs config.hidden_size on both models")
    return width


def _schedule_factor(settings: TrainSettings, step: int) -> float:
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.decay == "constant":
        return 1.0
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    if settings.decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise PassError(
                "distill: optimizer adamw_8bit needs bitsandbytes, which is not installed",
                hint="pip install bitsandbytes (it runs on CPU too), or use optimizer: adamw",
            ) from None
        return bnb.optim.AdamW8bit(groups, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def _window_indices(step: int, count: int, settings: TrainSettings, world: int) -> torch.Tensor:
    """The windows of global batch ``step`` (all processes), in process-slice order."""
    size = settings.batch_size * settings.accumulation * world
    positions = torch.arange(step * size, (step + 1) * size)
    epochs = positions // count
    picked = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(
            count, generator=torch.Generator().manual_seed(settings.seed + epoch)
        )
        where = epochs == epoch
        picked[where] = order[positions[where] % count]
    return picked


def _micro_batches(
    step: int, count: int, settings: TrainSettings, world: int, rank: int
) -> list[torch.Tensor]:
    """This process's micro-batches of ``step``: micro-batch ``m`` of process ``r`` is the slice
    ``(m·world + r)·batch`` of the global batch, so the union over processes and micro-batches
    is the same for any split of ``accumulation × world``."""
    indices = _window_indices(step, count, settings, world)
    b = settings.batch_size
    return [
        indices[(m * world + rank) * b : (m * world + rank + 1) * b]
        for m in range(settings.accumulation)
    ]


class _TeacherCache:
    """Top-k teacher log-probabilities of every training window, computed once."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        self.values = values
        self.indices = indices

    def batch(self, picked: torch.Tensor, device: torch.device) -> TopK:
        return TopK(self.values[picked].to(device), self.indices[picked].to(device))


def _build_cache(
    teacher: nn.Module,
    windows: torch.Tensor,
    k: int,
    device: torch.device,
    folder: Path | None,
    accelerator: Any,
    progress: Progress,
) -> _TeacherCache:
    """Compute (or read back) the top-``k`` cache; with a shared folder each process computes
    its share and the files are exchanged, otherwise every process computes all of it."""
    from safetensors.torch import load_file, save_file

    world, rank = accelerator.num_processes, accelerator.process_index
    shared = folder is not None
    mine = range(rank, len(windows), world) if shared else range(len(windows))
    paths = (
        [] if folder is None else [folder / f"teacher-top{k}-{r}.safetensors" for r in range(world)]
    )
    values = torch.empty(*windows.shape, k, dtype=torch.float32)
    indices = torch.empty(*windows.shape, k, dtype=torch.int64)
    if not (shared and paths[rank].is_file()):
        for i in progress.track(list(mine), f"teacher top-{k} cache"):
            with torch.no_grad():
                logits = teacher(input_ids=windows[i : i + 1].to(device), use_cache=False).logits
            top = top_k_of(logits[0], k)
            values[i], indices[i] = top.values.cpu(), top.indices.cpu()
        if shared:
            assert folder is not None
            folder.mkdir(parents=True, exist_ok=True)
            rows = list(mine)
            tmp = paths[rank].with_suffix(".tmp")
            save_file(
                {"rows": torch.tensor(rows), "values": values[rows], "indices": indices[rows]},
                str(tmp),
            )
            os.replace(tmp, paths[rank])
    if shared:
        accelerator.wait_for_everyone()
        for path in paths:
            part = load_file(str(path))
            values[part["rows"]], indices[part["rows"]] = part["values"], part["indices"]
    return _TeacherCache(values, indices)


@contextmanager
def _gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not enabled or enable is None:
        yield
        return
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()  # type: ignore[operator]


def train_student(
    student: Student,
    teacher: nn.Module,
    train_windows: torch.Tensor,
    held_out: torch.Tensor,
    settings: TrainSettings,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> History:
    """Train ``student`` towards ``teacher`` on ``train_windows`` (n, seq_len) token ids.

    Returns the history; the student's trainable tensors hold the best (by held-out KL, when
    there are held-out windows) or the last weights.
    """
    accelerator = _accelerator(settings)
    progress = progress if progress is not None and accelerator.is_main_process else NullProgress()
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    teacher_device = next(teacher.parameters()).device
    teacher.eval().to(device)
    projection = None
    if settings.hidden_weight > 0:
        torch.manual_seed(settings.seed)
        projection = nn.Linear(_width(student.model), _width(teacher), bias=False)
        if _width(student.model) == _width(teacher):
            nn.init.eye_(projection.weight)
    distillee = _Distillee(student.model, projection).to(device)
    groups = student.parameter_groups(settings.lr, settings.scale_lr, settings.adapter_lr)
    if projection is not None:
        groups.append({"params": list(projection.parameters()), "lr": settings.lr, "name": "proj"})
    if not groups:
        raise PassError(
            "distill: nothing to train (every parameter is frozen or quantized without scales)",
            hint="check the pass's train / freeze patterns and quantized: scales",
        )
    optimizer = _optimizer(groups, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _schedule_factor(settings, step)
    )
    trainable = student.named_trainable()
    history = History()
    best: dict[str, torch.Tensor] | None = None
    start = 0
    path = None if checkpoint_dir is None else checkpoint_dir / _CHECKPOINT
    if resume and path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["settings"] != settings.resumable_key():
            raise PassError(
                f"distill --resume: the checkpoint {path} was made with other settings",
                hint="rerun without --resume to start over",
            )
        _load_tensors(trainable, projection, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history = History(**state["history"])
        best = state["best"]
        start = state["step"]
        history.resumed_at = start
        progress.log(f"distill: resuming at step {start} of {settings.steps}")

    ddp_model, optimizer = accelerator.prepare(distillee, optimizer)
    cache = None
    if settings.teacher_top_k:
        cache = _build_cache(
            teacher,
            train_windows,
            settings.teacher_top_k,
            device,
            checkpoint_dir,
            accelerator,
            progress,
        )

    def evaluate(step: int) -> None:
        kl = _held_out_kl(distillee, teacher, held_out, device, world, rank, accelerator)
        history.eval_step.append(step)
        history.eval_kl.append(kl)
        nonlocal best
        if kl < history.best_kl:
            history.best_kl, history.best_step, history.bad_evals = kl, step, 0
            best = _snapshot(trainable, projection)
        else:
            history.bad_evals += 1
        rate = history.tokens / history.seconds if history.seconds else 0.0
        last = f"loss {history.loss[-1]:.4f}, " if history.loss else ""
        progress.log(
            f"distill step {step}/{settings.steps}: {last}held-out KL {kl:.4f} "
            f"(best {history.best_kl:.4f} at step {history.best_step}), {rate:.0f} tokens/s"
        )

    def save(step: int, finished: bool) -> None:
        if path is None:
            return
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "step": step,
                "finished": finished,
                "settings": settings.resumable_key(),
                "trainable": _snapshot(trainable, projection),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "history": asdict(history),
                "best": best,
            }
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        accelerator.wait_for_everyone()

    finished = bool(history.stopped)
    with _gradient_checkpointing(student.model, settings.gradient_checkpointing):
        if not finished and start == 0 and len(held_out):
            evaluate(0)
        clock = time.perf_counter()
        seconds_before, tokens_before = history.seconds, history.tokens
        describe = getattr(progress, "describe", None)
        # a checkpoint of a finished run (resumed after the pass, e.g. in a later pass) trains
        # no further
        remaining = range(start, start if finished else settings.steps)
        for step in progress.track(remaining, "distill", total=len(remaining)):
            if finished:
                break
            torch.manual_seed(settings.seed + step)  # dropout, if any, independent of resuming
            distillee.train()
            micro = _micro_batches(step, len(train_windows), settings, world, rank)
            total = torch.zeros((), device=device)
            for m, picked in enumerate(micro):
                last = m == len(micro) - 1
                batch = train_windows[picked].to(device)
                if settings.on_policy > 0:
                    batch = _on_policy(student.model, batch, picked, step, settings, accelerator)
                sync = nullcontext() if last else accelerator.no_sync(ddp_model)
                with sync, accelerator.autocast():
                    logits, hidden = ddp_model(batch)
                    loss = _loss(logits, hidden, batch, picked, teacher, cache, settings, device)
                    accelerator.backward(loss / settings.accumulation)
                total += loss.detach() / settings.accumulation
            if settings.max_grad_norm is not None:
                accelerator.clip_grad_norm_(distillee.parameters(), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            student.apply_masks()
            history.step.append(step + 1)
            history.loss.append(float(accelerator.reduce(total, "mean")))
            history.tokens += (
                train_windows.shape[1] * settings.batch_size * settings.accumulation * world
            )
            history.seconds = seconds_before + time.perf_counter() - clock
            if describe is not None:
                rate = (history.tokens - tokens_before) / max(
                    history.seconds - seconds_before, 1e-9
                )
                describe(f"distill · loss {history.loss[-1]:.4f} · {rate:.0f} tokens/s")
            done = step + 1
            if len(held_out) and (done % settings.eval_every == 0 or done == settings.steps):
                evaluate(done)
                if settings.patience is not None and history.bad_evals >= settings.patience:
                    history.stopped = (
                        f"early stop: {history.bad_evals} evaluations without improvement"
                    )
            if not history.stopped and _over_budget(history.seconds, settings, accelerator, device):
                history.stopped = f"time budget of {settings.max_seconds:.0f} s spent"
                if len(held_out) and history.eval_step[-1] != done:
                    evaluate(done)
            finished = bool(history.stopped) or done == settings.steps
            if not history.stopped and done == settings.steps:
                history.stopped = "all steps done"
            if finished or done % settings.checkpoint_every == 0:
                save(done, finished)
    if best is not None and len(held_out):
        _load_tensors(trainable, projection, best)
    teacher.to(teacher_device)
    student.model.to("cpu")
    return history


def _accelerator(settings: TrainSettings) -> Any:
    """An ``Accelerator`` for this pass's settings.

    accelerate keeps one process-wide state and refuses a second ``Accelerator`` with other
    settings (a second ``distill`` pass with another ``mixed_precision``, in the same process):
    that state is cleared first, keeping the process group (``PartialState``) as it is. Without
    an accelerator, processes started by ``accelerate launch`` / torchrun are CPU ranks over
    gloo (accelerate would otherwise treat each as a lone process).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=not _has_accelerator())


def cpu_precision(requested: Precision) -> tuple[Precision, str | None]:
    """The mixed precision training runs in, and a note when it is not the one requested.

    bf16 autocast on a CPU without bf16 arithmetic (AVX512-BF16 or AMX) is emulated by
    conversions around fp32 kernels: on a 2-core Zen 3 EPYC one distill step of SmolLM2 (4 x 512
    tokens) took about 8 minutes in bf16 (docs/distillation.md has the fp32 figure). There the
    pass trains in fp32, which only rounds less, and says so. GPUs and bf16 CPUs are unchanged."""
    if requested != "bf16" or _has_accelerator() or bf16_arithmetic():
        return requested, None
    return "no", (
        "mixed_precision bf16 ran as fp32: this CPU has no bf16 arithmetic (AVX512-BF16 or "
        "AMX), where emulated bf16 training is many times slower than fp32"
    )


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    probe = getattr(torch, "accelerator", None)
    return bool(probe is not None and probe.is_available())


def _on_policy(
    model: nn.Module,
    batch: torch.Tensor,
    picked: torch.Tensor,
    step: int,
    settings: TrainSettings,
    accelerator: Any,
) -> torch.Tensor:
    """``batch`` with the windows drawn for on-policy data continued by the student itself.

    Each window decides and samples with a generator seeded by (seed, step, window index), one
    window at a time: the same windows get the same samples whatever the process layout, and a
    resumed run repeats them.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise PassError(
            "distill: on_policy samples with the student, which FSDP holds in shards",
            hint="use DDP (accelerate launch --multi_gpu) or one process for on_policy > 0",
        )
    prompt = settings.on_policy_prompt
    out = batch.clone()
    was_training = model.training
    model.eval()
    try:
        for row, index in enumerate(picked.tolist()):
            seed = (settings.seed * 1_000_003 + step) * 1_000_003 + index
            coin = torch.rand((), generator=torch.Generator().manual_seed(seed))
            if float(coin) >= settings.on_policy:
                continue
            torch.manual_seed(seed)  # generate() samples from the global generator
            with torch.no_grad():
                sample = cast(Any, model).generate(
                    input_ids=batch[row : row + 1, :prompt],
                    attention_mask=torch.ones_like(batch[row : row + 1, :prompt]),
                    max_new_tokens=batch.shape[1] - prompt,
                    min_new_tokens=batch.shape[1] - prompt,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=int(batch[row, 0]),
                )
            out[row] = sample[0, : batch.shape[1]]
    finally:
        model.train(was_training)
    return out


def _loss(
    logits: torch.Tensor,
    hidden: torch.Tensor | None,
    batch: torch.Tensor,
    picked: torch.Tensor,
    teacher: nn.Module,
    cache: _TeacherCache | None,
    settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    want_hidden = hidden is not None
    target: torch.Tensor | TopK
    teacher_hidden = None
    if cache is not None and not want_hidden:
        target = cache.batch(picked, device)
    else:
        with torch.no_grad():
            out = teacher(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
        target = out.logits if cache is None else cache.batch(picked, device)
        if want_hidden:
            teacher_hidden = out.hidden_states[-1].float()
    loss = distillation_loss(
        logits, target, kind=settings.loss, temperature=settings.temperature, beta=settings.beta
    )
    if hidden is not None and teacher_hidden is not None:
        scale = teacher_hidden.pow(2).mean().clamp_min(1e-12)
        loss = (
            loss + settings.hidden_weight * (hidden.float() - teacher_hidden).pow(2).mean() / scale
        )
    return loss


@torch.no_grad()
def _held_out_kl(
    distillee: _Distillee,
    teacher: nn.Module,
    held_out: torch.Tensor,
    device: torch.device,
    world: int,
    rank: int,
    accelerator: Any,
) -> float:
    """Mean forward KL per position over the held-out windows (all processes together)."""
    distillee.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(rank, len(held_out), world):
        window = held_out[i : i + 1].to(device)
        logits = distillee.student(input_ids=window, use_cache=False).logits
        target = teacher(input_ids=window, use_cache=False).logits
        per_position = distillation_loss(logits, target) * logits.shape[1]
        sums[0] += float(per_position)
        sums[1] += logits.shape[1]
    sums = accelerator.reduce(sums, "sum")
    distillee.train()
    return float(sums[0] / sums[1].clamp_min(1))


def _over_budget(
    seconds: float, settings: TrainSettings, accelerator: Any, device: torch.device
) -> bool:
    """Whether the time budget is spent, agreed by all processes (any one over stops all)."""
    if settings.max_seconds is None:
        return False
    over = torch.tensor(float(seconds > settings.max_seconds), device=device)
    return bool(accelerator.reduce(over, "sum") > 0)


def _snapshot(
    trainable: dict[str, nn.Parameter], projection: nn.Linear | None
) -> dict[str, torch.Tensor]:
    state = {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}
    if projection is not None:
        state["<projection>"] = projection.weight.detach().to("cpu", copy=True)
    return state


@torch.no_grad()
def _load_tensors(
    trainable: dict[str, nn.Parameter], projection: nn.Linear | None, state: dict[str, torch.Tensor]
) -> None:
    missing = set(trainable) - set(state)
    if missing:
        raise PassError(
            f"distill --resume: the checkpoint lacks {len(missing)} trainable tensor(s), e.g. "
            f"{sorted(missing)[0]}",
            hint="rerun without --resume to start over",
        )
    for name, parameter in trainable.items():
        parameter.copy_(state[name])
    if projection is not None and "<projection>" in state:
        projection.weight.copy_(state["<projection>"])
