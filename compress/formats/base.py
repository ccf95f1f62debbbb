"""What every numeric format provides, and the one registry that names them.

A format is a frozen dataclass with a ``kind`` that quantizes a weight ``(out, in)`` into integer
codes, scales and (optionally) zero points, dequantizes them back, declares the tensors a
packed module stores, and round-trips through ``to_dict``/:func:`format_from_dict` (the manifest
and ``config.json`` hold the dict). Its runtime side (the packed ``nn.Module``, packing, CPU
and Triton kernels) lives in a module of the same folder and is imported only when an export is
written or loaded (:func:`runtime_for`), so algorithms and the recipe checker stay light.

Adding a format (``compress/formats/<kind>/``)
----------------------------------------------

1. ``spec.py``: a frozen dataclass implementing :class:`Format`, decorated with
   ``@register_format(runtime="compress.formats.<kind>.runtime")``. Its docstring names every
   stored tensor (name, shape, dtype, packed dimension) and :meth:`Format.stored_tensors`
   declares them as data.
2. ``runtime.py``: a :class:`FormatRuntime` registered with :func:`register_runtime`: the
   module classes whose buffers are exactly the stored tensors, how a record is packed into
   them, and the kernels (taking buffers and the format, never the module). Float and sparse
   formats build on :mod:`compress.formats.modules` (``PackedLinear``, ``PackedEmbedding``,
   ``register_packed_runtime``) and :class:`PackedKernels` (the shared kernel table), and
   write only how their buffers are filled and read.
3. ``__init__.py`` imports ``spec`` (so the kind is registered when the folder is imported), and
   :data:`BUILTIN_KINDS` names the folder (a format from elsewhere registers by being imported).
4. Tests next to the others: a bit-exact pack/unpack round trip, the reference against every
   kernel over a grid of awkward shapes, an export that reloads with ``from_pretrained``.
   Nothing outside the folder changes: the writer, the loader, ``compress inspect`` and the
   offload checkpoints go through this registry.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from compress.errors import FormatError, nearest

__all__ = [
    "BUILTIN_KINDS",
    "Format",
    "FormatRuntime",
    "KernelDispatch",
    "PackedKernels",
    "StoredTensor",
    "derived_from",
    "format_from_dict",
    "format_kinds",
    "reference_kernel",
    "register_format",
    "register_runtime",
    "runtime_for",
    "select_packed_kernel",
    "share_buffers",
    "tiled_kernel",
    "triton_kernel",
]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a packed module stores for a weight of a given shape."""

    name: str  # buffer name, e.g. "qweight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    meaning: str


@runtime_checkable
class Format(Protocol):
    """A numeric format for the weight of a Linear (or Embedding), ``(out, in)``."""

    kind: ClassVar[str]

    @property
    def code_bits(self) -> int:
        """Bits of one stored code (the width codes are bit-packed and entropy-coded at)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters including ``kind``; :func:`format_from_dict` reads it back."""
        ...

    def label(self) -> str:
        """Short human name, e.g. ``int4 g64 sym``."""
        ...

    def check_width(self, in_features: int) -> None:
        """Raise :class:`FormatError` if the format cannot hold rows of this width."""
        ...

    def bits_per_weight(self, in_features: int) -> float:
        """Nominal stored bits per weight, scales and zero points included."""
        ...

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        """The tensors a packed module of this shape stores, in order."""
        ...

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Reference round-to-nearest: ``(codes, scales, zeros or None)`` of ``weight``."""
        ...

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The weight the codes stand for, ``(out, in)`` in ``dtype``."""
        ...


F = TypeVar("F", bound=type)

_FORMATS: dict[str, type] = {}
_RUNTIME_MODULES: dict[str, str] = {}

BUILTIN_KINDS: dict[str, str] = {
    "int": "compress.formats.int",
    "fp8": "compress.formats.fp8",
    "fp4": "compress.formats.fp4",
    "fp6": "compress.formats.fp6",
    "nm_int": "compress.formats.nm",
    "bitmask": "compress.formats.bitmask",
}
"""Kind -> the package that registers it. Imported by name when a kind is first looked up, so
this layer never imports the folders above it and ``import compress.formats`` stays light."""


def _load_kind(kind: str) -> None:
    package = BUILTIN_KINDS.get(kind)
    if kind not in _FORMATS and package is not None:
        importlib.import_module(package)


def _load_builtin_kinds() -> None:
    for kind in BUILTIN_KINDS:
        _load_kind(kind)


def register_format(*, runtime: str) -> Callable[[F], F]:
    """Class decorator: register a format class under its ``kind``; ``runtime`` is the module
    that registers its :class:`FormatRuntime` (imported on first use). Refuses duplicates."""

    def decorate(cls: F) -> F:
        kind = getattr(cls, "kind", None)
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"{cls.__name__} needs a class attribute kind: str")
        if kind in _FORMATS and _FORMATS[kind] is not cls:
            raise ValueError(f"format kind {kind!r} is already registered")
        _FORMATS[kind] = cls
        _RUNTIME_MODULES[kind] = runtime
        return cls

    return decorate


def format_kinds() -> list[str]:
    """Registered format kinds: the builtin ones and any other that was imported."""
    _load_builtin_kinds()
    return sorted(_FORMATS)


def format_from_dict(data: Any) -> Format:
    """The format a manifest or ``config.json`` entry describes; clear errors for anything else.

    Entries written before formats had kinds are integer formats.
    """
    if not isinstance(data, dict):
        raise FormatError(f"a format must be a mapping with a 'kind', got {data!r}")
    kind = data.get("kind", "int")
    if isinstance(kind, str):
        _load_kind(kind)
    cls = _FORMATS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        _load_builtin_kinds()
        guess = nearest(str(kind), _FORMATS)
        raise FormatError(
            f"unknown format kind {kind!r}",
            hint=(f"did you mean {guess!r}? " if guess else "")
            + f"this compress knows: {', '.join(format_kinds())}; a newer compress may know it",
        )
    from_dict = getattr(cls, "from_dict", None)
    if from_dict is None:
        raise TypeError(f"format class {cls.__name__} has no from_dict")
    fmt = from_dict(data)
    if not isinstance(fmt, Format):
        raise TypeError(f"{cls.__name__}.from_dict did not return a Format")
    return fmt


@dataclass(frozen=True)
class FormatRuntime:
    """How a format runs: its packed modules, packing, and a description of its kernels."""

    linear: Callable[..., nn.Module]
    """``(fmt, in_features, out_features, *, bias, dtype, device, persistent) -> module``"""
    linear_from_record: Callable[[nn.Linear, Any], nn.Module]
    """``(linear, QuantizedWeight) -> packed module`` (its buffers are the stored tensors)"""
    embedding: Callable[..., nn.Module] | None = None
    """``(fmt, num_embeddings, embedding_dim, *, dtype, device, embed_scale) -> module``"""
    embedding_from_record: Callable[[nn.Embedding, Any], nn.Module] | None = None
    describe_kernels: Callable[[Any, int], str] | None = None
    """``(fmt, in_features) -> "cpu_gemv (≤8 rows), cpu_gemm"``: what ``compress inspect`` says"""
    prepare: Callable[[], object] | None = None
    """Builds what the kernels need ahead of their first call (a native build on first use
    takes about a minute); a run starts it while the model loads. Never raises."""


_RUNTIMES: dict[str, FormatRuntime] = {}


def register_runtime(kind: str, runtime: FormatRuntime) -> None:
    if kind in _RUNTIMES and _RUNTIMES[kind] is not runtime:
        raise ValueError(f"format kind {kind!r} already has a runtime")
    _RUNTIMES[kind] = runtime


def runtime_for(fmt: Format) -> FormatRuntime:
    """The runtime of ``fmt``'s kind, importing its module on first use."""
    kind = fmt.kind
    if kind not in _RUNTIMES:
        module = _RUNTIME_MODULES.get(kind)
        if module is None:
            raise FormatError(f"format kind {kind!r} is not registered")
        importlib.import_module(module)
    if kind not in _RUNTIMES:
        raise FormatError(
            f"format kind {kind!r} registered no runtime (in {_RUNTIME_MODULES[kind]})"
        )
    return _RUNTIMES[kind]


def _held(tensor: object) -> tuple[tuple[int, ...], torch.dtype] | None:
    return (tuple(tensor.shape), tensor.dtype) if isinstance(tensor, torch.Tensor) else None


def share_buffers(target: nn.Module, source: nn.Module, names: tuple[str, ...]) -> None:
    """Make ``source``'s stored tensors ``target``'s own (same shapes and dtypes; a name both
    lack, e.g. symmetric zero points, is skipped): a tied ``lm_head`` and the embedding it is tied
    to then hold one copy of the codes. Any format's packed modules use it."""
    for name in names:
        mine, theirs = getattr(target, name, None), getattr(source, name, None)
        if mine is None and theirs is None:
            continue
        if _held(mine) is None or _held(mine) != _held(theirs):
            raise ValueError(
                f"cannot share {name}: {type(source).__name__} holds {_held(theirs)}, "
                f"this module {_held(mine)}"
            )
        target._buffers[name] = theirs


def derived_from(
    module: object, name: str, source: torch.Tensor, derive: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``derive()``, kept on ``module`` under ``name`` until ``source`` changes (its storage,
    version or device): what a packed module computes from a stored buffer once rather than on
    every decode step (unpacked zero points, per-block value offsets)."""
    key = (source.data_ptr(), source._version, source.device)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = module.__dict__[name] = (key, derive())
    result: torch.Tensor = cached[1]
    return result


class KernelDispatch:
    """What a packed Linear does with its format's kernel module (``kernels``: ``select``,
    ``log_choice``, ``KERNELS``): the kernel for an activation dtype, device,
    ``COMPRESS_KERNEL`` and decode (at most ``decode_rows`` rows) or prefill is chosen once and
    remembered, since a decode step calls every Linear and a choice costs microseconds.

    Mixed into an ``nn.Module`` that sets ``fmt``, ``in_features``, ``out_features``, ``bias``
    and ``qweight`` and has ``packed()``."""

    kernels: ClassVar[ModuleType]
    decode_rows: ClassVar[int] = 8

    fmt: Any
    in_features: int
    out_features: int
    bias: Any
    qweight: torch.Tensor

    def packed(self) -> Any:
        raise NotImplementedError

    def _choices(self) -> dict[tuple[torch.dtype, str, str | None, bool], str]:
        choices = self.__dict__.get("_kernel_choices")
        if choices is None:
            choices = self.__dict__["_kernel_choices"] = {}
        return choices

    @property
    def kernel(self) -> str:
        """The kernel the next decode step in this module's activation dtype will use."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        device = self.qweight.device.type
        return str(
            self.kernels.select(self.fmt, self.in_features, rows=1, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        key = (x.dtype, x.device.type, os.environ.get("COMPRESS_KERNEL"), rows <= self.decode_rows)
        choices = self._choices()
        kernel = choices.get(key)
        if kernel is None:
            kernel = choices[key] = self.kernels.select(
                self.fmt, self.in_features, rows=rows, dtype=x.dtype, device=x.device.type
            )
            self.kernels.log_choice(kernel, self.fmt)
        result: torch.Tensor = self.kernels.KERNELS[kernel](x, self.packed())
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.fmt.label()}, bias={self.bias is not None}"
        )


def triton_kernel(module: str, kind: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A kernel-table entry that runs ``module.triton_linear(x, packed, kind)``, importing the
    format's Triton module (the optional ``gpu`` extra) on the first call only."""

    def run(x: torch.Tensor, packed: Any) -> torch.Tensor:
        result: torch.Tensor = importlib.import_module(module).triton_linear(x, packed, kind)
        return result

    return run


TRITON_KERNELS = ("triton_gemv", "triton_gemm")
TRITON_GEMV_MAX_ROWS = 4  # triton_tiles.GEMV_MAX_ROWS, not imported here: triton is optional
_FORCED_LOGGED: set[tuple[str, str]] = set()


def select_packed_kernel(
    kernels: dict[str, Any],
    *,
    rows: int,
    device: str,
    native: Callable[[], object],
    native_rows: int,
    fallback: str,
    what: str,
) -> str:
    """The kernel a packed Linear of a float or sparse format takes (their kernel tables share
    the names ``reference``, ``cpu_gemv``, ``triton_gemv``, ``triton_gemm`` and ``fallback``).

    CUDA with triton: the Triton GEMV for up to 4 rows, the GEMM above. CPU: ``cpu_gemv`` for up
    to ``native_rows`` rows where the native build loads (``native()``), else ``fallback``.
    ``COMPRESS_KERNEL`` forces a kernel the device can run; any other is logged once, naming
    ``what`` (the format), and the default is taken."""
    forced = os.environ.get("COMPRESS_KERNEL", "")
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        default = "triton_gemv" if rows <= TRITON_GEMV_MAX_ROWS else "triton_gemm"
        return forced if forced in ("reference", *TRITON_KERNELS) else default
    built = device == "cpu" and native() is not None
    if forced in kernels and forced not in TRITON_KERNELS and (forced != "cpu_gemv" or built):
        return forced
    default = "cpu_gemv" if built and rows <= native_rows else fallback
    if forced and (what, forced) not in _FORCED_LOGGED:
        _FORCED_LOGGED.add((what, forced))
        logging.getLogger(__name__).warning(
            "COMPRESS_KERNEL=%s: %s has no such kernel here (it has %s; cpu_gemv needs the "
            "native build); its modules use %s",
            forced,
            what,
            ", ".join(sorted(kernels)),
            default,
        )
    return default


def reference_kernel(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """The whole weight decoded into the activation dtype (``packed.dequantize``), then
    ``F.linear``: every packed format's test oracle."""
    bias = packed.bias.to(x.dtype) if packed.bias is not None else None
    result: torch.Tensor = nn.functional.linear(x, packed.dequantize(x.dtype), bias)
    return result


TILED_SLAB_BYTES = 4 << 20
"""fp32 bytes of the weight rows :func:`tiled_kernel` decodes at a time."""


def tiled_kernel(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """Prefill without a dense copy of the weight: slabs of rows (``packed.dequantize_rows``,
    :data:`TILED_SLAB_BYTES` of fp32 each) decoded in turn into torch's GEMM."""
    rows = max(1, TILED_SLAB_BYTES // max(1, 4 * packed.in_features))
    if rows >= packed.out_features:
        return reference_kernel(x, packed)
    bias = packed.bias.to(x.dtype) if packed.bias is not None else None
    parts = []
    for start in range(0, packed.out_features, rows):
        stop = min(start + rows, packed.out_features)
        slab = packed.dequantize_rows(start, stop, x.dtype)  # (rows, K)
        parts.append(nn.functional.linear(x, slab, None if bias is None else bias[start:stop]))
    return torch.cat(parts, dim=-1)


class NativeKernels(Protocol):
    """What a format's native CPU extension module offers :class:`PackedKernels`."""

    MAX_ROWS: int

    def native(self) -> object: ...

    def gemv(self, x: torch.Tensor, w: Any) -> torch.Tensor: ...


class PackedKernels:
    """The kernel table of a float or sparse format, and what :class:`KernelDispatch` calls on it
    (``KERNELS``, ``select``, ``log_choice``).

    These formats have the same kernels under the same names: ``reference``
    (:func:`reference_kernel`), ``cpu_gemv`` (the format's native extension, for up to its
    ``MAX_ROWS`` rows), ``triton_gemv`` / ``triton_gemm`` (``triton_linear`` of the format's
    Triton module, the ``gpu`` extra), and optionally ``cpu_tiled`` (:func:`tiled_kernel`), the
    CPU prefill path when ``tiled`` is set (else ``reference`` is). Only the packed weight, the
    extension and the Triton module differ, so one class serves them all."""

    def __init__(
        self, *, cpu: NativeKernels, triton_module: str, module_class: str, what: str, tiled: bool
    ) -> None:
        self.cpu = cpu
        self.module_class = module_class  # the packed Linear's name, for the log
        self.what = what  # the format family, for COMPRESS_KERNEL warnings
        self.fallback = "cpu_tiled" if tiled else "reference"
        self.KERNELS: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
            "reference": reference_kernel,
            **({"cpu_tiled": tiled_kernel} if tiled else {}),
            "cpu_gemv": lambda x, w: cpu.gemv(x, w),  # looked up per call: tests patch it
            "triton_gemv": triton_kernel(triton_module, "gemv"),
            "triton_gemm": triton_kernel(triton_module, "gemm"),
        }
        self._logged: set[tuple[str, str]] = set()

    def select(
        self, fmt: Any, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
    ) -> str:
        """The kernel for a format, input width, activation dtype, row count and device."""
        return select_packed_kernel(
            self.KERNELS,
            rows=rows,
            device=device,
            native=self.cpu.native,
            native_rows=self.cpu.MAX_ROWS,
            fallback=self.fallback,
            what=self.what,
        )

    def log_choice(self, kernel: str, fmt: Any) -> None:
        """Log, once per (kernel, format), which path the packed Linear takes."""
        key = (kernel, fmt.label())
        if key not in self._logged:
            self._logged.add(key)
            logging.getLogger(__name__).info(
                "%s %s uses kernel %r", self.module_class, key[1], kernel
            )

    def run(self, kernel: str, x: torch.Tensor, w: Any) -> torch.Tensor:
        """``x @ W.T + bias`` through the named kernel (logged once per format)."""
        self.log_choice(kernel, w.fmt)
        return self.KERNELS[kernel](x, w)
