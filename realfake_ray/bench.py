"""``realfake bench-sampler``: time the generation core on the configured model over a small grid.

Same code as ``benchmarks/bench_sampler.py`` (:func:`realfake_ray.sampler.run_grid`), but on
``model.pretrained`` (real weights, or the tiny preset) with defaults from the ``generate`` section.
Prints one table row per grid point as it is measured, then the table; writes the rows to
``<out>/bench/sampler.csv`` (rewritten after every row, so a killed run keeps what it measured).
No Ray: it times one device of the machine it runs on.

Example:
    $ realfake bench-sampler --preset tiny --out runs/bench --steps 10 --batch-sizes 2,8
    $ realfake bench-sampler --out runs/bench --set model.pretrained=/models/sd-v1-5 --dtypes fp16,bf16 --compile 0,1
"""

from __future__ import annotations

import csv
import io

from realfake_ray import storage
from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.models import loading

_TRUE, _FALSE = ("1", "true", "y", "yes"), ("0", "false", "n", "no")


def _ints(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--{name}: expected a comma list of integers, got {','.join(values)!r}") from None


def _bools(name: str, values: list[str]) -> list[bool]:
    bad = [v for v in values if v.lower() not in _TRUE + _FALSE]
    if bad:
        raise ConfigError(f"--{name}: expected a comma list of 0/1, got {','.join(values)!r}")
    return [v.lower() in _TRUE for v in values]


def bench_grid(
    cfg: RunConfig,
    device_type: str,
    schedulers: list[str] | None = None,
    steps: list[str] | None = None,
    batch_sizes: list[str] | None = None,
    dtypes: list[str] | None = None,
    compile: list[str] | None = None,
    channels_last: list[str] | None = None,
    reference: bool = True,
) -> list[dict]:
    """Grid rows from comma-list flags (strings, as the CLI gives them), defaults from ``cfg.generate``.

    Every row is validated here (unknown scheduler / dtype, steps < 1, ...): a ConfigError before timing.

    Example:
        >>> from realfake_ray.config import load_config
        >>> rows = bench_grid(load_config(preset="tiny"), "cpu", batch_sizes=["2", "4"], reference=False)
        >>> [(r["batch_size"], r["dtype"], r["steps"]) for r in rows]
        [(2, 'fp32', 10), (4, 'fp32', 10)]
    """
    from realfake_ray.sampler import _split_spec, make_grid

    g = cfg.generate
    default_dtype = g.dtype if device_type == "cuda" else "fp32"
    grid = make_grid(
        schedulers=schedulers or [g.scheduler],
        steps=_ints("steps", steps) if steps else [g.steps],
        batch_sizes=_ints("batch-sizes", batch_sizes) if batch_sizes else [g.batch_size],
        dtypes=dtypes or [default_dtype],
        compile=_bools("compile", compile) if compile else [g.compile],
        channels_last=_bools("channels-last", channels_last) if channels_last else [g.channels_last],
        reference=reference,
        strength=g.strength,
        guidance_scale=g.guidance_scale,
        mode=g.mode,
        sample_posterior=g.sample_posterior,
    )
    for row in grid:
        try:
            _split_spec(row)
        except ValueError as exc:
            raise ConfigError(f"bench-sampler grid: {exc}") from None
    return grid


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text of :func:`~realfake_ray.sampler.run_grid` rows (columns of the first row)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_bench_sampler(
    cfg: RunConfig,
    schedulers: list[str] | None = None,
    steps: list[str] | None = None,
    batch_sizes: list[str] | None = None,
    dtypes: list[str] | None = None,
    compile: list[str] | None = None,
    channels_last: list[str] | None = None,
    iters: int | None = None,
    warmup: int | None = None,
    reference: int | None = None,
) -> dict:
    """Time the sampler on ``cfg.model.pretrained`` over the grid; print the table; write the CSV.

    Returns ``{"csv": url, "device": ..., "rows": [...]}``. Uses CUDA when present, else the CPU.

    Example:
        >>> run_bench_sampler(load_config(preset="tiny", out="/tmp/b"), steps=["4"], batch_sizes=["2"], iters=1)  # doctest: +SKIP
    """
    import torch

    from realfake_ray.devices import torch_device
    from realfake_ray.sampler import format_table, run_grid

    iters, warmup = 3 if iters is None else iters, 1 if warmup is None else warmup
    if iters < 1 or warmup < 0:
        raise ConfigError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    device = torch_device()
    grid = bench_grid(cfg, device.type, schedulers, steps, batch_sizes, dtypes, compile, channels_last, reference != 0)
    model_dir = loading.resolve_model_dir(cfg.model.pretrained, cfg.model.revision, cfg.model.hub_timeout_s)
    pipe = loading.load_pipeline(model_dir)
    url = storage.join(cfg.out, "bench", "sampler.csv")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# bench-sampler: {cfg.model.pretrained} on {name}; {len(grid)} grid points, warmup {warmup}, iters {iters}")
    print(format_table([]), flush=True)
    done: list[dict] = []

    def on_row(row: dict) -> None:
        done.append(row)
        print(format_table([row]).splitlines()[1], flush=True)
        storage.write_text(url, rows_to_csv(done))

    rows = run_grid(pipe, grid, device, iters=iters, warmup=warmup, seed=cfg.seed, on_row=on_row)
    print("\n" + format_table(rows) + f"\n# wrote {url}", flush=True)
    return {"csv": url, "device": name, "rows": rows}
