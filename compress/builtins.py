"""The explicit list of builtin passes. Importing this module registers them."""

from __future__ import annotations

from compress.distill import distill as _distill
from compress.lossless import entropy_code as _entropy
from compress.prune import contextual as _contextual
from compress.prune import prune as _prune
from compress.quant import act_quant as _act_quant
from compress.quant import allocate as _allocate
from compress.quant import awq as _awq
from compress.quant import correct as _correct
from compress.quant import gptq as _gptq
from compress.quant import kv_cache as _kv_cache
from compress.quant import rearrange as _rearrange
from compress.quant import rotate as _rotate
from compress.quant import rtn as _rtn
from compress.quant import smoothquant as _smoothquant

__all__ = ["BUILTIN_PASS_MODULES"]

BUILTIN_PASS_MODULES = (
    _rotate,
    _rearrange,
    _smoothquant,
    _act_quant,
    _allocate,
    _rtn,
    _gptq,
    _awq,
    _correct,
    _kv_cache,
    _prune,
    _contextual,
    _distill,
    _entropy,
)
