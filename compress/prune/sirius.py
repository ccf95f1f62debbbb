"""Sirius correction: the sparse model drafts, the full model checks and rolls back (greedy).

Sirius (Zhou et al., NeurIPS 2024, "Sirius: Contextual Sparsity with Correction for Efficient
LLMs") keeps the speed of contextual sparsity where it is harmless and calls the full model
only every ``period`` tokens: one parallel forward over the sparse model's recent tokens, like
the verification step of speculative decoding. From the first token the full model would not
have produced on, the drafts are dropped and the full model's token is taken; the KV cache is
cropped back to the verified tokens, whose entries the full forward has just rewritten with
dense ones (the sparse model's cache entries never outlive a check).

One model plays both parts: the :class:`compress.prune.contextual.ContextualLinear` projections
run sparse while drafting and dense under :func:`compress.prune.contextual.dense_mode`.

Acceptance is greedy by default (a draft must equal the full model's argmax), so the output is
the full model's greedy output whatever the sparsity (up to float rounding between one-token and
parallel forwards). ``min_prob`` relaxes it as the paper's likelihood criterion does: a draft the
full model gives at least that probability is kept, trading agreement for fewer rollbacks.

``draft_confidence`` ends a round of drafting early: after a draft to which the sparse model
itself gives less than that probability, the full model checks at once instead of after
``period`` drafts. The sparse model's wrong tokens are mostly its unsure ones, and every draft
after a wrong one is thrown away, so this saves the sparse steps a fixed period would waste,
without changing what is accepted (the output is still the full model's greedy output).

Invariant of the loop: the cache holds full-model entries for every verified token but the last
(the "pending" one, not yet fed to the model).

From Python::

    tokens, stats = sirius_generate(model, input_ids, max_new_tokens=64, period=8)

and through ``generate`` (batch 1, greedy)::

    model.generate(input_ids, max_new_tokens=64, custom_generate=sirius_decoding, sirius_period=8)

An export whose ``config.json`` carries ``contextual_sparsity.sirius.period`` does the latter by
default after ``import compress`` (its loader binds ``custom_generate``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from compress.errors import PassError
from compress.prune.contextual import CONFIG_KEY, dense_mode

__all__ = [
    "SiriusStats",
    "configured_draft_confidence",
    "configured_period",
    "sirius_decoding",
    "sirius_generate",
]


@dataclass
class SiriusStats:
    """What a Sirius generation spent: sparse steps, full-model checks (and the tokens they
    read), drafts kept and drafts rolled back."""

    sparse_steps: int = 0
    dense_checks: int = 0
    dense_tokens: int = 0
    accepted: int = 0
    rejected: int = 0  # drafts dropped (the corrected one and those after it)
    corrections: int = 0  # checks that rolled back
    early_checks: int = 0  # rounds ended by an unsure draft (draft_confidence)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _configured(model: nn.Module) -> dict[str, Any]:
    spec = getattr(getattr(model, "config", None), CONFIG_KEY, None) or {}
    sirius = spec.get("sirius") if isinstance(spec, dict) else None
    return sirius if isinstance(sirius, dict) else {}


def configured_period(model: nn.Module) -> int | None:
    """The Sirius period an export's ``config.json`` asks for, if any."""
    period = _configured(model).get("period")
    return int(period) if period else None


def configured_draft_confidence(model: nn.Module) -> float | None:
    """The ``draft_confidence`` an export's ``config.json`` asks for, if any."""
    confidence = _configured(model).get("draft_confidence")
    return float(confidence) if confidence else None


def _logits(model: nn.Module, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    out = model(input_ids=tokens, past_key_values=cache, use_cache=True)
    return out.logits[0].float()  # (tokens, vocab)


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the cache entries of the first ``length`` positions (rollback)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative count removes that many from the end


@torch.no_grad()
def sirius_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    period: int,
    eos_token_id: int | list[int] | None = None,
    min_prob: float | None = None,
    draft_confidence: float | None = None,
) -> tuple[torch.Tensor, SiriusStats]:
    """Greedy generation with Sirius correction; returns (1, prompt + new) ids and the stats.

    ``input_ids`` (1, prompt) with at least one token; ``period`` drafts between checks, or
    fewer: a check follows at once a draft the sparse model gives less than
    ``draft_confidence`` (None: never); ``min_prob`` (None: exact greedy) keeps a draft the full
    model gives at least that probability."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise PassError(
            f"Sirius generation takes one non-empty sequence, got input shape "
            f"{tuple(input_ids.shape)}",
            hint="generate one prompt at a time",
        )
    if period < 1:
        raise PassError(f"Sirius period must be at least 1, got {period}")
    if draft_confidence is not None and not 0.0 < draft_confidence < 1.0:
        raise PassError(
            f"Sirius draft_confidence must be between 0 and 1, got {draft_confidence}",
            hint="a probability such as 0.5; None never checks early",
        )
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    stats = SiriusStats()
    cache = DynamicCache()
    tokens: list[int] = input_ids[0].tolist()
    prompt = len(tokens)
    with dense_mode(model):  # the prompt is read by the full model: its entries are verified
        logits = _logits(model, input_ids, cache)
    stats.dense_checks += 1
    stats.dense_tokens += prompt
    tokens.append(int(logits[-1].argmax()))
    device = input_ids.device

    def done() -> bool:
        return len(tokens) - prompt >= max_new_tokens or tokens[-1] in stops

    while not done():
        verified = len(tokens)
        budget = max_new_tokens - (verified - prompt)
        drafts: list[int] = []
        feed = tokens[-1]
        while len(drafts) < min(period, budget):
            step = torch.tensor([[feed]], device=device)
            scores = _logits(model, step, cache)[-1]  # (vocab,)
            feed = int(scores.argmax())
            stats.sparse_steps += 1
            drafts.append(feed)
            if feed in stops:
                break
            unsure = draft_confidence is not None and len(drafts) < min(period, budget)
            if unsure and float(scores.softmax(-1)[feed]) < float(draft_confidence or 0):
                stats.early_checks += 1
                break
        _crop_to(cache, verified - 1)  # drop the sparse entries: pending token onwards
        check = torch.tensor([[tokens[-1], *drafts]], device=device)
        with dense_mode(model):
            full = _logits(model, check, cache)  # (1 + drafts, vocab)
        stats.dense_checks += 1
        stats.dense_tokens += check.shape[1]
        best = full.argmax(dim=-1).tolist()
        probs = full.softmax(dim=-1) if min_prob is not None else None
        kept = 0
        for position, draft in enumerate(drafts):
            fine = draft == best[position] or (
                probs is not None and float(probs[position, draft]) >= float(min_prob or 0)
            )
            if not fine:
                break
            kept += 1
        tokens.extend(drafts[:kept])
        stats.accepted += kept
        if kept < len(drafts):
            stats.corrections += 1
            stats.rejected += len(drafts) - kept
        if not done():  # the full model's next token: a correction, or a bonus after all drafts
            tokens.append(best[kept])
        _crop_to(cache, len(tokens) - 1)
    return torch.tensor([tokens[: prompt + max_new_tokens]], device=device), stats


def sirius_decoding(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    sirius_period: int | None = None,
    sirius_min_prob: float | None = None,
    sirius_draft_confidence: float | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """A ``custom_generate`` callable for ``model.generate``: greedy, batch 1, Sirius.

    ``sirius_period`` and ``sirius_draft_confidence`` default to the export's configured ones
    (else period 8, no early checks). Only
    ``max_new_tokens`` / ``max_length`` and ``eos_token_id`` of the generation config are used;
    sampling is refused."""
    if generation_config is not None and getattr(generation_config, "do_sample", False):
        raise PassError(
            "Sirius generation is greedy; do_sample=True is not supported",
            hint="call generate with do_sample=False",
        )
    period = sirius_period or configured_period(model) or 8
    max_length = getattr(generation_config, "max_length", None) or input_ids.shape[1] + 20
    new = getattr(generation_config, "max_new_tokens", None) or max_length - input_ids.shape[1]
    eos = getattr(generation_config, "eos_token_id", None)
    tokens, _ = sirius_generate(
        model,
        input_ids,
        max_new_tokens=int(new),
        period=int(period),
        eos_token_id=eos,
        min_prob=sirius_min_prob,
        draft_confidence=sirius_draft_confidence or configured_draft_confidence(model),
    )
    if streamer is not None:
        streamer.put(tokens[:, input_ids.shape[1] :].cpu())
        streamer.end()
    return tokens
