"""QWHA as a PEFT method: ``peft.get_peft_model(model, QWHAConfig(...))`` and
``PeftModel.from_pretrained(model, folder)`` work after ``import compress.adapters``.

A QWHA layer adds ``hadamard_transform(x) @ Fᵀ`` to its base layer's output, ``F`` sparse
(:mod:`compress.adapters.corrections`). Its tensors, per adapter name:

* ``qwha_values`` ``(nnz,)``: the trainable coefficients;
* ``qwha_cols`` ``(nnz,)`` int and ``qwha_row_counts`` ``(out,)`` int: where they sit (row by
  row, columns sorted within a row), saved with the adapter since the ``qwha`` pass chooses them
  from data. A layer PEFT creates fresh draws them at random (``seed``) with zero values.

The base layer may be any module with ``in_features`` / ``out_features`` and a forward: a plain
``nn.Linear`` or a compress packed Linear, which QWHA never dequantizes (it runs unmerged).

Registration: PEFT keys its registries by members of the ``PeftType`` enum, and its public
``register_peft_method`` refuses a name that is not a member. Python has no public call that adds
a member to an existing enum, so :func:`_peft_type` adds ``QWHA`` the way ``aenum.extend_enum``
does (create the member with the enum's own ``str`` constructor, then enter it in the enum's name
and value tables), once and idempotently; everything after that goes through PEFT's public
``register_peft_method``. Nothing of PEFT is patched: ``list(PeftType)``, ``PeftType("QWHA")`` and
PEFT's config round trip all see an ordinary member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PeftType
from peft.utils.peft_types import register_peft_method
from torch import nn

from compress.adapters.corrections import spectrum_delta, spectrum_rows
from compress.adapters.runtime import device_of
from compress.formats.base import derived_from

__all__ = ["QWHAConfig", "QWHALayer", "QWHAModel"]

NAME = "qwha"


def _peft_type(name: str) -> PeftType:
    """The ``PeftType`` member ``name``, added if PEFT does not have it (see module doc)."""
    existing = PeftType.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


QWHA_TYPE = _peft_type(NAME.upper())


@dataclass
class QWHAConfig(PeftConfig):
    """Configuration of a QWHA adapter (Walsh–Hadamard spectrum, sparse coefficients)."""

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex, as for LoRA"}
    )
    exclude_modules: list[str] | str | None = field(default=None)
    rank: int = field(
        default=8, metadata={"help": "coefficients per module: rank·(in+out), LoRA's count"}
    )
    count_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "module name -> coefficient count"}
    )
    seed: int = field(default=0, metadata={"help": "seed of a freshly drawn support"})
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = QWHA_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)  # type: ignore[assignment]
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)  # type: ignore[assignment]
        if self.rank < 1:
            raise ValueError(f"QWHAConfig.rank must be positive, got {self.rank}")


class QWHALayer(BaseTunerLayer):
    """The QWHA part of a layer: one sparse spectrum per adapter name."""

    adapter_layer_names = ("qwha_values",)
    other_param_names = ("qwha_cols", "qwha_row_counts")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.qwha_values = nn.ParameterDict({})
        self.qwha_cols = BufferDict({}, persistent=True)
        self.qwha_row_counts = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        in_features = getattr(base, "in_features", None)
        out_features = getattr(base, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise TypeError(
                f"QWHA needs a layer with in_features and out_features, got {type(base).__name__}"
            )
        self.in_features, self.out_features = in_features, out_features

    def update_layer(self, adapter_name: str, count: int, config: QWHAConfig, **_: Any) -> None:
        total = self.in_features * self.out_features
        if not 0 < count <= total:
            raise ValueError(f"QWHA coefficient count must be in 1..{total}, got {count}")
        generator = torch.Generator().manual_seed(config.seed)
        chosen = torch.randperm(total, generator=generator)[:count].sort().values
        rows, cols = chosen // self.in_features, chosen % self.in_features
        device = device_of(self.get_base_layer())
        self.qwha_cols[adapter_name] = cols.to(device)
        self.qwha_row_counts[adapter_name] = torch.bincount(rows, minlength=self.out_features).to(
            device
        )
        self.qwha_values[adapter_name] = nn.Parameter(torch.zeros(count, device=device))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _rows(self, adapter: str) -> torch.Tensor:
        """The row of each coefficient, kept until the counts change (a loaded state dict
        copies into them): rebuilt every call it cost a third of a decode step's adapter time."""
        counts = self.qwha_row_counts[adapter]
        return derived_from(self, f"_qwha_rows_{adapter}", counts, lambda: spectrum_rows(counts))

    def _cols(self, adapter: str) -> torch.Tensor:
        """The column of each coefficient as int64 (what indexing takes), kept likewise."""
        cols = self.qwha_cols[adapter]
        return derived_from(self, f"_qwha_cols_{adapter}", cols, lambda: cols.to(torch.int64))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW = F H``, dense ``(out, in)``."""
        from compress.adapters.corrections import spectrum_delta_weight

        values = self.qwha_values[adapter]
        shape = (self.out_features, self.in_features)
        return spectrum_delta_weight(self._rows(adapter), self._cols(adapter), values, shape)


class QWHALinear(nn.Module, QWHALayer):
    """A base layer with QWHA adapters beside it (never merged into packed weights)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, count: int, config: QWHAConfig
    ) -> None:
        super().__init__()
        QWHALayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, count, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.qwha_values:
                continue
            values = self.qwha_values[adapter]
            rows, cols = self._rows(adapter), self._cols(adapter)
            delta = spectrum_delta(x, rows, cols, values, self.out_features)
            result = result + delta.to(result.dtype)
        return result

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "QWHA adapters run beside the base layer; merge them into a float model with "
            "get_delta_weight(adapter) if you need one"
        )

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "qwha." + super().__repr__()


class QWHAModel(BaseTuner):
    """Injects :class:`QWHALinear` layers into a model."""

    prefix: str = "qwha_"
    tuner_layer_cls = QWHALayer
    target_module_mapping: dict[str, list[str]] = {  # noqa: RUF012  (PEFT's class attribute)
        family: list(names)
        for family, names in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
    }

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        config = peft_config
        assert isinstance(config, QWHAConfig)
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        count = config.count_pattern.get(current_key)
        if count is None:
            width = int(base.in_features) + int(base.out_features)  # type: ignore[arg-type]
            count = config.rank * width
        if isinstance(target, QWHALayer):
            target.update_layer(adapter_name, int(count), config)
            return
        module = QWHALinear(target, adapter_name, int(count), config)
        if adapter_name not in self.active_adapters:
            module.requires_grad_(False)
        self._replace_module(parent, target_name, module, target)


def register() -> None:
    """Make ``qwha`` a PEFT method (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(QWHA_TYPE) is QWHAConfig:
        return
    register_peft_method(name=NAME, config_cls=QWHAConfig, model_cls=QWHAModel)


register()
