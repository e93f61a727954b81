"""Ray job entrypoint for the finetune stage (same as `realfake finetune`).

    ray job submit --working-dir . -- python jobs/finetune.py --out s3://bucket/run --num-workers 8
Resubmitting the same command resumes from the newest checkpoint under <out>/finetune.
"""

from realfake_ray.cli import run_job

if __name__ == "__main__":
    run_job("finetune")
