"""Ray job entrypoint for the generate stage (same as `realfake generate`).

    ray job submit --working-dir . -- python jobs/generate.py --out s3://bucket/run --mult 10
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("generate")
