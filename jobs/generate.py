"""Ray job entrypoint for the generate stage (same as `realfake generate`).

    ray job submit --working-dir . -- python jobs/generate.py --out s3://bucket/run --mult 10
"""

import sys

from realfake_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
