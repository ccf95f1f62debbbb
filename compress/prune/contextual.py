"""The ``contextual`` pass: training-free activation sparsity at generation time (TEAL).

TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models") observes
that the inputs of a decoder layer's projections are zero-mean and heavy-tailed, so zeroing the
entries of small magnitude, per token, changes the output little; at decode (one token, memory
bound) a zeroed input entry means a weight column that need not be read. The pass calibrates one
magnitude threshold per layer and per input site so that the target fraction of entries falls
below it on calibration text:

* ``qkv``: the input of ``q_proj``/``k_proj``/``v_proj`` (one shared input, one threshold);
* ``o``: the input of ``o_proj``;
* ``gate_up``: the input of ``gate_proj``/``up_proj``;
* ``down``: the input of ``down_proj``.

Layers are calibrated in order through :mod:`compress.sequential` (layer i's thresholds are
measured on the outputs of the already sparse layers before it), and inside a layer site by site
in the order a token meets them (four runs of the layer), so every threshold is measured on the
inputs it will see at run time. A threshold is the ``sparsity`` quantile of the entries' score
over (a strided sample of at most ``max_values`` of) the calibration entries.

The score of an input entry ``x_j`` is ``|x_j|`` (``score: magnitude``, TEAL, the default) or
``|x_j| * c_j`` (``score: weighted``), where ``c_j`` is the norm of the weight
column ``j`` reads (over every projection sharing the input, normalised to a root-mean-square
of 1). Zeroing ``x_j`` moves the output by ``x_j * W[:, j]``, of norm ``|x_j| * |W[:, j]|``: the
weighted score drops the entries whose removal changes the output least (WINA, Chen et al.
2025, "Weight Informed Neuron Activation"), at no run-time cost beyond one multiply per input
entry. The column norms are not stored: the loader recomputes them from the weights. On
SmolLM2-135M the weighted score did worse than plain magnitude at 50% (KL 0.519 against 0.493,
fp32, 16 evaluation windows; ``benchmarks/contextual.md``); our reading, not tested: the
per-entry error model ignores the cross terms between columns and how an error reaches the
logits.

Results: the projections become :class:`ContextualLinear` (an ``nn.Linear`` holding its weight
transposed, so parameter names and the state dict are unchanged). Multi-token inputs (prefill,
teacher-forced evaluation) are masked and multiplied densely; one-token inputs take the sparse
decode kernel of :mod:`compress.prune.contextual_kernel`, which reads only the kept weight
columns. The thresholds reach the export as ``contextual_sparsity`` in ``config.json`` (a
:class:`compress.ir.ConfigPatch`), with ``sirius`` settings when ``sirius_period`` is set; a
plain-weight export still loads in stock transformers (dense), and after ``import compress`` it
loads sparse, with ``generate`` running Sirius correction (:mod:`compress.prune.sirius`) when the
export asks for it.

Put ``contextual`` after weight passes (it reads plain ``nn.Linear`` projections; quantized
or otherwise replaced ones are skipped and reported).

Example recipe entry::

    calibration: {dataset: builtin:wiki, samples: 32, seq_len: 512}
    passes:
      - {pass: contextual, sparsity: 0.5, sirius_period: 8, sirius_draft_confidence: 0.5}
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.errors import PassError
from compress.ir import ConfigPatch, attach, get
from compress.layouts import Layout, layout_of
from compress.prune.contextual_kernel import sparse_gemv
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.sequential import run_sequential
from compress.utils.hooks import capture_inputs

__all__ = [
    "CONFIG_KEY",
    "SITES",
    "ContextualConfig",
    "ContextualLinear",
    "Site",
    "contextual",
    "contextual_",
    "dense_mode",
    "error_curve",
    "export_spec",
    "greedy_allocation",
    "install_from_config_",
    "magnitude_threshold",
    "site_column_scale",
    "site_linears",
]

log = logging.getLogger(__name__)

Site = Literal["qkv", "o", "gate_up", "down"]
SITES: tuple[Site, ...] = ("qkv", "o", "gate_up", "down")
Score = Literal["magnitude", "weighted"]
CONFIG_KEY = "contextual_sparsity"
"""The ``config.json`` key holding the thresholds (and Sirius settings) of an export."""
SPEC_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 predates ``score`` (its thresholds are on ``|x|``)."""


class ContextualConfig(PassConfig):
    """Settings of the ``contextual`` pass."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of input entries zeroed")
    sites: tuple[Site, ...] = Field(SITES, min_length=1, description="inputs made sparse")
    sirius_period: int | None = Field(
        None, ge=1, description="generate with Sirius correction every N tokens (export config)"
    )
    sirius_draft_confidence: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Sirius checks early after a draft the sparse model gives less probability",
    )
    allocation: Literal["uniform", "greedy"] = Field(
        "uniform", description="one sparsity for every site, or per site by output error"
    )
    score: Score = Field(
        "magnitude", description="rank input entries by |x| (TEAL) or |x| * weight column norm"
    )
    batch_size: int = Field(4, ge=1)
    max_values: int = Field(4_000_000, ge=1000, description="sampled |x| entries per threshold")

    @model_validator(mode="after")
    def _draft_confidence_needs_a_period(self) -> ContextualConfig:
        if self.sirius_draft_confidence is not None and self.sirius_period is None:
            raise ValueError(
                f"sirius_draft_confidence {self.sirius_draft_confidence} applies to Sirius "
                "correction; set sirius_period too (or leave it out)"
            )
        return self


# --------------------------------------------------------------------------------- tensor maths


def magnitude_threshold(values: torch.Tensor, sparsity: float) -> float | None:
    """The ``sparsity`` quantile of ``|values|``: entries with ``|x| <= t`` make up (at least)
    that fraction. ``None`` when nothing is to be zeroed."""
    flat = values.reshape(-1).abs().to(torch.float32)
    k = round(sparsity * flat.numel())
    if k <= 0:
        return None
    return float(flat.kthvalue(min(k, flat.numel())).values)


def error_curve(
    samples: torch.Tensor, column_energy: torch.Tensor, levels: int, score: Score = "magnitude"
) -> torch.Tensor:
    """Relative output error of a Linear when its lowest-scoring entries are zeroed.

    ``samples`` (tokens, in) inputs, ``column_energy`` (in,) the squared column norms of the
    weight (summed over the Linears sharing the input). Zeroing entry ``x_ij`` adds about
    ``x_ij**2 * |W[:, j]|**2`` to the output error energy (cross terms ignored); entries are
    zeroed in the order of ``score`` (``|x|``, or ``weighted``: that error itself). Returns
    (levels + 1,) the error at sparsity ``k / levels`` as a fraction of the output energy."""
    energy = samples.to(torch.float32).square() * column_energy.to(torch.float32)[None, :]
    ranked = energy if score == "weighted" else samples.abs()
    order = ranked.reshape(-1).argsort()
    cumulative = torch.cumsum(energy.reshape(-1)[order], 0)  # (entries,)
    total = cumulative[-1].clamp_min(1e-30)
    counts = (torch.arange(levels + 1) * order.numel()) // levels  # entries zeroed per level
    at = torch.where(counts > 0, cumulative[(counts - 1).clamp_min(0)], torch.zeros(()))
    return at / total


def greedy_allocation(
    curves: dict[str, torch.Tensor], weights: dict[str, float], sparsity: float
) -> dict[str, float]:
    """Per-site sparsities whose ``weights``-weighted mean reaches ``sparsity``, raised one level
    at a time where the relative error grows least per weight made skippable (TEAL's greedy
    allocation, on the error model of :func:`error_curve`). ``curves``: site -> (levels + 1,)."""
    levels = len(next(iter(curves.values()))) - 1
    step = {site: 0 for site in curves}
    total = sum(weights.values())
    while sum(weights[s] * step[s] / levels for s in curves) < sparsity * total - 1e-9:
        open_sites = [s for s in curves if step[s] < levels - 1]
        if not open_sites:
            break
        best = min(
            open_sites,
            key=lambda s: float(curves[s][step[s] + 1] - curves[s][step[s]]) / weights[s],
        )
        step[best] += 1
    return {site: step[site] / levels for site in curves}


def _weight(layer: nn.Module, name: str) -> torch.Tensor:
    weight = layer.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise PassError(f"contextual: {name} has no weight tensor")
    return weight.detach()


def _sample(x: torch.Tensor, stride: int, scale: torch.Tensor | None) -> torch.Tensor:
    """Scores of every ``stride``-th token's input entries, flattened (fp32)."""
    rows = x.detach().reshape(-1, x.shape[-1])[::stride].abs().to(torch.float32)  # (tokens, in)
    return (rows if scale is None else rows * scale).reshape(-1)


def site_column_scale(layer: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
    """(in,) fp32: the norms of the input columns over the projections ``names`` (of one
    ``layer``) that share an input, divided by their root mean square; the factor of ``|x|`` in
    the weighted score."""
    energy = sum(_weight(layer, name).to(torch.float32).square().sum(dim=0) for name in names)
    assert isinstance(energy, torch.Tensor)
    return (energy / energy.mean().clamp_min(1e-30)).sqrt()


# ----------------------------------------------------------------------------------- the module


class ContextualLinear(nn.Linear):
    """A Linear whose input entries scoring ``<= threshold`` are zeroed: ``|x|``, or
    ``|x| * input_scale`` when the layer has an ``input_scale`` (the weighted score).

    ``weight`` is a (out, in) view of the contiguous (in, out) ``weight_t`` (one copy in
    memory), so a kept input entry is one contiguous weight row for the decode kernel. One-token
    inputs take :func:`compress.prune.contextual_kernel.sparse_gemv`; longer ones the masked
    dense product. ``active = False`` (see :func:`dense_mode`) runs the plain dense Linear.
    ``input_scale`` is a non-persistent buffer: the state dict stays the Linear's.
    """

    threshold: float | None
    active: bool
    input_scale: torch.Tensor | None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: float | None, input_scale: torch.Tensor | None = None
    ) -> ContextualLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        weight_t = linear.weight.detach().t().contiguous()  # (in, out)
        new.weight = nn.Parameter(weight_t.t(), requires_grad=False)  # (out, in) view
        new.bias = linear.bias
        new.threshold = threshold
        new.active = True
        new.register_buffer("input_scale", input_scale, persistent=False)
        return new

    def masked(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """``x`` with the entries scoring ``<= threshold`` zeroed."""
        score = x.abs() if self.input_scale is None else x.abs() * self.input_scale
        return torch.where(score > threshold, x, torch.zeros_like(x))

    def weight_t(self) -> torch.Tensor:
        """The (in, out) contiguous weight the kernel reads (rebuilt if ``weight`` was
        replaced by a contiguous tensor, e.g. a state dict assigned into it)."""
        weight = self.weight
        if not weight.t().is_contiguous():
            with torch.no_grad():
                weight_t = weight.detach().t().contiguous()  # (in, out)
                self.weight = nn.Parameter(weight_t.t(), requires_grad=False)
        return self.weight.detach().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = self.threshold
        if not self.active or threshold is None:
            return nn.functional.linear(x, self.weight, self.bias)
        if x.numel() == self.in_features and not torch.is_grad_enabled():
            flat = x.reshape(-1)
            if self.input_scale is None:
                out = sparse_gemv(flat, self.weight_t(), threshold)  # (out,)
            else:  # the mask applied here; the kernel then skips the zeros
                out = sparse_gemv(self.masked(flat, threshold), self.weight_t(), 0.0)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)
        return nn.functional.linear(self.masked(x, threshold), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


@contextlib.contextmanager
def dense_mode(model: nn.Module) -> Iterator[None]:
    """Run every :class:`ContextualLinear` of ``model`` dense for the duration (the full model
    of Sirius); restored on exit, errors included."""
    modules = [m for m in model.modules() if isinstance(m, ContextualLinear)]
    before = [m.active for m in modules]
    try:
        for module in modules:
            module.active = False
        yield
    finally:
        for module, state in zip(modules, before, strict=True):
            module.active = state


# ------------------------------------------------------------------------------- orchestration


def site_linears(layout: Layout) -> dict[Site, tuple[str, ...]]:
    """The projections (relative to a decoder layer) that read each site's input."""
    attention, mlp = layout.attention, layout.mlp
    qkv = (attention.qkv,) if attention.qkv else (attention.q, attention.k, attention.v)
    gate_up = (mlp.gate_up,) if mlp.gate_up else (mlp.gate, mlp.up)
    return {
        "qkv": tuple(name for name in qkv if name),
        "o": (attention.o,),
        "gate_up": tuple(name for name in gate_up if name),
        "down": (mlp.down,),
    }


def _readable(layer: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """The projections among ``names`` that contextual sparsity can take (plain Linears)."""
    return tuple(
        name for name in names if type(layer.get_submodule(name)) in (nn.Linear, ContextualLinear)
    )


def contextual_(
    layer: nn.Module,
    layout: Layout,
    thresholds: dict[str, float | None],
    score: Score = "magnitude",
) -> dict[str, str]:
    """Make the projections of one decoder ``layer`` contextual with ``thresholds`` (by site)
    and ``score``, in place. Returns the projections skipped, with why."""
    skipped: dict[str, str] = {}
    for site, names in site_linears(layout).items():
        if site not in thresholds:
            continue
        readable = _readable(layer, names)
        scale = site_column_scale(layer, readable) if score == "weighted" and readable else None
        for name in names:
            module = layer.get_submodule(name)
            if isinstance(module, ContextualLinear):
                module.threshold = thresholds[site]
                module.input_scale = scale
                continue
            if name not in readable or not isinstance(module, nn.Linear):
                skipped[name] = f"a {type(module).__name__}, not a plain nn.Linear"
                continue
            owner, _, leaf = name.rpartition(".")
            parent = layer.get_submodule(owner) if owner else layer
            setattr(parent, leaf, ContextualLinear.from_linear(module, thresholds[site], scale))
    return skipped


def export_spec(
    sparsity: float,
    thresholds: list[dict[str, float | None]],
    sirius_period: int | None,
    score: Score = "magnitude",
    draft_confidence: float | None = None,
) -> dict[str, Any]:
    """The ``contextual_sparsity`` entry of an export's ``config.json``."""
    sirius: dict[str, Any] | None = {"period": sirius_period} if sirius_period else None
    if sirius and draft_confidence:
        sirius["draft_confidence"] = draft_confidence
    return {
        "version": SPEC_VERSION,
        "sparsity": sparsity,
        "score": score,
        "thresholds": thresholds,
        "sirius": sirius,
    }


def install_from_config_(model: nn.Module, spec: dict[str, Any] | None = None) -> int:
    """Make a loaded model sparse as its ``config.json``'s ``contextual_sparsity`` says (the
    export loader calls this after ``from_pretrained``); returns the projections made sparse.

    Unknown spec versions are refused; a layer count that does not match is an error."""
    spec = spec if spec is not None else getattr(model.config, CONFIG_KEY, None)
    if not spec:
        return 0
    if spec.get("version") not in READABLE_VERSIONS:
        raise PassError(
            f"config.json {CONFIG_KEY} has version {spec.get('version')!r}; this compress reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}",
            hint="upgrade compress, or re-export the model",
        )
    layout = layout_of(model)
    thresholds = spec.get("thresholds") or []
    if len(thresholds) != layout.num_layers:
        raise PassError(
            f"config.json {CONFIG_KEY} has thresholds for {len(thresholds)} layers, the model "
            f"has {layout.num_layers}",
            hint="the export does not match its config.json; re-export it",
        )
    score = spec.get("score", "magnitude")
    if score not in ("magnitude", "weighted"):
        raise PassError(
            f"config.json {CONFIG_KEY}.score is {score!r}; expected 'magnitude' or 'weighted'",
            hint="the export does not match this compress; re-export it",
        )
    layers: Any = model.get_submodule(layout.layers)  # the decoder's ModuleList
    before = sum(isinstance(m, ContextualLinear) for m in model.modules())
    for index, entry in enumerate(thresholds):
        skipped = contextual_(layers[index], layout, dict(entry), score)
        for name, why in skipped.items():
            log.info("contextual sparsity: %s left dense: %s", layout.qualified(index, name), why)
    return sum(isinstance(m, ContextualLinear) for m in model.modules()) - before


@register_pass("contextual", ContextualConfig, calibrated=True)
def contextual(model: nn.Module, config: ContextualConfig, context: PassContext) -> PassReport:
    """Contextual (activation) sparsity: per-layer magnitude thresholds on projection inputs."""
    if getattr(context.layers, "offloaded", False):
        raise PassError(
            "contextual cannot run on an offloaded model (its projections change type)",
            hint="run without --offload",
        )
    calibration = context.require_calibration("contextual")
    layout = layout_of(model)
    sites = site_linears(layout)
    report = PassReport(name="contextual")
    thresholds: list[dict[str, float | None]] = []

    def _allocate(layer: nn.Module, run: Callable[[], None]) -> dict[str, float]:
        """Per-site sparsities of one layer from its dense inputs (one extra run)."""
        readers: dict[str, nn.Module] = {s: layer.get_submodule(sites[s][0]) for s in config.sites}
        rows: dict[str, list[torch.Tensor]] = {site: [] for site in config.sites}
        budget = max(1, config.max_values // 4)

        def collect(site: str, x: torch.Tensor) -> None:
            flat = x.detach().reshape(-1, x.shape[-1])  # (tokens, in)
            stride = max(1, math.ceil(calibration.numel() * flat.shape[1] / budget))
            rows[site].append(flat[::stride].to(torch.float32))

        with capture_inputs(readers, collect):
            run()
        curves: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for site in config.sites:
            linears = [_weight(layer, name) for name in sites[site]]
            energy = torch.stack([w.to(torch.float32).square().sum(dim=0) for w in linears])
            curves[site] = error_curve(torch.cat(rows[site]), energy.sum(dim=0), 40, config.score)
            weights[site] = float(sum(w.numel() for w in linears))
        return greedy_allocation(curves, weights, config.sparsity)

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        found: dict[str, float | None] = dict.fromkeys(config.sites)
        skipped = contextual_(layer, layout, found, config.score)  # all dense until their turn
        scales = {  # the weighted score's column factors (None: scored by |x|)
            site: getattr(layer.get_submodule(sites[site][0]), "input_scale", None)
            for site in config.sites
        }
        metrics: dict[str, float] = {}
        target: dict[str, float] = dict.fromkeys(config.sites, config.sparsity)
        if config.allocation == "greedy":
            target = _allocate(layer, run)
            metrics.update({f"{site}_allocated": value for site, value in target.items()})
        for site in SITES:  # in the order a token meets them: each sees the sparse ones before
            if site not in config.sites:
                continue
            reader = layer.get_submodule(sites[site][0])
            width = int(getattr(reader, "in_features", 0) or 1)
            stride = max(1, math.ceil(calibration.numel() * width / config.max_values))
            held: list[torch.Tensor] = []

            def collect(_: str, x: torch.Tensor, held: list[torch.Tensor] = held,
                        stride: int = stride, scale: torch.Tensor | None = scales[site]
                        ) -> None:  # fmt: skip
                held.append(_sample(x, stride, scale))

            with capture_inputs({site: reader}, collect):
                run()
            if not held:
                raise PassError(f"contextual: layer {layer_name} saw no calibration input")
            values = torch.cat(held)
            found[site] = threshold = magnitude_threshold(values, target[site])
            contextual_(layer, layout, {site: threshold}, config.score)
            zeroed = float((values <= threshold).float().mean()) if threshold is not None else 0.0
            metrics[f"{site}_threshold"] = threshold if threshold is not None else 0.0
            metrics[f"{site}_calibration_sparsity"] = zeroed
        for name, why in skipped.items():
            report.skipped[f"{layer_name}.{name}"] = why
        thresholds.append(found)
        report.per_module[layer_name] = metrics
        report.touched.append(layer_name)

    run_sequential(
        model,
        calibration,
        step,
        batch_size=config.batch_size,
        description="contextual thresholds",
        progress=context.progress,
    )
    spec = export_spec(
        config.sparsity,
        thresholds,
        config.sirius_period,
        config.score,
        config.sirius_draft_confidence,
    )
    held = get(model, ConfigPatch)
    attach(model, ConfigPatch({**(held.updates if held else {}), CONFIG_KEY: spec}))
    setattr(model.config, CONFIG_KEY, spec)  # the in-memory config says it too
    sparsities = [
        value
        for metrics in report.per_module.values()
        for key, value in metrics.items()
        if key.endswith("_calibration_sparsity")
    ]
    report.metrics.update(
        target_sparsity=config.sparsity,
        calibration_sparsity=sum(sparsities) / max(len(sparsities), 1),
        layers=float(len(thresholds)),
        calibration_tokens=float(calibration.numel()),
    )
    if config.sirius_period:
        early = config.sirius_draft_confidence
        report.notes.append(
            f"generate() on the export runs Sirius correction every {config.sirius_period} tokens"
            + (f", or after a draft the sparse model gives p < {early}" if early else "")
        )
    report.check_strict(context.strict)
    return report
