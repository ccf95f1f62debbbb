"""The ``distill`` pass end to end: through the pipeline, killed and resumed, and on two
processes under ``accelerate launch``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaForCausalLM

from compress.data import calibration_batch
from compress.distill.distill import DistillConfig
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig
from compress.recipe import ModelSpec
from tests.conftest import save_tiny_llama, write_word_text

_RUN_CLI = "import sys; from compress.cli import run; sys.exit(run(sys.argv[1:]))"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # peaked predictions (a larger init), so that rounding damage shows in the KL
    folder = tmp_path_factory.mktemp("distill-llama")
    return save_tiny_llama(folder, layers=2, seed=3, initializer_range=0.15)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distill-text") / "train.txt"
    return write_word_text(path, lines=80, words=30, vocabulary=16)


def _distill(text_file: Path, **overrides: object) -> DistillConfig:
    settings: dict[str, object] = {
        "dataset": str(text_file),
        "samples": 16,
        "seq_len": 32,
        "held_out": 4,
        "steps": 12,
        "gradient_accumulation": 2,
        "eval_every": 4,
        "checkpoint_every": 2,
        "lr": 3e-3,
        "scale_lr": 3e-3,
    }
    settings.update(overrides)
    return DistillConfig.model_validate(settings)


def test_distilling_an_int3_model_lowers_its_kl_at_the_same_bits(model_dir, text_file, tmp_path):
    rtn = RTNConfig(bits=3, group_size=32)
    plain = Pipeline(ModelSpec(name=str(model_dir)), [rtn], export=tmp_path / "rtn").run()
    result = Pipeline(
        ModelSpec(name=str(model_dir)), [rtn, _distill(text_file)], export=tmp_path / "distilled"
    ).run()
    report = result.report["passes"][1]
    metrics = report["metrics"]
    assert metrics["held_out_kl_after"] < 0.8 * metrics["held_out_kl_before"]
    assert metrics["steps"] == 12 and metrics["tokens"] == 12 * 2 * 32
    series = report["series"]
    assert series["step"] == [float(s) for s in range(1, 13)] and len(series["loss"]) == 12
    assert series["eval_step"] == [0.0, 4.0, 8.0, 12.0]
    assert series["eval_kl"][0] == metrics["held_out_kl_before"]
    size, plain_size = result.report["size"], plain.report["size"]
    assert size["quantized_bits_per_weight"] == plain_size["quantized_bits_per_weight"]
    assert size["export_bytes"] == plain_size["export_bytes"]


def test_8bit_adamw_of_bitsandbytes_trains_on_cpu(model_dir, text_file, tmp_path, monkeypatch):
    """``optimizer: adamw_8bit`` steps bitsandbytes' AdamW8bit (8-bit moments), which runs on CPU
    too, and the int3 student still gets closer to the original."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (dev extra)")
    steps: list[int] = []
    original_step = bnb.optim.AdamW8bit.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", counted)
    passes = [RTNConfig(bits=3, group_size=32), _distill(text_file, optimizer="adamw_8bit")]
    result = Pipeline(ModelSpec(name=str(model_dir)), passes, export=tmp_path / "out").run()
    metrics = result.report["passes"][1]["metrics"]
    assert len(steps) == 12
    assert metrics["held_out_kl_after"] < 0.8 * metrics["held_out_kl_before"]


def test_bad_settings_are_refused_with_the_key_named(text_file) -> None:
    with pytest.raises(ValidationError, match="teacher_top_k"):
        _distill(text_file, teacher_top_k=8, temperature=2.0)
    with pytest.raises(ValidationError, match="beta"):
        _distill(text_file, loss="jsd", beta=1.5)
    with pytest.raises(ValidationError, match="extra"):
        _distill(text_file, learning_rate=1e-3)


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _recipe(path: Path, model_dir: Path, text_file: Path, out: Path, **distill: object) -> Path:
    """rtn int3 then distill on the tiny model; ``distill`` adds or overrides distill keys."""
    settings: dict[str, object] = {"pass": "distill", "dataset": str(text_file), "samples": 16}
    settings |= {"seq_len": 32, "held_out": 4, "eval_every": 2, "lr": 3.0e-3, "scale_lr": 3.0e-3}
    settings |= distill
    path.write_text(
        f"model: {json.dumps(str(model_dir))}\n"
        "passes:\n"
        "  - {pass: rtn, bits: 3, group_size: 32}\n"
        f"  - {json.dumps(settings)}\n"  # JSON is YAML's flow style
        f"export: {{dir: {json.dumps(str(out))}}}\n"
    )
    return path


def test_killed_run_resumes_to_the_same_weights(model_dir, text_file, tmp_path) -> None:
    """SIGKILL right after the step-4 checkpoint; ``--resume`` ends bit-identical to a run that
    was never interrupted (the teacher's top-k cache is read back, not recomputed)."""
    env = {**os.environ, "COMPRESS_NATIVE": "0"}
    plain_out, out = tmp_path / "plain", tmp_path / "resumed"
    resumable = {"steps": 8, "gradient_accumulation": 2, "checkpoint_every": 2}
    resumable["teacher_top_k"] = 16
    plain_recipe = _recipe(tmp_path / "plain.yaml", model_dir, text_file, plain_out, **resumable)
    recipe = _recipe(tmp_path / "recipe.yaml", model_dir, text_file, out, **resumable)
    args = ["--no-evaluate"]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, "apply", str(plain_recipe), *args],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    killer = textwrap.dedent(
        """\
        import os, signal, sys
        import torch
        from compress.cli import run
        replace = os.replace
        def replace_then_die(src, dst):
            replace(src, dst)
            if str(dst).endswith("distill-state.pt"):
                if torch.load(dst, weights_only=False)["step"] == 4:
                    os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace_then_die
        sys.exit(run(sys.argv[1:]))
        """
    )
    killed = subprocess.run(
        [sys.executable, "-c", killer, "apply", str(recipe), *args],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not out.exists()
    work = out.parent / f".{out.name}.work"
    assert any(work.glob("pass01-distill/teacher-top16-*.safetensors"))
    resumed = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, "apply", str(recipe), *args, "--resume"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert "resuming at step 4" in resumed.stderr.decode()
    assert _weights(out) == _weights(plain_out)
    report = json.loads((out / "report.json").read_text())
    assert any("resumed" in note for note in report["passes"][1]["notes"])


_JOB = textwrap.dedent(
    """\
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from compress.distill.distill import DistillConfig, distill
    from compress.registry import PassContext

    folder, text, accumulation, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.9)  # a damaged student with the teacher's shapes
    config = DistillConfig(dataset=text, samples=16, seq_len=32, held_out=4, steps=6,
                           gradient_accumulation=accumulation, batch_size=2, eval_every=3,
                           lr=5e-4)
    context = PassContext(tokenizer=tokenizer,
                          teacher_loader=lambda: AutoModelForCausalLM.from_pretrained(folder))
    report = distill(student, config, context)
    from accelerate import PartialState
    if PartialState().is_main_process:
        weights = {n: p.detach().double().sum().item() for n, p in student.named_parameters()}
        json.dump({"series": report.series, "weights": weights,
                   "processes": PartialState().num_processes}, open(out, "w"))
    """
)


_LAUNCH_MODES = {
    "ddp": ["--multi_gpu"],
    # FSDP on CPU ranks (gloo): torch refuses sync_module_states there, and every process
    # builds the same student anyway, so there is nothing to broadcast
    **{
        f"fsdp{version}": [
            "--use_fsdp",
            "--fsdp_version",
            version,
            "--fsdp_sharding_strategy",
            "FULL_SHARD",
            "--fsdp_reshard_after_forward",
            "true",
            "--fsdp_auto_wrap_policy",
            "NO_WRAP",
            "--fsdp_use_orig_params",
            "true",
            "--fsdp_sync_module_states",
            "false",
            "--fsdp_cpu_ram_efficient_loading",
            "false",
        ]
        for version in ("1", "2")
    },
}


@pytest.mark.parametrize("mode", list(_LAUNCH_MODES))
def test_two_processes_follow_the_one_process_loss_curve(
    model_dir, text_file, tmp_path, mode
) -> None:
    """``accelerate launch --num_processes 2`` on a machine without GPUs (two CPU ranks over
    gloo), with DDP or FSDP (versions 1 and 2, parameters sharded), accumulation 1, against one
    process with accumulation 2: the same global batches, so the same curve and weights."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed beside this Python")
    job = tmp_path / "job.py"
    job.write_text(_JOB)
    env = {**os.environ, "COMPRESS_NATIVE": "0", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(job), str(model_dir), str(text_file), "2", str(tmp_path / "one.json")],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr.decode()[-2000:]
    port = str(29517 + list(_LAUNCH_MODES).index(mode))
    launch = [
        launcher,
        "launch",
        *_LAUNCH_MODES[mode],
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
    ]
    double = subprocess.run(
        [*launch, str(job), str(model_dir), str(text_file), "1", str(tmp_path / "two.json")],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert double.returncode == 0, double.stderr.decode()[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["series"]["step"] == two["series"]["step"]
    assert two["series"]["loss"] == pytest.approx(one["series"]["loss"], rel=1e-4)
    assert two["series"]["eval_kl"] == pytest.approx(one["series"]["eval_kl"], rel=1e-4)
    assert one["series"]["eval_kl"][-1] < one["series"]["eval_kl"][0]
    assert one["weights"].keys() == two["weights"].keys()  # whole parameters, not FSDP shards
    for name, total in one["weights"].items():
        assert two["weights"][name] == pytest.approx(total, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize(
    "name",
    [
        "smollm2-w3-gptq-distill.yaml",
        "smollm2-2of4-distill.yaml",
        "smollm2-w4-rotate-gptq-distill.yaml",
    ],
    ids=["w3", "2of4", "w4-rotate"],
)
def test_shipped_distill_recipes_run_their_passes_on_a_tiny_model(
    name: str, model_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """The recipes' passes and distill settings (bf16 autocast, freeze patterns, schedule) on a
    tiny Llama, with data and steps shrunk: the same code path, minutes less."""
    from compress.recipe import CalibrationSpec, load_recipe
    from compress.registry import config_for

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / name)
    passes = []
    for config in recipe.passes:
        if config_for(config).name == "distill":
            update = {"dataset": str(text_file), "samples": 8, "held_out": 2, "seq_len": 32}
            update |= {"steps": 4, "gradient_accumulation": 2, "eval_every": 2, "max_minutes": 1}
            config = config.model_copy(update=update)
            assert config.freeze == ["model.embed_tokens", "lm_head"]
        elif hasattr(config, "group_size"):
            config = config.model_copy(update={"group_size": 32})
        passes.append(config)
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        passes,
        calibration=CalibrationSpec(dataset=str(text_file), samples=4, seq_len=32),
        export=tmp_path / "out",
    ).run()
    report = result.report["passes"][-1]
    assert report["name"] == "distill" and report["metrics"]["steps"] == 4
    original = LlamaForCausalLM.from_pretrained(model_dir)
    decoder = {
        n: p for n, p in original.named_parameters() if not n.startswith(("model.embed", "lm_"))
    }
    norms = sum(p.numel() for n, p in decoder.items() if p.dim() == 1)
    linears = [p for p in decoder.values() if p.dim() == 2]
    if "gptq" in name:  # scales (one per row and group of 32) and norms
        expected = norms + sum(p.shape[0] * p.shape[1] // 32 for p in linears)
    else:  # every decoder weight (pruned positions stay zero) and norms
        expected = norms + sum(p.numel() for p in linears)
    assert report["metrics"]["trainable_parameters"] == expected


def _steps(accumulation: int) -> dict[str, object]:
    return {"steps": 4, "gradient_accumulation": accumulation}


def test_compress_apply_under_accelerate_launch(model_dir, text_file, tmp_path) -> None:
    """``accelerate launch -m compress.cli apply``: both processes run the passes, they train
    in step, process 0 alone writes the export; it matches one process with twice the
    accumulation."""
    from safetensors.torch import load_file

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed beside this Python")
    env = {**os.environ, "COMPRESS_NATIVE": "0", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, "apply", "--no-evaluate",
         str(_recipe(tmp_path / "one.yaml", model_dir, text_file, one, **_steps(2)))],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr.decode()[-2000:]
    launch = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29518"]  # fmt: skip
    recipe = _recipe(tmp_path / "two.yaml", model_dir, text_file, two, **_steps(1))
    double = subprocess.run(
        [*launch, "-m", "compress.cli", "apply", "--no-evaluate", str(recipe)],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr.decode()[-3000:]
    assert "process 1 of 2: passes done" in double.stdout.decode()
    assert not (two.parent / f".{two.name}.work").exists()
    ours = {k: v for p in sorted(two.glob("*.safetensors")) for k, v in load_file(p).items()}
    theirs = {k: v for p in sorted(one.glob("*.safetensors")) for k, v in load_file(p).items()}
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor.float(), theirs[key].float(), rtol=2e-3, atol=1e-5)
        else:
            assert torch.equal(tensor, theirs[key]), key
    report = json.loads((two / "report.json").read_text())
    assert report["passes"][1]["metrics"]["steps"] == 4


def test_a_structurally_pruned_student_distils_and_reloads_without_compress(
    model_dir, text_file, tmp_path
) -> None:
    """prune (channels, then a layer) → distill → export: stock transformers loads the smaller
    model in a fresh process without ``import compress``, with the distilled weights."""
    from compress.prune.prune import PruneConfig
    from compress.recipe import CalibrationSpec

    out = tmp_path / "out"
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        [
            PruneConfig(structure="channels", remove=32),
            PruneConfig(structure="layers", remove=1),
            _distill(text_file, steps=6, eval_every=3, lr=1e-3),
        ],
        calibration=CalibrationSpec(dataset=str(text_file), samples=4, seq_len=32),
        export=out,
    ).run()
    metrics = result.report["passes"][2]["metrics"]
    assert metrics["held_out_kl_after"] < metrics["held_out_kl_before"]
    ids = torch.tensor([[5, 17, 99, 200, 3, 42, 7, 64]])
    with torch.no_grad():
        expected = result.model(ids).logits
    check = textwrap.dedent(
        f"""\
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        assert "compress" not in sys.modules
        assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 96
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-4, atol=1e-4)


def test_on_policy_windows_are_the_students_own_continuations(
    model_dir, text_file, tmp_path, monkeypatch
):
    """on_policy 1.0: every training window keeps its first on_policy_prompt tokens and the rest
    is sampled by the student, which then learns on it; the samples are seeded (two runs train
    the same weights) and the student still gets closer to the original."""
    from compress.distill import trainer

    seen: list[torch.Tensor] = []
    original_loss = trainer._loss

    def recording(logits, hidden, batch, *args, **kwargs):
        seen.append(batch.detach().clone())
        return original_loss(logits, hidden, batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "_loss", recording)
    settings = {"on_policy": 1.0, "on_policy_prompt": 8, "steps": 6, "eval_every": 3}
    passes = [RTNConfig(bits=3, group_size=32), _distill(text_file, **settings)]
    first = Pipeline(ModelSpec(name=str(model_dir)), passes, export=tmp_path / "a").run()
    runs = [list(seen)]
    seen.clear()
    Pipeline(ModelSpec(name=str(model_dir)), passes, export=tmp_path / "b").run()
    runs.append(list(seen))
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")  # seeded samples
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = calibration_batch(tokenizer, str(text_file), 16 + 4, 32, 0)[:16]
    for batch in runs[0]:
        assert batch.shape[1] == 32
        for window in batch:  # its prompt is some dataset window's; its continuation is not
            same_prompt = (data[:, :8] == window[:8]).all(dim=1)
            assert same_prompt.any()
            assert not any(torch.equal(window, row) for row in data[same_prompt])
    metrics = first.report["passes"][1]["metrics"]
    assert metrics["held_out_kl_after"] < metrics["held_out_kl_before"]


def test_on_policy_settings_that_cannot_work_are_refused(text_file) -> None:
    with pytest.raises(ValidationError, match="teacher_top_k caches the teacher"):
        _distill(text_file, on_policy=0.5, teacher_top_k=8)
    with pytest.raises(ValidationError, match="leaves nothing to sample"):
        _distill(text_file, on_policy=0.5, on_policy_prompt=32)
    with pytest.raises(ValidationError, match="on_policy"):
        _distill(text_file, on_policy=1.5)
