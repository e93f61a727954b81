"""Ray job entrypoint for the evaluate stage (same as `realfake evaluate`).

    ray job submit --working-dir . -- python jobs/evaluate.py --out s3://bucket/run --set evaluate.extra_sets.sketch=s3://bucket/sketch
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("evaluate")
