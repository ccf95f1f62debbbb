"""Layer-by-layer calibration: compress decoder layer i on the outputs of compressed layers < i.

The engine captures what decoder layer 0 receives for every calibration batch (hidden states and
whatever else the model passes it: masks, position embeddings, cache positions), then for each
layer in turn lets a pass collect statistics through hooks while the layer runs over all batches,
lets it compress the layer, and runs the compressed layer to produce the next layer's inputs.
Errors of earlier layers are thus seen, and corrected for, by later ones (as in GPTQ).

This covers the Llama family and any Hugging Face decoder whose blocks live in one
``nn.ModuleList`` and take the hidden states as their first argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import PassError
from compress.registry import LayerAccess, PassReport
from compress.utils.memory import release_free_memory
from compress.utils.modules import decoder_layers
from compress.utils.progress import NullProgress, Progress

__all__ = [
    "LayerBatches",
    "LayerStep",
    "capture_layer_inputs",
    "for_each_layer",
    "run_sequential",
]


class _StopForward(Exception):
    """Raised by the capture hook: nothing after decoder layer 0 needs to run."""


@dataclass
class LayerBatches:
    """The inputs of one decoder layer for every calibration batch."""

    hidden: list[torch.Tensor]  # (batch, seq, hidden) per batch
    kwargs: list[dict[str, Any]]  # the other arguments the model passed the layer

    def run(self, layer: nn.Module) -> list[torch.Tensor]:
        """The layer's output hidden states for every batch."""
        outputs = []
        for hidden, kwargs in zip(self.hidden, self.kwargs, strict=True):
            output = layer(hidden, **kwargs)
            outputs.append(output[0] if isinstance(output, tuple) else output)
        return outputs


# (index, qualified layer name, layer, run-all-batches) -> None; compresses the layer in place
LayerStep = Callable[[int, str, nn.Module, Callable[[], None]], None]


def capture_layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> LayerBatches:
    """Run the model up to decoder layer 0 on each batch of ``input_ids`` (samples, seq_len)."""
    _, layers = decoder_layers(model)
    captured = LayerBatches(hidden=[], kwargs=[])

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], args[1:]
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise PassError(
                f"cannot find the hidden states passed to {type(module).__name__}",
                hint="sequential calibration needs decoder layers that take hidden states first",
            )
        if rest:
            raise PassError(
                f"{type(module).__name__} receives {len(rest)} extra positional arguments",
                hint="sequential calibration supports layers called as layer(hidden, **kwargs)",
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size]
                try:
                    model(input_ids=batch.to(_device(model)), use_cache=False)
                except _StopForward:
                    continue
                raise PassError(
                    f"{type(model).__name__}: decoder layer 0 was never called",
                    hint="the model's forward does not go through its decoder layers",
                )
    finally:
        handle.remove()
    return captured


def run_sequential(
    model: nn.Module,
    input_ids: torch.Tensor,
    step: LayerStep,
    *,
    batch_size: int = 8,
    description: str = "calibrate layers",
    progress: Progress | None = None,
    layers: LayerAccess | None = None,
    report: PassReport | None = None,
    changes_layers: bool = True,
) -> None:
    """Call ``step`` on every decoder layer in order, on the outputs of the compressed layers.

    ``step(index, name, layer, run)`` installs its hooks, calls ``run()`` to pass all calibration
    batches through the (still uncompressed) layer, removes its hooks and compresses the layer.
    ``layers`` decides where layers live and checkpoints each finished one (with the part of
    ``report`` about it); layers an interrupted run already finished are restored, not redone.
    ``changes_layers=False`` (a step that only measures): the outputs of the step's last
    ``run()`` feed the next layer, instead of running the layer once more.
    """
    progress = progress or NullProgress()
    access = layers or LayerAccess()
    prefix, blocks = decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        with access.embedding(model):
            batches = capture_layer_inputs(model, input_ids, batch_size)
        release_free_memory()  # an offloaded embedding was just dropped
        start = _restore_finished(access, prefix, blocks, report, activations=True)
        if 0 < start < len(blocks):
            saved = access.resume_hidden()
            if saved is None or len(saved) != len(batches.hidden):
                raise PassError(
                    f"checkpoint after layer {start - 1} has no usable calibration activations",
                    hint="rerun without --resume",
                )
            batches.hidden = saved
        pending = range(start, len(blocks))
        for index in progress.track(pending, description, total=len(pending)):
            layer = blocks[index]
            access.load(index, layer)
            produced: list[list[torch.Tensor]] = []

            def run(
                layer: nn.Module = layer, produced: list[list[torch.Tensor]] = produced
            ) -> None:
                with torch.no_grad():
                    outputs = batches.run(layer)
                if not changes_layers:
                    produced[:] = [outputs]

            step(index, f"{prefix}.{index}", layer, run)
            access.load(index, layer)  # weights the step released are rebuilt from their codes
            if produced:
                batches.hidden = produced[0]
            else:
                with torch.no_grad():
                    batches.hidden = batches.run(layer)
            access.finish(index, f"{prefix}.{index}", layer, batches.hidden, report)
            release_free_memory()  # the layer's statistics and temporaries
    finally:
        model.train(was_training)


def for_each_layer(
    model: nn.Module,
    step: Callable[[int, str, nn.Module], None],
    *,
    description: str,
    progress: Progress | None = None,
    layers: LayerAccess | None = None,
    report: PassReport | None = None,
) -> None:
    """Call ``step(index, name, layer)`` on every decoder layer: the calibration-free loop.

    Goes through ``layers`` like :func:`run_sequential`, so offloading and resume work the same
    for passes that need no activations.
    """
    progress = progress or NullProgress()
    access = layers or LayerAccess()
    prefix, blocks = decoder_layers(model)
    start = _restore_finished(access, prefix, blocks, report, activations=False)
    pending = range(start, len(blocks))
    for index in progress.track(pending, description, total=len(pending)):
        access.load(index, blocks[index])
        step(index, f"{prefix}.{index}", blocks[index])
        access.finish(index, f"{prefix}.{index}", blocks[index], None, report)


def _restore_finished(
    access: LayerAccess,
    prefix: str,
    blocks: nn.ModuleList,
    report: PassReport | None,
    *,
    activations: bool,
) -> int:
    """Restore the layers an interrupted run finished; the index of the first pending one."""
    start = access.done_layers(len(blocks), activations=activations)
    for index in range(start):
        access.restore(index, f"{prefix}.{index}", blocks[index], report)
    return start


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        if not parameter.is_meta:  # offloaded layers sit on meta until loaded
            return parameter.device
    return torch.device("cpu")
