#!/usr/bin/env python
"""The tiny job on object storage vs a local disk: requests per written image, images/s, rerun cost.

An S3-compatible server runs on 127.0.0.1 (moto's server mode, reached through the real s3fs client);
the embedded digits are uploaded to it, and the whole tiny job runs twice per target — once from
scratch, stage by stage, and once more over the complete run (every stage must skip):

    local   data from embedded:digits, --out runs/object-storage/local
    s3      data from s3://bench/data, --out s3://bench/run

Columns per stage: wall seconds, S3 requests by method (the server's own log), and for generate the
requests per written image and images/s. moto keeps objects in memory and answers from the same
machine, so request *counts* carry over to a real bucket; request *latency* does not (a real S3 PUT
costs ~10–50 ms, moto's well under that).

    python benchmarks/object_storage.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from _common import machine, write_section  # first: puts the repository on sys.path

SECTION = "## Object storage (CPU, tiny preset): the job to a local S3 server vs a local disk"


def upload_digits(url: str) -> None:
    from realfake_ray import storage

    root = "embedded:digits"
    for src in storage.find(root):
        storage.write_bytes(storage.join(url, storage.relative(src, root)), storage.read_bytes(src))


def run_target(name: str, out: str, data: str, mult: int, server) -> list[dict]:
    from realfake_ray.config import load_config
    from realfake_ray.stages.pipeline import run_pipeline
    from realfake_ray.stages.registry import PIPELINE

    cfg = load_config(preset="tiny", out=out, overrides=[f"generate.mult={mult}", "train.real_baseline=false"],
                      data__train=f"{data}/train", data__val=f"{data}/val", data__classes_file=f"{data}/classes.json")
    rows = []

    def measured(label: str, stages: list[str]) -> dict:
        before, started = server.by_method(), time.time()
        summary = run_pipeline(cfg, only=stages)
        seconds = time.time() - started
        delta = server.by_method() - before
        row = {"target": name, "run": label, "seconds": round(seconds, 1), "requests": sum(delta.values()),
               **{m: delta.get(m, 0) for m in ("GET", "HEAD", "PUT", "POST", "DELETE")}}
        generate = summary.get("generate", {}).get("result", {})
        if label == "generate" and generate.get("generated_now"):
            images = generate["generated_now"]
            row["images/s"] = round(images / summary["generate"]["seconds"], 1)
            row["requests per image"] = round(row["requests"] / images, 2)
        print(f"[object-storage] {name} {label}: {row}", flush=True)
        return row

    for stage in PIPELINE:
        rows.append(measured(stage, [stage]))
    rows.append(measured("rerun of the complete job", list(PIPELINE)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/object-storage")
    parser.add_argument("--mult", type=int, default=1)
    parser.add_argument("--write", metavar="BENCHMARKS.md")
    args = parser.parse_args()

    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from realfake_ray._internal.local_s3 import LocalS3

    server = LocalS3(str(root / "s3-requests.log"))
    os.environ.update(server.env)  # before Ray starts: its workers inherit the endpoint and credentials
    try:
        import fsspec
        import ray

        fsspec.filesystem("s3").mkdir("bench")
        upload_digits("s3://bench/data")
        rows = run_target("local disk", str(root / "local"), "embedded:digits", args.mult, server)
        rows += run_target("s3 (moto)", "s3://bench/run", "s3://bench/data", args.mult, server)
        ray.shutdown()
    finally:
        server.stop()

    from realfake_ray.plots import markdown_table

    table = [{k: row.get(k, "") for k in ("target", "run", "seconds", "images/s", "requests", "requests per image",
                                          "GET", "HEAD", "PUT", "POST", "DELETE")} for row in rows]
    text = (f"{SECTION}\n\nMachine: {machine()}; `python benchmarks/object_storage.py --mult {args.mult}` "
            f"(the tiny preset, embedded digits: 1,437 train + 360 val images). Requests: counted by the S3 server; "
            f"local-disk rows make none.\n\n{markdown_table(table)}\n")
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
