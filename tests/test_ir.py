"""IR records: one API to attach, get, iterate and checkpoint every kind."""

import copy

import pytest
import torch
from torch import nn

from compress.formats.int import IntFormat
from compress.ir import (
    Adapter,
    BitWidth,
    ConfigPatch,
    EntropyPlan,
    Permutation,
    QuantizedWeight,
    Rotation,
    SparsityMask,
    attach,
    detach,
    get,
    record_from_state,
    record_kinds,
    records,
    records_of,
)


def examples():
    fmt = IntFormat(4, 8, False)
    weight = torch.randn(6, 16)
    return [
        QuantizedWeight(*fmt.quantize(weight), fmt),
        SparsityMask(weight.abs() > 0.5, "unstructured"),
        BitWidth(3),
        Permutation(columns=torch.randperm(16), group="layer0.mlp"),
        Permutation(torch.randperm(6), torch.randperm(16), "layer0.mlp,residual"),
        Rotation("random_hadamard", 16, "in", fused=False, seed=3),
        Rotation("learned", 4, matrix=torch.linalg.qr(torch.randn(4, 4))[0]),
        Adapter("lora", {"A": torch.randn(2, 16), "B": torch.zeros(6, 2)}, {"rank": 2}),
        EntropyPlan(True, True, 4096, 1 << 16, 12, 16, ["*norm*"]),
        ConfigPatch({"intermediate_size": 96}),
    ]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("record", examples(), ids=lambda r: type(r).__name__)
def test_every_kind_round_trips_through_its_state(record):
    tensors, meta = record.to_state()
    again = record_from_state(record.kind, tensors, meta)
    assert type(again) is type(record)
    assert all(same(getattr(record, f), getattr(again, f)) for f in record.__dataclass_fields__)


def test_every_kind_is_known_by_name():
    assert {type(r).kind for r in examples()} == set(record_kinds())


def test_attach_get_detach_and_iterate():
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 2))
    quantized, mask, *_ = examples()
    attach(model[0], quantized)
    attach(model[0], mask)
    attach(model, ConfigPatch({"x": 1}))
    assert get(model[0], QuantizedWeight) is quantized
    assert get(model[0], SparsityMask) is mask
    assert get(model[2], QuantizedWeight) is None
    assert [name for name, _ in records(model, QuantizedWeight)] == ["0"]
    assert [name for name, _ in records(model, ConfigPatch)] == [""]
    assert set(records_of(model[0])) == {"quantized", "sparsity"}
    copied = copy.deepcopy(model)  # records travel with the module
    assert torch.equal(get(copied[0], QuantizedWeight).codes, quantized.codes)
    detach(model[0], SparsityMask)
    assert get(model[0], SparsityMask) is None and get(model[0], QuantizedWeight) is quantized
    attach(model[0], SparsityMask(mask.mask, "2:4"))  # one record per kind: replaced
    assert get(model[0], SparsityMask).pattern == "2:4"


def test_records_are_not_parameters_or_buffers():
    linear = nn.Linear(16, 6)
    attach(linear, examples()[0])
    assert set(linear.state_dict()) == {"weight", "bias"}
