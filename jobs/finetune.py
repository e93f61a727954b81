"""Ray job entrypoint for the finetune stage (same as `realfake finetune`).

    ray job submit --working-dir . -- python jobs/finetune.py --out s3://bucket/run --num-workers 8
Resubmitting the same command resumes from the newest checkpoint under <out>/finetune.
"""

import sys

from realfake_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
