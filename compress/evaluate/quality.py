"""Quality of a compressed model against its original: perplexity, KL divergence, top-1 agreement.

Perplexity alone hides how far a compressed model has drifted (two models can share a perplexity
and disagree on every token), so :func:`compare_to_reference` also measures, per predicted
token, ``KL(P_original || P_compressed)`` and whether both models pick the same argmax.

Protocol: ``windows`` is an ``(n, seq_len)`` int64 tensor of token ids; each window is scored on
its own, position 0 is never predicted, so every window contributes ``seq_len - 1`` predictions.
Both models run batch by batch in one pass and only running float64 sums are kept: logits for a
49k vocabulary over many windows would not fit in memory.

The maths lives in small pure functions (:func:`token_nll`, :func:`token_kl`, :func:`top1_agree`);
the rest only batches, moves tensors and accumulates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, DataError
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "QualityMetrics",
    "compare_to_reference",
    "generation_sample",
    "perplexity",
    "safe_exp",
    "token_kl",
    "token_nll",
    "top1_agree",
]

# Positions scored at once: bounds the float32 (positions, vocab) temporaries to ~100 MB each at a
# 49k vocabulary, whatever the batch size and window length.
_CHUNK_POSITIONS = 512


@dataclass
class QualityMetrics:
    """Scores of one model on one set of windows, optionally against a reference model."""

    tokens: int
    """Predicted tokens scored: ``windows * (seq_len - 1)``."""
    windows: int
    seq_len: int
    perplexity: float
    """Of the model evaluated."""
    reference_perplexity: float | None = None
    """Of the original on the same windows; None without a reference."""
    kl_mean: float | None = None
    """Mean over tokens of ``KL(P_ref || P_model)``, nats per token."""
    top1_agreement: float | None = None
    """Fraction of predicted positions where both models' argmax agree."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityMetrics:
        """Inverse of :meth:`to_dict`; ignores keys it does not know (newer reports)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- maths ---------------------------------------------------------------------------------------


def token_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token.

    log_probs: (..., vocab) log-probabilities; targets: (...) int64 ids -> (...) NLL.
    """
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref_logits) || softmax(logits))`` per position, in nats.

    (..., vocab), (..., vocab) -> (...) float32. Computed in float32 whatever the inputs, so bf16
    logits do not turn rounding noise into divergence.
    """
    ref_log_probs = torch.log_softmax(ref_logits.float(), dim=-1)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return _kl_from_log_probs(ref_log_probs, log_probs)


def _kl_from_log_probs(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    ref_probs = ref_log_probs.exp()
    # A token the reference gives probability 0 (a -inf logit) contributes 0, not 0 * inf = nan.
    terms = torch.where(
        ref_probs > 0, ref_probs * (ref_log_probs - log_probs), torch.zeros_like(ref_probs)
    )
    return terms.sum(dim=-1)


def top1_agree(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether both argmaxes agree per position: (..., vocab), (..., vocab) -> (...) bool."""
    return ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def safe_exp(x: float) -> float:
    """``exp(x)``, but ``inf`` instead of OverflowError: a broken model has perplexity inf."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


# --- orchestration -------------------------------------------------------------------------------


@dataclass
class _Sums:
    """Running float64 sums over all scored tokens (python floats are float64)."""

    tokens: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows)
        raise DataError(
            f"evaluation windows must be a 2-D (n, seq_len) tensor of token ids, got {shape}",
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise DataError(f"evaluation windows must hold integer token ids, got {windows.dtype}")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise DataError(
            f"evaluation windows of shape {tuple(windows.shape)} predict no token",
            hint="use at least one window of at least 2 tokens (seq_len >= 2)",
        )
    return windows.long()


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Dropout off while scoring; each model's train/eval state restored afterwards."""
    states = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, state in zip(models, states, strict=True):
            model.train(state)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # (b, s) -> (b, s, vocab)
    output = model(input_ids=batch.to(_device_of(model)), use_cache=False)
    return output.logits


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(windows, batch_size))


def _chunks(batch: torch.Tensor) -> Iterator[tuple[int, slice]]:
    """(row, positions) slices of the predicting positions 0 .. seq_len-2 of a batch."""
    predicting = batch.shape[1] - 1
    for row in range(batch.shape[0]):
        for start in range(0, predicting, _CHUNK_POSITIONS):
            yield row, slice(start, min(start + _CHUNK_POSITIONS, predicting))


def _accumulate(
    sums: _Sums, batch: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor | None
) -> None:
    """Add one batch's scores to ``sums``; batch (b, s), logits (b, s, vocab)."""
    targets_all = batch.to(logits.device)
    if ref_logits is not None:
        if ref_logits.shape[-1] != logits.shape[-1]:
            raise CompressError(
                f"the model has a vocabulary of {logits.shape[-1]} logits but the reference has "
                f"{ref_logits.shape[-1]}",
                hint="compare a compressed model only with the model it was made from",
            )
        ref_logits = ref_logits.to(logits.device)
    for row, positions in _chunks(batch):
        # position p predicts token p + 1
        targets = targets_all[row, positions.start + 1 : positions.stop + 1]
        log_probs = torch.log_softmax(logits[row, positions].float(), dim=-1)
        sums.nll += token_nll(log_probs, targets).double().sum().item()
        sums.tokens += targets.numel()
        if ref_logits is None:
            continue
        ref_log_probs = torch.log_softmax(ref_logits[row, positions].float(), dim=-1)
        sums.ref_nll += token_nll(ref_log_probs, targets).double().sum().item()
        sums.kl += _kl_from_log_probs(ref_log_probs, log_probs).double().sum().item()
        # argmax of the raw logits: log_softmax's shift can round two distinct logits into a tie
        agree = top1_agree(ref_logits[row, positions], logits[row, positions])
        sums.agree += int(agree.sum().item())


def _evaluate(
    model: nn.Module,
    reference: nn.Module | None,
    windows: torch.Tensor,
    batch_size: int,
    progress: Progress,
    description: str,
) -> QualityMetrics:
    windows = _check_windows(windows)
    _check_batch_size(batch_size)
    batches = _batches(windows, batch_size)
    sums = _Sums()
    models = (model,) if reference is None else (model, reference)
    with _eval_mode(*models), torch.inference_mode():
        for batch in progress.track(batches, description, total=len(batches)):
            logits = _logits(model, batch)
            ref_logits = None if reference is None else _logits(reference, batch)
            _accumulate(sums, batch, logits, ref_logits)
            del logits, ref_logits
    metrics = QualityMetrics(
        tokens=sums.tokens,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        perplexity=safe_exp(sums.nll / sums.tokens),
    )
    if reference is not None:
        metrics.reference_perplexity = safe_exp(sums.ref_nll / sums.tokens)
        metrics.kl_mean = sums.kl / sums.tokens
        metrics.top1_agreement = sums.agree / sums.tokens
    return metrics


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> QualityMetrics:
    """Perplexity of ``model`` on ``windows`` (n, seq_len): exp of the mean next-token NLL.

    Use this when there is no original to compare with (e.g. ``compress eval`` on an export);
    the reference fields of the result are None.
    """
    return _evaluate(model, None, windows, batch_size, progress, "evaluate (ppl)")


def compare_to_reference(
    model: nn.Module,
    reference: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> QualityMetrics:
    """Perplexity of both models, ``KL(reference || model)`` and top-1 agreement, in one pass.

    Both models see each batch in turn, so only one batch of logits per model is alive at a
    time; the two may live on different devices (scores are computed on ``model``'s).
    """
    return _evaluate(model, reference, windows, batch_size, progress, "evaluate (ppl, KL)")


def generation_sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` (without the prompt), to show the model still talks.

    Greedy so that the original and the compressed model can be compared token for token.
    """
    encoded = tokenizer(prompt, return_tensors="pt")
    device = _device_of(model)
    input_ids = encoded["input_ids"].to(device)
    attention_mask = encoded.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id
    with _eval_mode(model), torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id,
        )
    # (1, prompt + new) -> the new tokens only
    new_tokens = output[0, input_ids.shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True))
