"""Ray job entrypoint for the encode stage (same as `realfake encode`).

    ray job submit --working-dir . -- python jobs/encode.py --data s3://bucket/train --out s3://bucket/run
"""

import sys

from realfake_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
