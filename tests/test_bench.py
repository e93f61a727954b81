"""`realfake bench-sampler`: grid from flags/config, table on stdout, CSV below <out>/bench."""

import csv
import io

import pytest

from realfake_ray import storage
from realfake_ray.tools.sampler_bench import bench_grid
from realfake_ray.cli import main as cli_main
from realfake_ray.config import ConfigError, load_config

COLUMNS = [
    "name", "scheduler", "steps", "strength", "batch_size", "dtype", "compile", "channels_last", "options",
    "images_per_s", "s_per_batch", "tflop_per_img", "mfu", "peak_mem_gib", "note",
]  # fmt: skip


def test_grid_defaults_come_from_the_generate_section():
    cfg = load_config(preset="tiny", overrides=["generate.scheduler=ddim", "generate.steps=7"])
    rows = bench_grid(cfg, "cpu", batch_sizes=["2", "4"], compile=["0"])
    assert [(r["scheduler"], r["steps"], r["batch_size"], r["dtype"]) for r in rows[:2]] == [
        ("ddim", 7, 2, "fp32"),
        ("ddim", 7, 4, "fp32"),
    ]
    assert rows[-1]["name"] == "reference" and len(bench_grid(cfg, "cpu", reference=False)) == 1
    assert bench_grid(cfg, "cuda", reference=False)[0]["dtype"] == cfg.generate.dtype


def test_grid_takes_the_speed_options_of_the_generate_section():
    cfg = load_config(preset="tiny", overrides=["generate.sdpa_backend=cudnn", "generate.fuse_qkv=true",
                                                "generate.compile=true", "generate.compile_mode=reduce-overhead"])
    on_gpu = bench_grid(cfg, "cuda", compile=["0", "1"], reference=False)
    assert [(r["compile"], r["compile_mode"], r["sdpa_backend"], r["fuse_qkv"]) for r in on_gpu] == [
        (False, "default", "cudnn", True), (True, "reduce-overhead", "cudnn", True)]
    on_cpu = bench_grid(cfg, "cpu", reference=False)
    assert [(r["compile_mode"], r["sdpa_backend"], r["fuse_qkv"]) for r in on_cpu] == [("default", "auto", True)]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": ["ten"]}, "--steps"), ({"compile": ["maybe"]}, "--compile"), ({"schedulers": ["heun"]}, "heun"),
     ({"dtypes": ["fp8"]}, "fp8")],  # fmt: skip
)
def test_bad_grid_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        bench_grid(load_config(preset="tiny"), "cpu", **kwargs)


def test_one_point_grid_on_the_tiny_preset_writes_the_csv(tmp_path, capsys):
    argv = ["bench-sampler", "--preset", "tiny", "--out", str(tmp_path), "--steps", "2", "--batch-sizes", "2",
            "--iters", "1", "--warmup", "0"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "images_per_s" in printed and "skipped: the reference row" in printed
    text = storage.read_text(storage.join(str(tmp_path), "bench", "sampler.csv"))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == COLUMNS and len(rows) == 2
    assert (rows[0]["steps"], rows[0]["batch_size"], rows[0]["dtype"]) == ("2", "2", "fp32")
    assert float(rows[0]["images_per_s"]) > 0 and rows[1]["name"] == "reference"
    assert cli_main(["bench-sampler", "--preset", "tiny", "--out", str(tmp_path), "--compile", "x"]) == 2
