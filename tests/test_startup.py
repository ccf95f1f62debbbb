"""`import compress` and `compress --help` stay light; transformers learns about compress
exports whichever of the two is imported first."""

import subprocess
import sys

import pytest


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys, contextlib, io\n"
        "from compress.cli import run\n"
        "with contextlib.redirect_stdout(io.StringIO()) as text:\n"
        "    code = run(['--help'])\n"
        "assert code == 0 and 'apply' in text.getvalue(), text.getvalue()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    assert run_python(code) == "[]"


@pytest.mark.parametrize(
    "imports",
    ["import compress\nimport transformers", "import transformers\nimport compress"],
    ids=["compress-first", "transformers-first"],
)
def test_transformers_knows_compress_exports_after_import(imports):
    code = (
        f"{imports}\n"
        "from transformers import CONFIG_MAPPING\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as Q\n"
        "from compress.export.manifest import GUARDED_MODEL_TYPE\n"
        "print('compress' in Q, GUARDED_MODEL_TYPE in CONFIG_MAPPING)\n"
    )
    assert run_python(code) == "True True"


def test_passes_are_registered_on_first_lookup():
    code = (
        "import sys\n"
        "from compress import registry\n"
        "before = 'compress.quant.gptq' in sys.modules\n"
        "names = sorted(registry.available_passes())\n"
        "print(before, 'gptq' in names, 'rtn' in names)\n"
    )
    assert run_python(code) == "False True True"
