"""The transformers plug-in: ``quant_method: compress`` in ``config.json`` loads packed modules.

``import compress`` arranges for :func:`register` to run, after which
``AutoModelForCausalLM.from_pretrained(export_dir)`` verifies the manifest checksums, swaps the
quantized Linear layers for their formats' packed modules on the meta device and lets
transformers load the packed buffers straight into them: no dense copy of a quantized weight is
ever made.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PretrainedConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compress.errors import ExportError
from compress.export import entropy
from compress.export.manifest import (
    BASE_MODEL_TYPE_KEY,
    FORMAT_VERSION,
    GUARDED_MODEL_TYPE,
    QUANT_METHOD,
    check_format_version,
    read_manifest,
    verify_files,
)
from compress.formats import Format, format_from_dict, runtime_for
from compress.utils.activations import install_activation_quants
from compress.utils.hadamard import install_online_hadamards
from compress.utils.kvcache import install_kv_cache
from compress.utils.modules import embed_scale_of

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
        tied: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # not a builtin method
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.tied = dict(tied or {})  # module -> module whose packed tensors it reads
        self.verify_checksums = verify_checksums
        self.entropy = entropy  # set when tensors are entropy-coded (entropy_code pass)
        check_format_version(format_version, "config.json quantization_config")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "modules": self.modules,
            **({"tied": self.tied} if self.tied else {}),
            **({"entropy": self.entropy} if self.entropy else {}),
        }

    def formats(self) -> dict[str, Format]:
        return {name: format_from_dict(spec) for name, spec in self.modules.items()}


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
        replace_linears_(model, qconfig.formats(), dtype=dtype, tied=qconfig.tied)
        self._entropy = entropy.loader_for(
            model, qconfig.entropy, manifest, str(Path(files[0]).parent if files else "")
        )

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        loader = getattr(self, "_entropy", None)
        if loader is not None:
            loader.finish(model)  # decode now, or per decoder layer just in time
        for name, source in self.quantization_config.tied.items():
            share = getattr(model.get_submodule(name), "share_buffers", None)
            if share is None:
                raise ExportError(f"module {name!r} cannot share the packed tensors of {source!r}")
            share(model.get_submodule(source))
        adapter = getattr(model.config, "compress_adapter", None)
        if adapter:  # error-correcting adapters (lora_correct, qwha), applied unmerged
            from compress.adapters.files import load_adapter_folder

            load_adapter_folder(
                model, _adapter_folder(str(model.name_or_path), str(adapter["dir"]))
            )
        # after the adapter: a down_proj wrapped by PEFT transforms the input of both
        install_online_hadamards(model)  # rotate's online_down
        install_activation_quants(model)  # act_quant: after the transform, as in memory
        install_kv_cache(model)  # kv_cache: generate fills a quantized cache
        if getattr(model.config, "contextual_sparsity", None):
            # the contextual runtime is a plugin reached by name, as compress reaches this module
            runtime = importlib.import_module("compress.prune.contextual_runtime")
            runtime.install_(model)
        kernels = {str(m.kernel) for m in model.modules() if hasattr(m, "kernel")}
        log.info("compress export loaded; CPU kernels: %s", ", ".join(sorted(kernels)))

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _adapter_folder(source: str, subfolder: str) -> Path:
    """The export's adapter folder: beside a local export, or fetched with a hub one (both
    files into the hub cache, where they sit together)."""
    if Path(source).is_dir():
        return Path(source) / subfolder
    from transformers.utils import cached_file

    found = None
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        found = cached_file(source, name, subfolder=subfolder)
    if found is None:
        raise ExportError(f"{source}: no {subfolder}/ adapter folder", hint="re-run compress apply")
    return Path(found).parent


def replace_linears_(
    model: nn.Module,
    formats: dict[str, Format],
    dtype: Any = None,
    tied: dict[str, str] | None = None,
) -> None:
    """Swap each named Linear (Embedding) for the empty packed module of its format's runtime,
    in place.

    ``tied`` modules (``lm_head`` -> ``model.embed_tokens``) get a packed Linear of their
    source's format without persistent buffers: the loader shares the source's tensors with it.
    """
    modules = dict(model.named_modules())
    wanted = dict(formats)
    for name, source in (tied or {}).items():
        if source not in formats:
            raise ExportError(
                f"quantization_config ties {name!r} to {source!r}, which is not quantized",
                hint="the export does not match its config.json; re-export it",
            )
        wanted[name] = formats[source]
    for name, fmt in wanted.items():
        module = modules.get(name)
        is_tied = name in (tied or {})
        if not isinstance(module, nn.Linear | nn.Embedding) or (
            is_tied and not isinstance(module, nn.Linear)
        ):
            raise ExportError(
                f"quantization_config names module {name!r}, which is "
                + ("missing" if module is None else f"a {type(module).__name__}")
                + f" in {type(model).__name__}, not a "
                + ("Linear" if is_tied else "Linear or Embedding"),
                hint="the export does not match its config.json; re-export it",
            )
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        runtime = runtime_for(fmt)
        replacement: nn.Module
        if isinstance(module, nn.Embedding):
            if runtime.embedding is None:
                raise ExportError(
                    f"quantization_config gives embedding {name!r} format {fmt.label()}, which "
                    "has no packed embedding",
                    hint="the export does not match its config.json; re-export it",
                )
            replacement = runtime.embedding(
                fmt,
                module.num_embeddings,
                module.embedding_dim,
                dtype=module.weight.dtype,
                device=module.weight.device,
                embed_scale=embed_scale_of(module),
            )
        else:
            bias_dtype = module.bias.dtype if module.bias is not None else module.weight.dtype
            replacement = runtime.linear(
                fmt,
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                dtype=bias_dtype,
                device=module.weight.device,
                persistent=not is_tied,
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


register()  # importing this module is what `import compress` arranges once transformers loads
