"""Per-layer checkpoints, ``--resume`` and offloaded (layer-at-a-time) calibration.

The contract: an offloaded run and a resumed run write the very same weight bytes as a plain,
uninterrupted in-memory run of the same recipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compress.errors import RecipeError
from compress.offload import LayerStore, work_dir_for
from compress.pipeline import Pipeline
from compress.quant.awq import AWQConfig
from compress.quant.gptq import GPTQConfig
from compress.quant.rtn import RTNConfig
from compress.recipe import CalibrationSpec, ModelSpec

from .conftest import save_tiny_llama, write_word_text

LAYERS = 4
_RUN_CLI = "import sys; from compress.cli import run; sys.exit(run(sys.argv[1:]))"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with untied head and a byte tokenizer, saved as a HF folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), layers=LAYERS, seed=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_text(tmp_path_factory.mktemp("text") / "calib.txt", lines=60, words=40)


def _passes() -> list:
    return [
        AWQConfig(bits=4, group_size=32, grid=5),
        GPTQConfig(bits=4, group_size=32, act_order=True, observer="mse"),
    ]


def _pipeline(model_dir: Path, text_file: Path, out: Path, **kwargs) -> Pipeline:
    passes = kwargs.pop("passes", None) or _passes()
    return Pipeline(
        ModelSpec(name=str(model_dir)),
        passes,
        calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
        export=out,
        **kwargs,
    )


def _weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def plain_export(model_dir: Path, text_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "export"
    _pipeline(model_dir, text_file, out).run()
    return out


def test_checkpoints_are_removed_after_a_finished_run(plain_export: Path) -> None:
    assert not work_dir_for(plain_export).exists()
    assert _weight_bytes(plain_export)


def test_offloaded_run_writes_the_same_bytes(model_dir, text_file, plain_export, tmp_path) -> None:
    out = tmp_path / "offloaded"
    _pipeline(model_dir, text_file, out, offload=True).run()
    assert _weight_bytes(out) == _weight_bytes(plain_export)


def test_offloaded_rtn_run_writes_the_same_bytes(model_dir, text_file, tmp_path) -> None:
    rtn = [RTNConfig(bits=3, group_size=32, symmetric=False, observer="mse")]
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    _pipeline(model_dir, text_file, plain, passes=rtn).run()
    _pipeline(model_dir, text_file, offloaded, passes=rtn, offload=True).run()
    assert _weight_bytes(offloaded) == _weight_bytes(plain)


class _Killed(BaseException):
    """Stands for the process dying: not a CompressError, so checkpoints are kept."""


@pytest.mark.parametrize(
    ("pass_index", "layer", "offload"),
    [(0, 1, False), (1, 2, False), (1, 0, True)],
    ids=["awq-after-layer-1", "gptq-after-layer-2", "offloaded-gptq-after-layer-0"],
)
def test_resume_after_an_interruption_gives_identical_bytes(
    model_dir, text_file, plain_export, tmp_path, monkeypatch, pass_index, layer, offload
) -> None:
    out = tmp_path / "export"
    original_finish = LayerStore.finish
    calls: list[tuple[int, int]] = []

    def dying_finish(self, index, name, module, hidden, report):
        original_finish(self, index, name, module, hidden, report)
        calls.append((self.pass_index, index))
        if (self.pass_index, index) == (pass_index, layer):
            raise _Killed

    monkeypatch.setattr(LayerStore, "finish", dying_finish)
    with pytest.raises(_Killed):
        _pipeline(model_dir, text_file, out, offload=offload).run()
    assert not out.exists()
    assert work_dir_for(out).is_dir()
    monkeypatch.setattr(LayerStore, "finish", original_finish)

    redone: list[tuple[int, int]] = []

    def counting_finish(self, index, name, module, hidden, report):
        redone.append((self.pass_index, index))
        original_finish(self, index, name, module, hidden, report)

    monkeypatch.setattr(LayerStore, "finish", counting_finish)
    result = _pipeline(model_dir, text_file, out, offload=offload, resume=True).run()
    assert _weight_bytes(out) == _weight_bytes(plain_export)
    # nothing finished before the interruption was computed again
    assert not set(redone) & set(calls), sorted(set(redone) & set(calls))
    gptq_report = result.report["passes"][1]
    assert len(gptq_report["per_module"]) == 7 * LAYERS
    assert not work_dir_for(out).exists()


def test_resume_with_another_recipe_is_refused(model_dir, text_file, tmp_path, monkeypatch) -> None:
    out = tmp_path / "export"
    original = LayerStore.finish

    def dying_finish(self, index, name, module, hidden, report):
        original(self, index, name, module, hidden, report)
        raise _Killed

    monkeypatch.setattr(LayerStore, "finish", dying_finish)
    with pytest.raises(_Killed):
        _pipeline(model_dir, text_file, out).run()
    monkeypatch.setattr(LayerStore, "finish", original)
    other = [GPTQConfig(bits=3, group_size=32)]
    with pytest.raises(RecipeError, match="different recipe"):
        _pipeline(model_dir, text_file, out, passes=other, resume=True).run()


def test_resume_with_a_changed_later_pass_keeps_the_earlier_passes(
    model_dir, text_file, tmp_path, monkeypatch
) -> None:
    """Killed in gptq after awq finished; resumed with other gptq settings: awq's layers are
    restored (not recomputed), gptq runs again with the new settings, and the bytes equal an
    uninterrupted run of the new recipe."""
    out, fresh = tmp_path / "export", tmp_path / "fresh"
    original = LayerStore.finish
    calls: list[tuple[int, int]] = []

    def dying_finish(self, index, name, module, hidden, report):
        original(self, index, name, module, hidden, report)
        calls.append((self.pass_index, index))
        if (self.pass_index, index) == (1, 1):
            raise _Killed

    monkeypatch.setattr(LayerStore, "finish", dying_finish)
    with pytest.raises(_Killed):
        _pipeline(model_dir, text_file, out).run()
    monkeypatch.setattr(LayerStore, "finish", original)
    changed = [_passes()[0], GPTQConfig(bits=3, group_size=32, act_order=True, observer="mse")]
    _pipeline(model_dir, text_file, fresh, passes=changed).run()

    redone: list[tuple[int, int]] = []

    def counting_finish(self, index, name, module, hidden, report):
        redone.append((self.pass_index, index))
        original(self, index, name, module, hidden, report)

    monkeypatch.setattr(LayerStore, "finish", counting_finish)
    _pipeline(model_dir, text_file, out, passes=changed, resume=True).run()
    assert not [c for c in redone if c[0] == 0]  # awq: every layer restored
    assert sorted(c for c in redone if c[0] == 1) == [(1, i) for i in range(LAYERS)]
    assert _weight_bytes(out) == _weight_bytes(fresh)
    assert not work_dir_for(out).exists()


def test_resume_without_checkpoints_says_so(model_dir, text_file, tmp_path) -> None:
    with pytest.raises(RecipeError, match="no checkpoint"):
        _pipeline(model_dir, text_file, tmp_path / "export", resume=True).run()


def test_cli_resume_after_sigkill(model_dir, text_file, plain_export, tmp_path) -> None:
    """The real thing: the process is killed with SIGKILL after layer 2 of gptq, then resumed."""
    out = tmp_path / "export"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            model: {str(model_dir)!r}
            calibration: {{dataset: {str(text_file)!r}, samples: 8, seq_len: 32}}
            passes:
              - {{pass: awq, bits: 4, group_size: 32, grid: 5}}
              - {{pass: gptq, bits: 4, group_size: 32, act_order: true, observer: mse}}
            export: {{dir: {str(out)!r}}}
            """
        )
    )
    killer = textwrap.dedent(
        """\
        import os, signal, sys
        from compress.offload import LayerStore
        from compress.cli import run
        original = LayerStore.finish
        def finish(self, index, name, layer, hidden, report):
            original(self, index, name, layer, hidden, report)
            if (self.pass_index, index) == (1, 2):
                os.kill(os.getpid(), signal.SIGKILL)
        LayerStore.finish = finish
        sys.exit(run(sys.argv[1:]))
        """
    )
    env = {**os.environ, "COMPRESS_NATIVE": "0"}
    args = ["apply", str(recipe), "--no-evaluate"]
    killed = subprocess.run(
        [sys.executable, "-c", killer, *args], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not out.exists()
    resumed = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *args, "--resume"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert _weight_bytes(out) == _weight_bytes(plain_export)


def test_released_weights_are_rebuilt_from_their_codes(model_dir: Path, tmp_path: Path) -> None:
    """GPTQ frees each quantized weight of an offloaded layer; ``load`` brings back exactly the
    dequantized weight, and a store that keeps the model in memory frees nothing."""
    from compress.formats.int import IntFormat, quantize_int
    from compress.ir import QuantizedWeight, set_quantized
    from compress.offload import SourceWeights, empty_skeleton

    model = empty_skeleton(model_dir, "float32", trust_remote_code=False)
    store = LayerStore(model, tmp_path / "work", fingerprint="x", source=SourceWeights(model_dir))
    layer = model.model.layers[1]
    store.load(1, layer)
    module = layer.self_attn.q_proj
    fmt = IntFormat(4, 32, True)
    codes, scales, zeros = quantize_int(module.weight.detach(), fmt)
    set_quantized(module, QuantizedWeight(codes, scales, zeros, fmt))
    expected = module.weight.detach().clone()

    store.release_weight(module)
    assert module.weight.is_meta
    assert not layer.self_attn.k_proj.weight.is_meta  # not quantized: kept
    store.load(1, layer)
    assert torch.equal(module.weight, expected)

    in_memory = LayerStore(model, tmp_path / "work2", fingerprint="x")
    in_memory.release_weight(module)
    assert torch.equal(module.weight, expected)
