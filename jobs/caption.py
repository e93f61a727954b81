"""Ray job entrypoint for the caption stage (same as `realfake caption`).

    ray job submit --working-dir . -- python jobs/caption.py --data s3://bucket/train --out s3://bucket/run
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("caption")
