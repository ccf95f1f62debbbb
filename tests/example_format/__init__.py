"""An example format added from outside the package: the whole of what a new format needs.

Importing this folder registers kind ``int8_rowscale``: int8 codes, one fp32 scale per row. The
test in tests/test_format_registry.py exports, reloads and inspects a model in it; nothing
under compress/ knows it exists.
"""

from tests.example_format.spec import RowScaleInt8

__all__ = ["RowScaleInt8"]
