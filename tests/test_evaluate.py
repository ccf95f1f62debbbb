"""Quality metrics: the pure maths on hand-computable cases, the orchestration on a tiny Llama."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import compress.evaluate.quality as evaluate
from compress.errors import CompressError, DataError
from compress.evaluate.quality import (
    QualityMetrics,
    compare_to_reference,
    generation_sample,
    perplexity,
    safe_exp,
    token_kl,
    token_nll,
    top1_agree,
)

T = TypeVar("T")

VOCAB = 256


def tiny_llama(seed: int = 0, **overrides: float) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def perturbed(model: LlamaForCausalLM) -> LlamaForCausalLM:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in other.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.3 * parameter.std() * noise)
    return other


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (7, 17), generator=generator)  # (n, seq_len)


# --- maths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (4, 5), (2, 3, 11)])
def test_token_kl_is_zero_for_identical_logits(shape: tuple[int, ...]) -> None:
    logits = torch.randn(shape) * 3
    kl = token_kl(logits, logits.clone())
    assert kl.shape == shape[:-1]
    torch.testing.assert_close(kl, torch.zeros(shape[:-1]), atol=1e-6, rtol=0)


def test_token_kl_matches_hand_computed_three_way() -> None:
    # P = (1/2, 1/4, 1/4), Q = (1/4, 1/2, 1/4):
    # KL(P||Q) = 1/2 ln 2 + 1/4 ln(1/2) + 0 = ln(2) / 4; KL(Q||P) = ln(2) / 4 as well by symmetry
    # of this pair, so also check an asymmetric pair below.
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    kl = token_kl(p.log() + 7.0, q.log() - 3.0)  # softmax is shift-invariant
    assert kl.item() == pytest.approx(math.log(2) / 4, rel=1e-6)

    # P = (0.8, 0.1, 0.1), Q = (1/3, 1/3, 1/3): KL(P||Q) = sum p ln(3p); KL(Q||P) differs.
    p = torch.tensor([0.8, 0.1, 0.1])
    uniform = torch.zeros(3)
    expected = 0.8 * math.log(2.4) + 2 * 0.1 * math.log(0.3)
    assert token_kl(p.log(), uniform).item() == pytest.approx(expected, rel=1e-6)
    reverse = sum(1 / 3 * math.log((1 / 3) / pi) for pi in (0.8, 0.1, 0.1))
    assert token_kl(uniform, p.log()).item() == pytest.approx(reverse, rel=1e-6)


def test_token_kl_is_nonnegative() -> None:
    generator = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 50, generator=generator) * 4
    other = torch.randn(64, 50, generator=generator) * 4
    assert (token_kl(ref, other) >= 0).all()


def test_token_kl_ignores_tokens_the_reference_rules_out() -> None:
    ref = torch.tensor([0.0, 0.0, -math.inf])
    other = torch.tensor([0.0, 0.0, 5.0])
    kl = token_kl(ref, other)
    # P = (1/2, 1/2, 0), Q ∝ (1, 1, e^5): KL = ln((2 + e^5) / 2)
    assert kl.item() == pytest.approx(math.log((2 + math.exp(5)) / 2), rel=1e-6)


def test_token_kl_computes_in_float32_for_half_inputs() -> None:
    logits = torch.randn(4, 10).to(torch.bfloat16)
    assert token_kl(logits, logits).dtype == torch.float32


def test_token_nll_picks_the_target_log_probability() -> None:
    log_probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]).log()
    targets = torch.tensor([1, 2])
    torch.testing.assert_close(
        token_nll(log_probs, targets), torch.tensor([math.log(4), -math.log(0.8)])
    )


def test_top1_agree() -> None:
    ref = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 9.0, 0.0], [0.0, 1.0, 0.0]])
    assert top1_agree(ref, other).tolist() == [True, False]


def test_safe_exp_overflows_to_inf() -> None:
    assert safe_exp(1.0) == pytest.approx(math.e)
    assert safe_exp(1e6) == math.inf


# --- on a tiny Llama -------------------------------------------------------------------------


def test_perplexity_equals_exp_of_hf_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    with torch.no_grad():
        losses = [model(row[None], labels=row[None]).loss.item() for row in windows]
    # every window has seq_len - 1 predictions, so the token mean is the mean of window means
    expected = math.exp(sum(losses) / len(losses))
    metrics = perplexity(model, windows)
    assert metrics.perplexity == pytest.approx(expected, rel=1e-5)
    assert metrics.tokens == windows.shape[0] * (windows.shape[1] - 1)
    assert (metrics.windows, metrics.seq_len) == tuple(windows.shape)
    assert metrics.reference_perplexity is None
    assert metrics.kl_mean is None
    assert metrics.top1_agreement is None


def test_compare_to_itself(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    metrics = compare_to_reference(model, model, windows)
    assert metrics.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert metrics.top1_agreement == 1.0
    assert metrics.reference_perplexity == pytest.approx(metrics.perplexity, rel=1e-12)
    assert metrics.perplexity == pytest.approx(perplexity(model, windows).perplexity, rel=1e-6)


def test_compare_to_perturbed_copy(
    model: LlamaForCausalLM, perturbed: LlamaForCausalLM, windows: torch.Tensor
) -> None:
    metrics = compare_to_reference(perturbed, model, windows)
    assert metrics.kl_mean is not None and metrics.kl_mean > 1e-3
    assert metrics.top1_agreement is not None and metrics.top1_agreement < 1.0
    assert metrics.reference_perplexity == pytest.approx(
        perplexity(model, windows).perplexity, rel=1e-6
    )
    assert metrics.perplexity == pytest.approx(perplexity(perturbed, windows).perplexity, rel=1e-6)


def test_kl_and_top1_match_a_full_logits_oracle(
    model: LlamaForCausalLM, perturbed: LlamaForCausalLM, windows: torch.Tensor
) -> None:
    # Independent route: all logits at once, torch's own kl_div.
    with torch.no_grad():
        ref_logits = model(windows).logits[:, :-1]  # (n, seq_len - 1, vocab)
        logits = perturbed(windows).logits[:, :-1]
    ref_log_probs = ref_logits.log_softmax(-1)
    kl = F.kl_div(logits.log_softmax(-1), ref_log_probs, log_target=True, reduction="sum")
    expected_kl = kl.item() / ref_logits.shape[0] / ref_logits.shape[1]
    expected_top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()

    metrics = compare_to_reference(perturbed, model, windows)
    assert metrics.kl_mean == pytest.approx(expected_kl, rel=1e-5)
    assert metrics.top1_agreement == pytest.approx(expected_top1, abs=1e-12)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 100])
def test_batch_size_does_not_change_results(
    model: LlamaForCausalLM,
    perturbed: LlamaForCausalLM,
    windows: torch.Tensor,
    batch_size: int,
) -> None:
    base = compare_to_reference(perturbed, model, windows, batch_size=4).to_dict()
    other = compare_to_reference(perturbed, model, windows, batch_size=batch_size).to_dict()
    assert other.keys() == base.keys()
    for key, value in base.items():
        assert other[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_position_chunking_does_not_change_results(
    model: LlamaForCausalLM,
    perturbed: LlamaForCausalLM,
    windows: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = compare_to_reference(perturbed, model, windows).to_dict()
    # 16 predicting positions per window in chunks of 5: 5 + 5 + 5 + 1
    monkeypatch.setattr(evaluate, "_CHUNK_POSITIONS", 5)
    chunked = compare_to_reference(perturbed, model, windows).to_dict()
    assert chunked["tokens"] == base["tokens"]
    for key, value in base.items():
        assert chunked[key] == pytest.approx(value, rel=1e-9), key


def test_scores_in_eval_mode_and_restores_training_state(windows: torch.Tensor) -> None:
    noisy = tiny_llama(attention_dropout=0.5)
    noisy.train()
    first = perplexity(noisy, windows).perplexity
    second = perplexity(noisy, windows).perplexity
    assert first == second  # dropout off while scoring
    assert noisy.training
    expected = perplexity(noisy.eval(), windows).perplexity
    assert first == expected


class RecordingProgress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.items = 0

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        self.calls.append((description, total))
        for item in items:
            self.items += 1
            yield item

    def log(self, message: str) -> None:
        return None


def test_progress_sees_every_batch(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    progress = RecordingProgress()
    compare_to_reference(model, model, windows, batch_size=3, progress=progress)
    assert progress.calls == [("evaluate (ppl, KL)", 3)]
    assert progress.items == 3
    progress = RecordingProgress()
    perplexity(model, windows, batch_size=4, progress=progress)
    assert progress.calls == [("evaluate (ppl)", 2)]


@pytest.mark.parametrize(
    ("windows", "match"),
    [
        (torch.zeros(8, dtype=torch.long), "2-D"),
        (torch.zeros(2, 8), "integer token ids"),
        (torch.zeros(2, 1, dtype=torch.long), "predict no token"),
        (torch.zeros(0, 8, dtype=torch.long), "predict no token"),
    ],
)
def test_rejects_bad_windows(model: LlamaForCausalLM, windows: torch.Tensor, match: str) -> None:
    with pytest.raises(DataError, match=match):
        perplexity(model, windows)


def test_accepts_int32_windows(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    assert perplexity(model, windows.int()).perplexity == perplexity(model, windows).perplexity


def test_rejects_reference_with_another_vocabulary(windows: torch.Tensor) -> None:
    small = tiny_llama()
    big = LlamaForCausalLM(LlamaConfig(**{**small.config.to_dict(), "vocab_size": VOCAB + 64}))
    with pytest.raises(CompressError, match="vocabulary of 256 logits but the reference has 320"):
        compare_to_reference(small, big, windows)


def test_rejects_nonpositive_batch_size(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, windows, batch_size=0)


def test_quality_metrics_dict_round_trip() -> None:
    metrics = QualityMetrics(
        tokens=10, windows=2, seq_len=6, perplexity=12.5, reference_perplexity=11.0,
        kl_mean=0.02, top1_agreement=0.9,
    )  # fmt: skip
    data = metrics.to_dict()
    assert data == {
        "tokens": 10,
        "windows": 2,
        "seq_len": 6,
        "perplexity": 12.5,
        "reference_perplexity": 11.0,
        "kl_mean": 0.02,
        "top1_agreement": 0.9,
    }
    assert QualityMetrics.from_dict({**data, "future_key": 1}) == metrics


# --- generation ------------------------------------------------------------------------------


def char_tokenizer():  # type: ignore[no-untyped-def]
    """A local one-character-per-token tokenizer over the tiny model's 256 ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(0x100 + i): i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=chr(0x100)))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_generation_sample_is_greedy_continuation(model: LlamaForCausalLM) -> None:
    tokenizer = char_tokenizer()
    model.generation_config.eos_token_id = None  # run all max_new_tokens, like the oracle below
    prompt_ids = [5, 17, 200, 33]
    prompt = tokenizer.decode(prompt_ids)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(6):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = tokenizer.decode(ids[0, len(prompt_ids) :].tolist())

    text = generation_sample(model, tokenizer, prompt, max_new_tokens=6)
    assert text == expected
    assert len(text) == 6
