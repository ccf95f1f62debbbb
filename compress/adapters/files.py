"""Adapter records on disk as a PEFT adapter folder, and back onto a loaded export.

An export whose modules carry :class:`~compress.ir.Adapter` records gets a subfolder
(``adapter/``) that PEFT reads as it is: ``adapter_config.json`` plus
``adapter_model.safetensors`` with PEFT's key names (``base_model.model.<module>.lora_A.weight``,
``...qwha_values``). LoRA corrections are ordinary PEFT LoRA adapters (stock PEFT loads them on
a float copy of the model too); QWHA ones name the ``QWHA`` PEFT type of
:mod:`compress.adapters.qwha`.

Loading an export applies the folder as the adapter named ``compress``
(:func:`load_adapter_folder`). PEFT's LoRA picks its layer class from a fixed list of known
module types, which a compress packed Linear is not on; the config object of that one load
therefore maps the packed classes to PEFT's own ``lora.Linear`` (PEFT's ``_register_custom_module``
hook, which is per config, so nothing global changes). The wrapped layers are PEFT LoRA layers,
so ``PeftModel.from_pretrained(model, folder)`` on the loaded export adds its adapter to them
(the ``default`` one becomes active) and computes the same function.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import ExportError
from compress.ir import Adapter, records

__all__ = ["ADAPTER_DIR", "ADAPTER_NAME", "load_adapter_folder", "write_adapter_folder"]

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "compress"
_WEIGHTS = "adapter_model.safetensors"


def _key(module: str, leaf: str) -> str:
    return f"base_model.model.{module}.{leaf}"


def write_adapter_folder(
    model: nn.Module, folder: Path, dtype: torch.dtype
) -> dict[str, Any] | None:
    """Write ``model``'s adapter records into ``folder``; the entry ``config.json`` gets
    (``{"dir", "method", "modules"}``), or None when the model has no adapters."""
    adapters = dict(records(model, Adapter))
    if not adapters:
        return None
    methods = {a.method for a in adapters.values()}
    if len(methods) != 1:
        raise ExportError(
            f"an export holds adapters of one method, these modules mix {sorted(methods)}",
            hint="use either lora_correct or qwha in one recipe",
        )
    method = methods.pop()
    tensors: dict[str, torch.Tensor] = {}
    if method == "lora":
        from peft import LoraConfig

        ranks = {name: int(a.config["rank"]) for name, a in adapters.items()}
        alphas = {
            name: float(a.config.get("alpha", a.config["rank"])) for name, a in adapters.items()
        }
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config: Any = LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int, scales by float
            target_modules=sorted(adapters),
            rank_pattern={n: r for n, r in ranks.items() if r != rank},
            alpha_pattern={n: a for n, a in alphas.items() if a != alpha},
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        for name, adapter in adapters.items():
            tensors[_key(name, "lora_A.weight")] = adapter.tensors["lora_A"].to(dtype).contiguous()
            tensors[_key(name, "lora_B.weight")] = adapter.tensors["lora_B"].to(dtype).contiguous()
    elif method == "qwha":
        from compress.adapters.qwha import QWHAConfig

        config = QWHAConfig(
            target_modules=sorted(adapters),
            count_pattern={n: int(a.tensors["values"].numel()) for n, a in adapters.items()},
            task_type="CAUSAL_LM",
        )
        for name, adapter in adapters.items():
            in_features = _in_features(model, name)
            index = torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32
            tensors[_key(name, "qwha_values")] = adapter.tensors["values"].to(dtype).contiguous()
            tensors[_key(name, "qwha_cols")] = adapter.tensors["cols"].to(index).contiguous()
            tensors[_key(name, "qwha_row_counts")] = (
                adapter.tensors["row_counts"].to(torch.int32).contiguous()
            )
    else:
        raise ExportError(f"adapter method {method!r} cannot be exported", hint="lora or qwha")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / _WEIGHTS), metadata={"format": "pt"})
    return {"dir": folder.name, "method": method, "modules": len(adapters)}


def _in_features(model: nn.Module, name: str) -> int:
    weight = getattr(model.get_submodule(name), "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) else 1 << 20


def load_adapter_folder(
    model: nn.Module, folder: Path, *, adapter_name: str = ADAPTER_NAME
) -> None:
    """Attach the PEFT adapter in ``folder`` to ``model`` (an export being loaded), active."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    import compress.adapters.qwha  # noqa: F401  (registers the QWHA PEFT type)

    if not (folder / "adapter_config.json").is_file():
        raise ExportError(
            f"the export names an adapter folder {folder} without adapter_config.json",
            hint="the export is incomplete: write it again with compress apply",
        )
    peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if config_cls is None:
        raise ExportError(f"{folder}: unknown PEFT type {peft_type!r}", hint="lora or qwha")
    config: PeftConfig = config_cls.from_pretrained(str(folder))
    config.inference_mode = True
    if peft_type == "LORA":
        from peft.tuners.lora import Linear as LoraLinear

        targets = set(getattr(config, "target_modules", None) or ())
        packed = {type(m) for n, m in model.named_modules() if n in targets}
        config._register_custom_module(  # type: ignore[attr-defined]
            {cls: LoraLinear for cls in packed if not issubclass(cls, nn.Linear)}
        )
    weights = load_file(str(folder / _WEIGHTS))
    with warnings.catch_warnings():
        # PEFT warns about any base layer class it does not know; ours are known to work
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing = [
        k
        for k in getattr(result, "missing_keys", ())
        if f".{adapter_name}" in k and ("qwha_" in k or "lora_" in k)
    ]
    if missing:
        raise ExportError(
            f"{folder}: the adapter file lacks {len(missing)} tensors, e.g. {missing[0]}",
            hint="the export is incomplete: write it again with compress apply",
        )
