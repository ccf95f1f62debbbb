"""The pass registry: a pass is a typed config plus a function, registered by name.

Builtin passes are registered by the explicit import list in :mod:`compress.builtins`, never by
scanning packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compress.errors import PassError, RecipeError, nearest
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "LayerAccess",
    "PassConfig",
    "PassContext",
    "PassFn",
    "PassReport",
    "RegisteredPass",
    "available_passes",
    "config_for",
    "get_pass",
    "register_pass",
]


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


C = TypeVar("C", bound=PassConfig)


class LayerAccess:
    """How layer-wise passes reach decoder layers, and where finished layers go.

    This default keeps the whole model in memory and remembers nothing. The pipeline's
    :class:`compress.offload.LayerStore` instead checkpoints every finished layer (so a killed run
    resumes) and, when offloading, keeps layers on disk and loads one at a time.
    """

    def done_layers(self, count: int, *, activations: bool = False) -> int:
        """How many leading layers the current pass already finished in an earlier run.

        ``activations``: the pass continues from saved layer outputs, so only layers whose
        outputs were saved count.
        """
        return 0

    def restore(self, index: int, name: str, layer: nn.Module, report: PassReport | None) -> None:
        """Bring back what the current pass did to a finished layer (state and report)."""

    def resume_hidden(self) -> list[torch.Tensor] | None:
        """Saved outputs of the last finished layer: the inputs of the first pending one."""
        return None

    @contextmanager
    def embedding(self, model: nn.Module) -> Iterator[None]:
        """Make what runs before decoder layer 0 (embeddings) usable for the duration."""
        yield

    @contextmanager
    def outside(self, model: nn.Module, names: Sequence[str]) -> Iterator[None]:
        """Make these tensors outside the decoder layers usable for the duration (export)."""
        yield

    def pass_folder(self, name: str) -> Path | None:
        """A folder for the current pass's own checkpoints (a whole-model pass such as
        ``distill``), kept beside the export for ``--resume``; ``None``: nothing is kept."""
        return None

    @property
    def resuming(self) -> bool:
        """Whether this run continues an interrupted one (``--resume``)."""
        return False

    def load(self, index: int, layer: nn.Module, *, codes_only: bool = False) -> None:
        """Make layer ``index`` usable (its weights in memory) before a pass works on it.

        ``codes_only``: quantized Linears get their records but no float weight (an exporter
        packs the codes and never reads the weight).
        """

    def unload(self, index: int, layer: nn.Module) -> None:
        """Layer ``index`` is not needed now; an offloading store drops its weights."""

    def release_weight(self, module: nn.Module) -> None:
        """``module`` (of the layer being worked on) is quantized and its float weight is not
        read again before the layer runs: an offloading store frees it, and :meth:`load`
        rebuilds it from the codes. A wide layer's other weights are thus gone while its
        largest Linear is calibrated."""

    def finish(
        self,
        index: int,
        name: str,
        layer: nn.Module,
        hidden: list[torch.Tensor] | None,
        report: PassReport | None,
    ) -> None:
        """The current pass is done with layer ``index``; ``hidden`` are its outputs."""


@dataclass
class PassContext:
    """What a pass may use besides the model and its config."""

    progress: Progress = field(default_factory=NullProgress)
    strict: bool = False
    # (samples, seq_len) token ids from the recipe's calibration block; set for calibrated passes
    calibration: torch.Tensor | None = None
    calibration_source: str = ""
    # how layer-wise passes get and put decoder layers (in memory unless the pipeline offloads)
    layers: LayerAccess = field(default_factory=LayerAccess)
    # the model's tokenizer, for passes that read text of their own (distill); set by the pipeline
    tokenizer: Any = None
    # builds the original model (the teacher) on first use; set by the pipeline
    teacher_loader: Callable[[], nn.Module] | None = None
    _teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def teacher(self) -> nn.Module:
        """The original, uncompressed model (built on first call, then kept): what a pass
        compares against or distils from."""
        if self._teacher is None:
            if self.teacher_loader is None:
                raise PassError(
                    "this pass needs the original model as a teacher, and none is available",
                    hint="run it through compress apply or Pipeline, which provide it",
                )
            self._teacher = self.teacher_loader().eval()
        return self._teacher

    def require_calibration(self, pass_name: str) -> torch.Tensor:
        """The calibration token ids; a clear error for a calibrated pass run without them."""
        if self.calibration is None:
            raise PassError(
                f"{pass_name} needs calibration data",
                hint="add calibration: {dataset: builtin:wiki, samples: 128, seq_len: 512}",
            )
        return self.calibration


@dataclass
class PassReport:
    """What a pass did: modules touched, modules skipped (with why), and error metrics."""

    name: str
    touched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a user should know (e.g. untied)
    # curves over the pass's own progress (distill: loss and held-out KL against steps)
    series: dict[str, list[float]] = field(default_factory=dict)

    def check_strict(self, strict: bool) -> None:
        """Under ``--strict`` a skipped module is a failure, not a note."""
        if strict and self.skipped:
            first, reason = next(iter(self.skipped.items()))
            raise PassError(
                f"pass {self.name!r} skipped {len(self.skipped)} module(s), e.g. {first}: {reason}",
                hint="remove --strict, or add the modules to the pass's ignore list",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "touched": list(self.touched),
            "skipped": dict(self.skipped),
            "metrics": dict(self.metrics),
            "per_module": {k: dict(v) for k, v in self.per_module.items()},
            **({"notes": list(self.notes)} if self.notes else {}),
            **({"series": {k: list(v) for k, v in self.series.items()}} if self.series else {}),
        }


PassFn = Callable[[nn.Module, Any, PassContext], PassReport]


@dataclass(frozen=True)
class RegisteredPass(Generic[C]):
    name: str
    config_cls: type[C]
    fn: Callable[[nn.Module, C, PassContext], PassReport]
    summary: str
    calibrated: bool = False  # needs PassContext.calibration


_REGISTRY: dict[str, RegisteredPass[Any]] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Import the explicit list of builtin passes (once): passes register on first lookup, so
    ``import compress`` and ``compress --help`` stay light."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("compress.builtins")


def register_pass(
    name: str, config_cls: type[C], *, calibrated: bool = False
) -> Callable[
    [Callable[[nn.Module, C, PassContext], PassReport]],
    Callable[[nn.Module, C, PassContext], PassReport],
]:
    """Register ``fn`` as pass ``name`` configured by ``config_cls``; returns ``fn`` unchanged.

    ``calibrated`` passes receive calibration token ids in ``PassContext.calibration``.
    """

    def decorate(
        fn: Callable[[nn.Module, C, PassContext], PassReport],
    ) -> Callable[[nn.Module, C, PassContext], PassReport]:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is already registered")
        if not issubclass(config_cls, PassConfig):
            raise TypeError(f"{config_cls.__name__} must derive from PassConfig")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = RegisteredPass(name, config_cls, fn, summary, calibrated)
        return fn

    return decorate


def get_pass(name: str) -> RegisteredPass[Any]:
    """The registered pass ``name``; an unknown name raises with the nearest valid one."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        guess = nearest(name, _REGISTRY)
        raise RecipeError(
            f"unknown pass {name!r}",
            hint=(f"did you mean {guess!r}? " if guess else "")
            + f"available passes: {', '.join(sorted(_REGISTRY))}",
        ) from None


def available_passes() -> dict[str, RegisteredPass[Any]]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def config_for(config: PassConfig) -> RegisteredPass[Any]:
    """The registered pass whose config class is ``type(config)``."""
    _load_builtins()
    for entry in _REGISTRY.values():
        if type(config) is entry.config_cls:
            return entry
    raise PassError(f"{type(config).__name__} is not the config of any registered pass")
