"""What distillation trains: float weights, scales over frozen codes, masks kept; undone after."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaForCausalLM

from compress.distill.student import prepare_student
from compress.distill.trainer import TrainSettings, train_student
from compress.ir import SparsityMask, get, get_quantized, quantized_modules
from compress.prune.prune import PruneConfig, prune
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext

WINDOWS = torch.randint(0, 256, (12, 24), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(WINDOWS[:2]).logits


def _train(student_model, teacher, steps: int = 4, **kwargs) -> None:
    student = prepare_student(student_model, **kwargs)
    settings = TrainSettings(steps=steps, accumulation=2, lr=1e-3, scale_lr=1e-3)
    no_held_out = WINDOWS[:0]  # no evaluation: the last weights are kept, whatever they are
    train_student(student, teacher, WINDOWS[:8], no_held_out, settings)
    student.finish()


def test_quantized_linears_train_their_scales_and_keep_their_codes(tiny_llama) -> None:
    student = copy.deepcopy(tiny_llama)
    rtn(student, RTNConfig(bits=3, group_size=32), PassContext())
    before = {n: (r.codes.clone(), r.scales.clone()) for n, r in quantized_modules(student).items()}
    prepared = prepare_student(student)
    names = set(prepared.named_trainable())
    assert "model.layers.0.mlp.down_proj.quant_scales" in names
    assert not any(n.endswith("proj.weight") for n in names)
    assert "model.norm.weight" in names  # float tensors train as they are
    prepared.finish()

    _train(student, tiny_llama)
    after = quantized_modules(student)
    assert set(after) == set(before)
    changed = 0
    for name, record in after.items():
        codes, scales = before[name]
        assert torch.equal(record.codes, codes), name  # bits and codes unchanged
        assert record.scales.dtype == scales.dtype
        changed += int(not torch.equal(record.scales, scales))
        module = student.get_submodule(name)
        assert isinstance(module.weight, torch.nn.Parameter)
        assert torch.equal(module.weight.detach(), record.dequantize(module.weight.dtype))
    assert changed == len(after)


def test_pruned_weights_stay_pruned(tiny_llama) -> None:
    student = copy.deepcopy(tiny_llama)
    prune(student, PruneConfig(method="magnitude", pattern="2:4"), PassContext())
    module = student.model.layers[1].mlp.up_proj
    kept_before = module.weight.detach().clone()
    _train(student, tiny_llama)
    mask = get(module, SparsityMask)
    assert mask is not None
    weight = module.weight.detach()
    assert torch.count_nonzero(weight[~mask.mask]) == 0
    assert not torch.equal(weight[mask.mask], kept_before[mask.mask])  # the rest did train


def test_freeze_patterns_and_dtypes_are_restored(tiny_llama) -> None:
    student = copy.deepcopy(tiny_llama)
    student.to(torch.bfloat16)
    frozen = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _train(student, tiny_llama, freeze=["model.layers.0.self_attn"])
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight.detach(), frozen)
    assert not torch.equal(
        student.model.layers[1].self_attn.q_proj.weight.detach().float(),
        tiny_llama.model.layers[1].self_attn.q_proj.weight.bfloat16().float(),
    )
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in student.parameters())


def test_a_tied_quantized_embedding_stays_frozen_with_a_note(tiny_llama) -> None:
    config = copy.deepcopy(tiny_llama.config)
    config.tie_word_embeddings = True
    student = LlamaForCausalLM(config).eval()
    rtn(
        student,
        RTNConfig(bits=8, group_size=32, targets=["model.embed_tokens", "lm_head"]),
        PassContext(),
    )
    assert get_quantized(student.lm_head) is not None
    prepared = prepare_student(student)
    assert "lm_head.quant_scales" not in prepared.named_trainable()
    assert any("tied" in note for note in prepared.frozen_notes)
    prepared.finish()
    assert student.lm_head.weight is student.model.embed_tokens.weight


class _Recorder:
    def __init__(self) -> None:
        self.descriptions: list[str] = []
        self.lines: list[str] = []

    def track(self, items, description, total=None):
        yield from items

    def log(self, message: str) -> None:
        self.lines.append(message)

    def describe(self, description: str) -> None:
        self.descriptions.append(description)


def test_the_bar_shows_loss_and_tokens_per_second(tiny_llama) -> None:
    student = prepare_student(copy.deepcopy(tiny_llama))
    progress = _Recorder()
    settings = TrainSettings(steps=3, accumulation=1, eval_every=3)
    train_student(student, tiny_llama, WINDOWS[:4], WINDOWS[8:10], settings, progress=progress)
    student.finish()
    assert len(progress.descriptions) == 3
    assert all("loss" in d and "tokens/s" in d for d in progress.descriptions)
    assert [line.split(":")[0] for line in progress.lines] == [
        "distill step 0/3",
        "distill step 3/3",
    ]


def test_rich_progress_renames_the_running_bar() -> None:
    from compress.cli import RichProgress

    bar = RichProgress()
    for _ in bar.track(range(2), "distill"):
        bar.describe("distill · loss 0.5")
    assert bar._bar.tasks[-1].description == "distill · loss 0.5"
    bar.describe("no bar running: ignored")
    assert bar._bar.tasks[-1].description == "distill · loss 0.5"


def test_two_passes_with_different_precision_in_one_process(tiny_llama) -> None:
    """accelerate keeps one state per process; a second distill pass with another
    mixed_precision (a recipe with two, or two runs in one Python session) still runs."""
    for precision in ("no", "bf16", "no"):
        student = prepare_student(copy.deepcopy(tiny_llama))
        settings = TrainSettings(steps=1, accumulation=1, mixed_precision=precision)
        history = train_student(student, tiny_llama, WINDOWS[:2], WINDOWS[:0], settings)
        student.finish()
        assert history.step == [1]


def test_bf16_on_a_cpu_without_bf16_arithmetic_trains_in_fp32(monkeypatch) -> None:
    """Emulated bf16 autocast is many times slower than fp32 on CPUs without AVX512-BF16 or AMX:
    there a bf16 request runs in fp32 with a note; elsewhere, and for other requests, it stands."""
    from compress.distill import trainer

    monkeypatch.setattr(trainer, "_has_accelerator", lambda: False)
    monkeypatch.setattr(trainer, "bf16_arithmetic", lambda: False)
    precision, note = trainer.cpu_precision("bf16")
    assert precision == "no" and note is not None and "AVX512-BF16" in note
    assert trainer.cpu_precision("no") == ("no", None)
    monkeypatch.setattr(trainer, "bf16_arithmetic", lambda: True)
    assert trainer.cpu_precision("bf16") == ("bf16", None)
    monkeypatch.setattr(trainer, "bf16_arithmetic", lambda: False)
    monkeypatch.setattr(trainer, "_has_accelerator", lambda: True)
    assert trainer.cpu_precision("bf16") == ("bf16", None)


def test_scales_stored_as_codes_stay_frozen_with_a_note(tiny_llama) -> None:
    """MXFP4 keeps E8M0 scale codes (uint8): training them as floats and casting back would
    corrupt them, so they stay as they are and the report says why."""
    student = copy.deepcopy(tiny_llama)
    rtn(student, RTNConfig(format="mxfp4"), PassContext())
    before = {n: r.scales.clone() for n, r in quantized_modules(student).items()}
    prepared = prepare_student(student)
    assert not any(n.endswith(".quant_scales") for n in prepared.named_trainable())
    assert len(prepared.frozen_notes) == len(before)
    assert "stores its scales as codes (torch.uint8)" in prepared.frozen_notes[0]
    prepared.finish()
    _train(student, tiny_llama)
    for name, record in quantized_modules(student).items():
        assert torch.equal(record.scales, before[name]), name
