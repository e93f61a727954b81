"""Ray job entrypoint for the evaluate stage (same as `realfake evaluate`).

    ray job submit --working-dir . -- python jobs/evaluate.py --out s3://bucket/run --set evaluate.extra_sets.sketch=s3://bucket/sketch
"""

import sys

from realfake_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
