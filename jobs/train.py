"""Ray job entrypoint for the train stage (same as `realfake train`).

    ray job submit --working-dir . -- python jobs/train.py --out s3://bucket/run --source synthetic
"""

import sys

from realfake_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
