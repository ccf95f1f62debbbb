"""The HTML comparison report: Pareto front, plots that decode, a page that needs no network.

The page is checked two ways: always by parsing it and decoding every embedded image with
Pillow; and, where Debian's ``chromium`` is on PATH, by rendering it headless and checking the
screenshot shows the plots (test marked ``browser``).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from compress.evaluate.comparison import compare_runs
from compress.evaluate.html import pareto_front, render_html, render_plots, write_comparison
from compress.evaluate.report import write_report
from tests.test_report import full_result


def run_result(bits: int, ppl: float, export_bytes: int, error: float) -> dict[str, Any]:
    result: dict[str, Any] = copy.deepcopy(full_result())
    result["size"]["export_bytes"] = export_bytes
    result["size"]["model_bits_per_weight"] = bits + 0.5
    result["size"]["per_format"] = {f"int{bits} g64 sym": {"modules": 1, "params": 1}}
    result["quality"]["builtin:wiki"]["perplexity"] = ppl
    for values in result["passes"][0]["per_module"].values():
        values["relative_error"] *= error
    result["lm_eval"] = {
        "scores": [
            {
                "task": "offline_goal_inference",
                "metric": "acc",
                "items": 200,
                "compressed": 0.5 - 0.01 * (8 - bits),
                "original": 0.5,
                "difference": -0.01 * (8 - bits),
                "ci_low": -0.05,
                "ci_high": 0.02,
                "compressed_stderr": 0.035,
                "original_stderr": 0.035,
                "significant": False,
            }
        ]
    }
    result["speed"] = {"tokens_per_s": 100.0 + bits, "peak_memory_bytes": 10**8 * bits}
    return result


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    dirs = []
    for bits, ppl, size, error in ((8, 20.2, 160_000_000, 0.1), (4, 22.0, 90_000_000, 1.0),
                                   (3, 30.5, 75_000_000, 3.0)):  # fmt: skip
        directory = tmp_path / f"int{bits}"
        write_report(run_result(bits, ppl, size, error), directory)
        dirs.append(directory)
    return dirs


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values.get("src") or "")
        for key in ("src", "href"):
            value = values.get(key) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)
        self._in_cell = tag == "td"

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells.append(data)


def decode_images(page: str) -> tuple[list[Image.Image], _Images]:
    parser = _Images()
    parser.feed(page)
    images = []
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,"), source[:40]
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True)))
        image.load()  # decodes every pixel: a truncated PNG raises here
        images.append(image)
    return images, parser


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([(1, 5), (2, 4), (3, 6), (4, 1)], [0, 1, 3]),
        ([(1, 1), (2, 2)], [0]),
        ([(2, 1), (1, 3), (1, 2)], [2, 0]),
        ([(1, 2), (1, 2)], [0]),
    ],
)
def test_pareto_front(points: list[tuple[float, float]], front: list[int]) -> None:
    assert pareto_front(points) == front


def test_comparison_has_the_original_and_every_run(three_runs: list[Path]) -> None:
    from compress.evaluate.report import read_report

    comparison = compare_runs([(d.name, read_report(d)) for d in three_runs])
    names = [row["name"] for row in comparison["runs"]]
    assert names == ["original", "int8", "int4", "int3"]
    original = comparison["runs"][0]
    assert original["perplexity"] == pytest.approx(20.12345)
    assert original["size_bytes"] == 269_060_552
    assert comparison["tasks"] == ["offline_goal_inference"]
    assert comparison["runs"][3]["tasks"]["offline_goal_inference"] == pytest.approx(0.45)
    assert original["tasks"]["offline_goal_inference"] == pytest.approx(0.5)
    assert comparison["runs"][2]["compression_s"] == pytest.approx(79.5)
    json.dumps(comparison)  # plain JSON


def test_written_report_is_self_contained_and_every_image_decodes(
    three_runs: list[Path], tmp_path: Path
) -> None:
    paths = write_comparison(three_runs, tmp_path / "cmp")
    page = paths["html"].read_text()
    images, parser = decode_images(page)
    assert len(images) == 3  # quality vs size, per-layer error, speed
    assert all(image.width > 300 and image.height > 200 for image in images)
    assert parser.external == []  # nothing to fetch: opens offline
    assert "<script" not in page
    for expected in ("int8", "int4", "int3", "original", "22.00", "45.0%", "90.0 MB"):
        assert any(expected in cell for cell in parser.cells), expected
    markdown = paths["markdown"].read_text()
    assert "| run |" in markdown and "int3" in markdown
    for line in markdown.splitlines():
        if line.startswith("!["):
            target = line[line.index("(") + 1 : -1]
            Image.open(paths["markdown"].parent / target).load()
    data = json.loads(paths["json"].read_text())
    assert [row["name"] for row in data["runs"]] == ["original", "int8", "int4", "int3"]


def test_runs_in_same_named_folders_get_distinct_names(tmp_path: Path) -> None:
    for parent in ("a", "b"):
        write_report(run_result(4, 22.0, 9 * 10**7, 1.0), tmp_path / parent / "run")
    paths = write_comparison([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "out")
    names = [row["name"] for row in json.loads(paths["json"].read_text())["runs"]]
    assert names == ["original", "run", "run-2"]


def test_minimal_reports_still_render(tmp_path: Path) -> None:
    from tests.test_report import minimal_result

    write_report(minimal_result(), tmp_path / "bare")
    paths = write_comparison([tmp_path / "bare"], tmp_path / "out")
    images, parser = decode_images(paths["html"].read_text())
    assert "bare" in " ".join(parser.cells)
    assert all(image.width > 0 for image in images)


def test_html_escapes_run_names() -> None:
    comparison = compare_runs([("<b>x</b>", run_result(4, 22.0, 9 * 10**7, 1.0))])
    page = render_html(comparison, render_plots(comparison))
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium on PATH")
def test_chromium_renders_the_plots(three_runs: list[Path], tmp_path: Path) -> None:
    paths = write_comparison(three_runs, tmp_path / "cmp")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", f"--screenshot={shot}",
            "--window-size=1400,2600", paths["html"].resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    # Plot lines, markers and bars are saturated colours; the page itself is black on white,
    # so coloured pixels exist only if the images were decoded and laid out.
    pixels = image.tobytes()  # RGB triples; getdata() is deprecated in Pillow 13
    coloured = sum(
        1
        for r, g, b in zip(pixels[0::3], pixels[1::3], pixels[2::3], strict=True)
        if max(r, g, b) - min(r, g, b) > 60
    )
    assert coloured > 5000


def test_a_distilled_run_gets_its_training_curve(three_runs: list[Path], tmp_path: Path) -> None:
    result = run_result(3, 25.0, 75_000_000, 2.0)
    series = {
        "step": [1.0, 2.0, 3.0, 4.0],
        "loss": [0.9, 0.7, 0.6, 0.55],
        "eval_step": [0.0, 2.0, 4.0],
        "eval_kl": [1.0, 0.7, 0.6],
    }
    result["passes"].append({"name": "distill", "metrics": {}, "series": series})
    write_report(result, tmp_path / "distilled")
    runs = [*three_runs, tmp_path / "distilled"]
    comparison = compare_runs([(p.name, json.loads((p / "report.json").read_text())) for p in runs])
    curves = {row["name"]: row["training"] for row in comparison["runs"]}
    assert curves["distilled"] == series
    assert curves["int4"] is None and curves["original"] is None
    plots = render_plots(comparison)
    assert list(plots) == ["Quality vs size", "Per-layer error", "Speed", "Training"]
    image = Image.open(io.BytesIO(plots["Training"]))
    assert image.width > 300 and image.height > 200
    assert "Training" not in render_plots(compare_runs([("int4", run_result(4, 22, 9, 1.0))]))
