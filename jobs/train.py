"""Ray job entrypoint for the train stage (same as `realfake train`).

    ray job submit --working-dir . -- python jobs/train.py --out s3://bucket/run --source synthetic
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("train")
