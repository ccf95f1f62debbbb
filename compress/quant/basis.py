"""What the passes that change the model's basis share (``rotate``, ``rearrange``): they rewrite
the embedding, every layer and the output head together, so they run on the whole unquantized
model in memory, and they find the Linears they rewrite by name."""

from __future__ import annotations

from torch import nn

from compress.errors import PassError
from compress.ir import quantized_modules

__all__ = ["decoder_linear", "require_whole_float_model"]


def require_whole_float_model(model: nn.Module, pass_name: str, undone_by: str, does: str) -> None:
    """Refuse a model that holds integer codes (``undone_by``: what the pass would do to them)
    or whose weights are offloaded (``does``: what the pass changes)."""
    quantized = quantized_modules(model)
    if quantized:
        raise PassError(
            f"{pass_name} after a quantization pass: {next(iter(quantized))} (and "
            f"{len(quantized) - 1} more) already hold codes that {undone_by} would invalidate",
            hint=f"put {pass_name} first in the recipe's passes",
        )
    if any(p.is_meta for p in model.parameters()):
        raise PassError(
            f"{pass_name} {does} the embedding, every layer and the output head together and "
            "needs the whole model in memory",
            hint="run without --offload (model.offload: false)",
        )


def decoder_linear(modules: dict[str, nn.Module], name: str, pass_name: str) -> nn.Linear:
    """``modules[name]``, which must still be a float ``nn.Linear``."""
    module = modules[name]
    if not isinstance(module, nn.Linear):
        raise PassError(
            f"{pass_name}: {name} is a {type(module).__name__}, expected nn.Linear",
            hint=f"put {pass_name} before any quantization pass",
        )
    return module
