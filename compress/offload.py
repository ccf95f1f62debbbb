"""Decoder layers on disk: per-layer checkpoints (for ``--resume``) and offloaded calibration.

:class:`LayerStore` is the pipeline's :class:`~compress.registry.LayerAccess`. After a pass
finishes a decoder layer it writes the layer's new state (its tensors, minus quantized weights,
which are rebuilt exactly from their integer codes), the quantization records and the part of the
pass report about it, and, for calibrated passes, the layer's outputs on the calibration text.
A resumed run restores those layers instead of redoing them and continues from the saved
activations, so it computes the very same bytes as an uninterrupted run.

With ``offload=True`` the model is an empty-weights skeleton: a layer's weights are read from the
checkpoint folder's safetensors (or the newest checkpoint) just before a pass needs them and
dropped right after, so memory grows with one layer, not with the model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.errors import ModelLoadError, RecipeError
from compress.ir import (
    QuantizedWeight,
    Record,
    attach,
    detach,
    get_quantized,
    record_from_state,
    records_of,
    set_quantized,
)
from compress.registry import LayerAccess, PassReport
from compress.utils.memory import release_free_memory
from compress.utils.modules import decoder_layers
from compress.utils.safetensors_io import read_file, read_metadata, read_tensors

__all__ = [
    "LayerStore",
    "SourceWeights",
    "empty_skeleton",
    "finished_layers",
    "remove_work_dir",
    "work_dir_for",
]

_RUN_FILE = "run.json"


def _common_prefix(saved: list[str], current: list[str]) -> int:
    """How many leading pass fingerprints two runs share."""
    count = 0
    for a, b in zip(saved, current, strict=False):
        if a != b:
            break
        count += 1
    return count


def work_dir_for(export_dir: Path) -> Path:
    """Where a run exporting to ``export_dir`` keeps its layer checkpoints (a hidden sibling)."""
    export_dir = Path(export_dir)
    return export_dir.parent / f".{export_dir.name}.work"


def finished_layers(work_dir: Path) -> int:
    """How many layer checkpoints (of all passes) a run left in ``work_dir`` for ``--resume``."""
    work_dir = Path(work_dir)
    if not (work_dir / _RUN_FILE).is_file():
        return 0
    return sum(1 for _ in work_dir.glob("pass*-layer*.safetensors"))


def pass_checkpoints(work_dir: Path) -> list[str]:
    """Names of the whole-model passes (``pass03-distill``) with a checkpoint in ``work_dir``."""
    work_dir = Path(work_dir)
    if not (work_dir / _RUN_FILE).is_file():
        return []
    return sorted(p.name for p in work_dir.glob("pass*-*") if p.is_dir() and any(p.iterdir()))


def remove_work_dir(export_dir: Path) -> bool:
    """Remove the checkpoints of a run exporting to ``export_dir``; whether there were any."""
    work_dir = work_dir_for(export_dir)
    if not work_dir.exists():
        return False
    shutil.rmtree(work_dir, ignore_errors=True)
    return True


class SourceWeights:
    """The tensors of a safetensors model folder, read one at a time (nothing is mapped)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise ModelLoadError(
                    f"{self.folder}: no model.safetensors or model.safetensors.index.json",
                    hint="offloading reads the weights from a folder of safetensors files",
                )
            with safe_open(str(single), framework="pt") as handle:
                self.files = dict.fromkeys(handle.keys(), single)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in self.files]
        if missing:
            raise ModelLoadError(
                f"{self.folder}: tensor {missing[0]} is not in the checkpoint",
                hint="offloading needs checkpoint names that match the model's state_dict",
            )
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():  # plain reads: no mapped pages beside the copies
            tensors.update(read_tensors(file, wanted))
        return tensors


def empty_skeleton(folder: Path, dtype: str, *, trust_remote_code: bool) -> nn.Module:
    """The model of ``folder`` with every parameter on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    torch_dtype = _checkpoint_dtype(config) if dtype == "auto" else getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    return model.eval()


def _checkpoint_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class LayerStore(LayerAccess):
    """Checkpoints finished layers in ``work_dir``; with ``source`` set, keeps layers on disk."""

    def __init__(
        self,
        model: nn.Module,
        work_dir: Path,
        *,
        fingerprint: str,
        pass_fingerprints: list[str] | None = None,
        resume: bool = False,
        source: SourceWeights | None = None,
        read_only: bool = False,
    ) -> None:
        """``pass_fingerprints[i]``: what passes ``0..i`` depend on (model, calibration and their
        settings). On ``--resume`` with a changed recipe, the checkpoints of the unchanged
        leading passes are kept (:attr:`kept_passes` says how many) and the rest removed."""
        self.model = model
        # another process of the same run (rank > 0) writes nothing: it reads rank 0's
        # checkpoints on --resume and otherwise recomputes what rank 0 saves
        self.read_only = read_only
        self.work_dir = Path(work_dir)
        self.source = source
        self.prefix, self.blocks = decoder_layers(model)
        self.pass_index = 0
        self._latest: dict[int, Path] = {}
        self._resume = resume
        self._pass_fingerprints = list(pass_fingerprints or [])
        self.kept_passes: int | None = None  # set when a changed recipe resumes from a prefix
        self._open(fingerprint)

    @property
    def offloaded(self) -> bool:
        return self.source is not None

    def _open(self, fingerprint: str) -> None:
        run_file = self.work_dir / _RUN_FILE
        self._fingerprint = fingerprint
        if self._resume:
            if not run_file.is_file():
                raise RecipeError(
                    f"--resume: no checkpoint of an earlier run in {self.work_dir}",
                    hint="run without --resume (nothing to continue from)",
                )
            run = json.loads(run_file.read_text())
            if run.get("fingerprint") != fingerprint:
                kept = _common_prefix(run.get("passes") or [], self._pass_fingerprints)
                if kept == 0:
                    raise RecipeError(
                        f"--resume: the checkpoint in {self.work_dir} was made by a different "
                        "recipe or model (its first pass, model or calibration differ)",
                        hint="rerun without --resume to start over",
                    )
                self._discard_passes_from(kept)
                self.kept_passes = kept
                if not self.read_only:
                    run_file.write_text(json.dumps(self._run_record()))
            return
        if self.read_only:
            return
        # created with the first finished layer: a run that fails early leaves nothing behind
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def close(self) -> None:
        """Remove the checkpoints: the run finished and its export is complete."""
        if not self.read_only:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def begin_pass(self, index: int) -> None:
        self.pass_index = index

    def pass_folder(self, name: str) -> Path | None:
        self._start_run()
        return self.work_dir / f"pass{self.pass_index:02d}-{name}"

    @property
    def resuming(self) -> bool:
        return self._resume

    def _start_run(self) -> None:
        """Create the work folder with its run file (fingerprint), on the first checkpoint."""
        if not self.read_only and not (self.work_dir / _RUN_FILE).is_file():
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / _RUN_FILE).write_text(json.dumps(self._run_record()))

    def _run_record(self) -> dict[str, Any]:
        return {
            "fingerprint": self._fingerprint,
            "passes": self._pass_fingerprints,
            "layers": len(self.blocks),
        }

    def _discard_passes_from(self, first: int) -> None:
        """Remove the checkpoints of pass ``first`` and every later one (they ran with other
        settings, or after a pass that did)."""
        if self.read_only:
            return
        for path in self.work_dir.glob("pass*-*"):
            index = path.name[4:6]
            if not index.isdigit() or int(index) < first:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    # -- checkpoints -------------------------------------------------------------------------

    def _layer_file(self, index: int, pass_index: int | None = None) -> Path:
        p = self.pass_index if pass_index is None else pass_index
        return self.work_dir / f"pass{p:02d}-layer{index:04d}.safetensors"

    def _hidden_file(self) -> Path:
        return self.work_dir / f"pass{self.pass_index:02d}-activations.safetensors"

    def done_layers(self, count: int, *, activations: bool = False) -> int:
        if not self._resume:
            return 0
        done = 0
        while done < count and self._layer_file(done).is_file():
            done += 1
        if activations and 0 < done < count:
            hidden = self._hidden_file()
            if not hidden.is_file():
                return 0
            after = int(read_metadata(hidden).get("after_layer", -1))
            done = min(done, after + 1)
        return done

    def restore(self, index: int, name: str, layer: nn.Module, report: PassReport | None) -> None:
        path = self._layer_file(index)
        self._latest[index] = path
        if self.offloaded:  # the state stays on disk until load(); only the report part is read
            fragment = _read_fragment(path)
        else:
            state, records, fragment = _read_checkpoint(path)
            _fill_layer_(layer, state, records)
        if report is not None:
            report.per_module.update(fragment.get("per_module", {}))
            report.touched.extend(t for t in fragment.get("touched", []) if t not in report.touched)

    def resume_hidden(self) -> list[torch.Tensor] | None:
        path = self._hidden_file()
        if not path.is_file():
            return None
        saved = read_tensors(path)
        return [saved[key] for key in sorted(saved, key=lambda k: int(k[1:]))]

    def finish(
        self,
        index: int,
        name: str,
        layer: nn.Module,
        hidden: list[torch.Tensor] | None,
        report: PassReport | None,
    ) -> None:
        if self.read_only:
            return
        self._start_run()
        path = self._layer_file(index)
        fragment: dict[str, Any] = {}
        if report is not None:
            fragment = {
                "per_module": {
                    k: v for k, v in report.per_module.items() if k.startswith(name + ".")
                },
                "touched": [t for t in report.touched if t.startswith(name + ".")],
            }
        _write_checkpoint(path, layer, fragment)
        if hidden is not None:
            tmp = self._hidden_file().with_suffix(".tmp")
            save_file(
                {f"h{i}": h.contiguous() for i, h in enumerate(hidden)},
                str(tmp),
                metadata={"after_layer": str(index)},
            )
            os.replace(tmp, self._hidden_file())
        self._latest[index] = path
        if self.offloaded:
            self.unload(index, layer)

    # -- offloading --------------------------------------------------------------------------

    def load(self, index: int, layer: nn.Module, *, codes_only: bool = False) -> None:
        if not self.offloaded:
            return
        if not codes_only:
            _rebuild_released(layer)
        if not _is_empty(layer):
            return
        name = f"{self.prefix}.{index}"
        if index in self._latest:
            state, records, _ = _read_checkpoint(self._latest[index])
        else:
            assert self.source is not None
            keys = list(layer.state_dict())
            read = self.source.read([f"{name}.{k}" for k in keys])
            state, records = {k: read[f"{name}.{k}"] for k in keys}, {}
        _fill_layer_(layer, state, records, allocate=True, dequantize=not codes_only)

    def unload(self, index: int, layer: nn.Module) -> None:
        if not self.offloaded:
            return
        for module in layer.modules():
            for record in records_of(module).values():  # the checkpoint holds them
                detach(module, type(record))
            for key in list(module._parameters):
                _to_meta(module, key)
        release_free_memory(collect=False)  # the layer's tensors, before the next is read

    def release_weight(self, module: nn.Module) -> None:
        if self.offloaded and get_quantized(module) is not None:
            _to_meta(module, "weight")

    @contextmanager
    def embedding(self, model: nn.Module) -> Iterator[None]:
        if not self.offloaded:
            yield
            return
        embed = model.get_input_embeddings()  # type: ignore[operator]
        with self._outside(model, {id(p) for p in embed.parameters()}):
            yield

    @contextmanager
    def outside(self, model: nn.Module, names: Sequence[str]) -> Iterator[None]:
        if not self.offloaded:
            yield
            return
        wanted = set()
        for name in names:
            owner, _, leaf = name.rpartition(".")
            parameter = (model.get_submodule(owner) if owner else model)._parameters.get(leaf)
            if parameter is not None:
                wanted.add(id(parameter))
        with self._outside(model, wanted):
            yield

    @contextmanager
    def _outside(self, model: nn.Module, wanted: set[int]) -> Iterator[None]:
        """Read the parameters with these ids (and their tied aliases) for the duration."""
        assert self.source is not None
        layer_prefix = self.prefix + "."
        aliases: dict[int, list[tuple[nn.Module, str]]] = {}
        names: dict[int, str] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            if (module_name + ".").startswith(layer_prefix):
                continue
            for key, parameter in module._parameters.items():
                if parameter is None or not parameter.is_meta or id(parameter) not in wanted:
                    continue
                aliases.setdefault(id(parameter), []).append((module, key))
                full = f"{module_name}.{key}" if module_name else key
                if full in self.source.files or id(parameter) not in names:
                    names[id(parameter)] = full  # a tied head is stored under the embedding
        read = self.source.read(sorted(set(names.values())))
        saved = []
        for pid, holders in aliases.items():
            module, key = holders[0]
            old = module._parameters[key]
            assert old is not None
            value = nn.Parameter(read.pop(names[pid]).to(old.dtype), requires_grad=False)
            for holder, holder_key in holders:
                saved.append((holder, holder_key, old))
                holder._parameters[holder_key] = value
        del read
        try:
            yield
        finally:
            for holder, holder_key, old in saved:
                holder._parameters[holder_key] = old


def _is_empty(layer: nn.Module) -> bool:
    return any(p.is_meta for p in layer.parameters())


def _to_meta(module: nn.Module, key: str) -> None:
    """Replace a parameter by a storage-free one of the same shape and dtype."""
    parameter = module._parameters.get(key)
    if parameter is not None and not parameter.is_meta:
        module._parameters[key] = nn.Parameter(
            torch.empty_like(parameter, device="meta"), requires_grad=False
        )


def _rebuild_released(layer: nn.Module) -> None:
    """Dequantize the weights :meth:`LayerStore.release_weight` freed, from their records."""
    for module in layer.modules():
        record = get_quantized(module)
        weight = module._parameters.get("weight")
        if record is not None and weight is not None and weight.is_meta:
            module._parameters["weight"] = nn.Parameter(
                record.dequantize(weight.dtype), requires_grad=False
            )


def _write_checkpoint(path: Path, layer: nn.Module, fragment: dict[str, Any]) -> None:
    """Layer tensors (quantized weights as codes only) + every IR record + report part,
    atomically."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    quantized = set()
    for module_name, module in layer.named_modules():
        for kind, record in records_of(module).items():
            parts, meta = record.to_state()
            described.setdefault(module_name, {})[kind] = meta
            for part, tensor in parts.items():
                tensors[f"r:{module_name}:{kind}:{part}"] = tensor
            if isinstance(record, QuantizedWeight):
                quantized.add(f"{module_name}.weight" if module_name else "weight")
    for key, tensor in layer.state_dict().items():
        if key not in quantized:
            tensors[f"s:{key}"] = tensor
    tmp = path.with_suffix(".tmp")
    metadata = {"records": json.dumps(described), "report": json.dumps(fragment)}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)


def _read_fragment(path: Path) -> dict[str, Any]:
    """The pass-report part of a layer checkpoint, without reading its tensors."""
    return dict(json.loads(read_metadata(path).get("report", "{}")))


def _read_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, list[Record]], dict[str, Any]]:
    # plain reads: mapped pages would count in the resident set beside the copies
    tensors, metadata = read_file(path)
    described = json.loads(metadata.get("records", "{}"))
    fragment = json.loads(metadata.get("report", "{}"))
    state = {k[2:]: v for k, v in tensors.items() if k.startswith("s:")}
    held: dict[str, list[Record]] = {}
    for module_name, kinds in described.items():
        for kind, meta in kinds.items():
            prefix = f"r:{module_name}:{kind}:"
            parts = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            held.setdefault(module_name, []).append(record_from_state(kind, parts, meta))
    return state, held, fragment


def _fill_layer_(
    layer: nn.Module,
    state: dict[str, torch.Tensor],
    held: dict[str, list[Record]],
    *,
    allocate: bool = False,
    dequantize: bool = True,
) -> None:
    """Put a checkpointed state and its IR records into ``layer``; quantized weights are
    rebuilt from their codes (or, unless ``dequantize``, left storage-free beside their
    records)."""
    with torch.no_grad():
        for module_name, module in layer.named_modules():
            prefix = f"{module_name}." if module_name else ""
            mine = held.get(module_name, [])
            quantized = next((r for r in mine if isinstance(r, QuantizedWeight)), None)
            for key, parameter in list(module._parameters.items()):
                if parameter is None:
                    continue
                full = prefix + key
                if full in state:
                    value = state[full].to(parameter.dtype)
                elif quantized is not None and key == "weight":
                    device = None if dequantize else "meta"
                    value = torch.empty(parameter.shape, dtype=parameter.dtype, device=device)
                else:
                    raise ModelLoadError(f"layer checkpoint has no tensor {full}")
                if allocate or parameter.is_meta:
                    module._parameters[key] = nn.Parameter(value, requires_grad=False)
                else:
                    parameter.copy_(value)
            for key, buffer in module._buffers.items():
                if buffer is not None and prefix + key in state:
                    buffer.copy_(state[prefix + key])
            for kind in records_of(module).values():
                detach(module, type(kind))
            for record in mine:
                if isinstance(record, QuantizedWeight):
                    set_quantized(module, record, update_weight=dequantize)
                else:
                    attach(module, record)
