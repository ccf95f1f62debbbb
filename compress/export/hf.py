"""The transformers plug-in: ``quant_method: compress`` in ``config.json`` loads packed modules.

``import compress`` calls :func:`register`, after which
``AutoModelForCausalLM.from_pretrained(export_dir)`` verifies the manifest checksums, swaps the
quantized Linear layers for :class:`QuantLinear` on the meta device and lets transformers load the
packed buffers straight into them: no dense copy of a quantized weight is ever made.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PretrainedConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compress.errors import ExportError
from compress.export.entropy import storage as entropy
from compress.export.manifest import (
    BASE_MODEL_TYPE_KEY,
    FORMAT_VERSION,
    GUARDED_MODEL_TYPE,
    QUANT_METHOD,
    check_format_version,
    read_manifest,
    verify_files,
)
from compress.export.qlinear import QuantLinear
from compress.formats import IntFormat

__all__ = [
    "CompressHfQuantizer",
    "CompressQuantizationConfig",
    "GuardedExportConfig",
    "register",
]

log = logging.getLogger(__name__)


class CompressQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compress export: format version and per-module formats."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        verify_checksums: bool = True,
        entropy: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # not a builtin method
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.verify_checksums = verify_checksums
        self.entropy = entropy  # set when tensors are entropy-coded (entropy_code pass)
        check_format_version(format_version, "config.json quantization_config")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "modules": self.modules,
            **({"entropy": self.entropy} if self.entropy else {}),
        }

    def formats(self) -> dict[str, IntFormat]:
        return {name: IntFormat.from_dict(spec) for name, spec in self.modules.items()}


class CompressHfQuantizer(HfQuantizer):
    """Loads pre-quantized compress exports; quantizing on the fly is `compress apply`'s job."""

    requires_calibration = True
    quantization_config: CompressQuantizationConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ExportError(
                "quant_method 'compress' only loads exports made by `compress apply`",
                hint="quantize with `compress apply recipe.yaml` instead",
            )

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        qconfig = self.quantization_config
        wanted = files and (qconfig.verify_checksums or qconfig.entropy)
        manifest = read_manifest(Path(files[0]).parent) if wanted else None
        if manifest is not None and qconfig.verify_checksums:
            verify_files(Path(files[0]).parent, manifest)
        dtype = kwargs.get("dtype")
        replace_linears_(model, self.quantization_config.formats(), dtype=dtype)
        self._entropy = entropy.loader_for(
            model, qconfig.entropy, manifest, str(Path(files[0]).parent if files else "")
        )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        loader = getattr(self, "_entropy", None)
        if loader is not None:
            loader.finish(model)  # decode now, or per decoder layer just in time
        kernels = {m.kernel for m in model.modules() if isinstance(m, QuantLinear)}
        log.info("compress export loaded; CPU kernels: %s", ", ".join(sorted(kernels)))

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def replace_linears_(model: nn.Module, formats: dict[str, IntFormat], dtype: Any = None) -> None:
    """Swap each named Linear for an empty :class:`QuantLinear` of its format, in place."""
    modules = dict(model.named_modules())
    for name, fmt in formats.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ExportError(
                f"quantization_config names module {name!r}, which is "
                + ("missing" if linear is None else f"a {type(linear).__name__}, not a Linear")
                + f" in {type(model).__name__}",
                hint="the export does not match its config.json; re-export it",
            )
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        bias_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
        replacement = QuantLinear(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=bias_dtype,
            device=linear.weight.device,
        )
        setattr(parent, child, replacement)


class GuardedExportConfig(PretrainedConfig):
    """What ``AutoConfig`` finds for an export's guarded ``model_type``: the family's own config.

    An export's ``config.json`` names :data:`GUARDED_MODEL_TYPE` so that stock transformers
    refuses it with a message naming ``import compress``; once compress is imported, reading it
    yields the config class of the real family (``LlamaConfig`` ...), never this one.
    """

    model_type = GUARDED_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        from transformers import CONFIG_MAPPING

        data = dict(config_dict)
        base = data.pop(BASE_MODEL_TYPE_KEY, None)
        if not isinstance(base, str) or base not in CONFIG_MAPPING:
            raise ExportError(
                f"config.json of a compress export names base model type {base!r}, which this "
                "transformers does not know",
                hint="upgrade transformers, or re-export the model",
            )
        data["model_type"] = base
        return CONFIG_MAPPING[base].from_dict(data, **kwargs)


_REGISTERED = False


def register() -> None:
    """Make transformers aware of ``quant_method: compress`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CompressQuantizationConfig)
        register_quantizer(QUANT_METHOD)(CompressHfQuantizer)
    if GUARDED_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(GUARDED_MODEL_TYPE, GuardedExportConfig)
    _REGISTERED = True
