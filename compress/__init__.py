"""compress: a declarative compression pipeline for Hugging Face causal LMs.

``import compress`` registers the builtin passes and the ``compress`` quantization method with
transformers, so ``AutoModelForCausalLM.from_pretrained(export_dir)`` loads packed exports.
"""

from __future__ import annotations

from compress import builtins as _builtins  # noqa: F401  (registers builtin passes)
from compress.errors import CompressError
from compress.export.hf import register as _register_with_transformers

__all__ = ["CompressError", "__version__"]

__version__ = "0.1.0"

_register_with_transformers()
