"""The recipe schema: typed, frozen sections with unknown keys refused.

``passes`` holds the registered passes' config objects (:mod:`compress.registry`), in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from compress.recipe.messages import _build_passes, _raise
from compress.registry import PassConfig, config_for

__all__ = [
    "CalibrationSpec",
    "EvaluateSpec",
    "ExportSpec",
    "LmEvalTasksSpec",
    "ModelSpec",
    "Recipe",
]


class _Spec(BaseModel):
    """Recipe sections: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Spec):
    """Which model to compress; ``model: NAME`` is shorthand for ``model: {name: NAME}``."""

    shorthand: ClassVar[str] = "a model name"  # what error hints offer besides the mapping

    name: str = Field(
        min_length=1, description="builtin alias, hub id, local HF folder or .gguf file"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype to load the weights in; auto keeps the checkpoint's"
    )
    trust_remote_code: bool = Field(
        default=False, description="allow the checkpoint's own modelling code (runs its Python)"
    )
    offload: bool = Field(
        default=False,
        description="keep the weights on disk and load one decoder layer at a time (models "
        "larger than memory); export is then written shard by shard",
    )


class CalibrationSpec(_Spec):
    """Text the calibrated passes see; fixed seed so a rerun gives the same model."""

    dataset: str = Field(
        default="builtin:wiki", description="builtin:NAME, a hub dataset or a file"
    )
    samples: int = Field(default=128, gt=0, description="number of calibration sequences")
    seq_len: int = Field(default=512, gt=0, description="tokens per calibration sequence")
    seed: int = Field(default=0, description="seed for picking the calibration windows")


class ExportSpec(_Spec):
    """Where the compressed model is written; the folder appears whole or not at all."""

    dir: Path = Field(description="folder to create (relative to the working directory)")
    format: Literal["compress", "compressed-tensors", "bitsandbytes"] = Field(
        default="compress",
        description="on-disk format of the export: compress (every format, our loader), "
        "compressed-tensors (int4/int8 pack-quantized, loadable by vLLM and transformers) or "
        "bitsandbytes (nf4/fp4 as Linear4bit saves them, loadable by transformers + "
        "bitsandbytes)",
    )
    overwrite: bool = Field(default=False, description="replace an existing folder at dir")
    sparse: bool = Field(
        default=True,
        description='store integer layers pruned N:M (prune pattern: "2:4") as their kept codes '
        "plus positions, and pruned unquantized layers as their nonzero values plus a bitmask, "
        "read by sparse kernels (format: compress only); false stores them dense",
    )

    @field_validator("dir")
    @classmethod
    def _names_a_folder(cls, value: Path) -> Path:
        # Path("") is "."; exporting over the working directory would replace it.
        if str(value) in ("", "."):
            raise ValueError("must name a folder to create, not the working directory")
        return value


class LmEvalTasksSpec(_Spec):
    """lm-eval tasks scored on the export and on the original, on the same items."""

    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task names (offline = the default offline set; "
        "offline_all, offline_<name>, or any task lm-eval's registry knows)",
    )
    limit: int | None = Field(default=None, gt=0, description="items per task; null = all")
    num_fewshot: int | None = Field(
        default=None, ge=0, description="few-shot examples; null = each task's own default"
    )
    batch_size: int = Field(default=8, gt=0, description="requests per forward pass")
    include_path: list[str] = Field(
        default_factory=list, description="folders of local lm-eval task YAML files"
    )
    max_length: int | None = Field(
        default=None, gt=0, description="tokens per window; null = the model's context"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # `tasks: offline` and `tasks: a,b` read as the CLI's --tasks does
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


class EvaluateSpec(_Spec):
    """How the compressed model is judged against the original."""

    perplexity: list[str] = Field(
        default_factory=lambda: ["builtin:wiki"], description="corpora to measure perplexity on"
    )
    seq_len: int = Field(default=512, gt=0, description="tokens per evaluation window")
    max_windows: int | None = Field(
        default=32, gt=0, description="windows per corpus; null = the whole corpus"
    )
    kl: bool = Field(
        default=True, description="KL divergence and top-1 agreement against the original"
    )
    batch_size: int = Field(default=4, gt=0, description="windows per forward pass")
    speed: bool = Field(
        default=True,
        description="decode tokens/s and peak memory of the export and of the original, each "
        "loaded in a process of its own (about 10 s for a small model)",
    )
    lm_eval: LmEvalTasksSpec | None = Field(
        default=None,
        description="lm-eval tasks, e.g. {tasks: [offline], limit: 200}; null = none",
    )


class Recipe(_Spec):
    """A whole recipe. ``passes`` holds the registered passes' config objects, in order."""

    model: ModelSpec = Field(description="the model to compress")
    calibration: CalibrationSpec = Field(
        default_factory=CalibrationSpec, description="calibration text for calibrated passes"
    )
    passes: list[SerializeAsAny[PassConfig]] = Field(
        description="the passes to run, in order; each is {pass: NAME, ...settings}"
    )
    export: ExportSpec | None = Field(
        default=None, description="where to write the result; null = no export"
    )
    evaluate: EvaluateSpec | None = Field(default=None, description="evaluation; null = skip")

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("passes", mode="before")
    @classmethod
    def _passes_from_mappings(cls, value: Any) -> Any:
        # The Python-API entry: Recipe(passes=[{"pass": "rtn"}, RTNConfig()]). parse_recipe has
        # already turned every mapping into a config, so for it this only re-checks them.
        if not isinstance(value, (list, tuple)):
            # pydantic would take a set or a mapping's keys as a list; order matters here.
            raise ValueError("expected a list of passes, e.g. [{pass: rtn, bits: 4}]")
        configs, problems = _build_passes(list(value), {})
        if problems:
            _raise(problems, "<recipe>")
        return configs

    def pass_names(self) -> list[str]:
        """Registered names of the passes, in order."""
        return [config_for(config).name for config in self.passes]

    def resolved(self) -> dict[str, Any]:
        """Every default filled in, JSON-serialisable: what a run records next to its results."""
        return {
            "model": self.model.model_dump(mode="json"),
            "calibration": self.calibration.model_dump(mode="json"),
            "passes": [
                {"pass": config_for(config).name, **config.model_dump(mode="json")}
                for config in self.passes
            ],
            "export": self.export.model_dump(mode="json") if self.export else None,
            "evaluate": self.evaluate.model_dump(mode="json") if self.evaluate else None,
        }
