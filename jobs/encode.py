"""Ray job entrypoint for the encode stage (same as `realfake encode`).

    ray job submit --working-dir . -- python jobs/encode.py --data s3://bucket/train --out s3://bucket/run
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("encode")
