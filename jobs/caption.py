"""Ray job entrypoint for the caption stage (same as `realfake caption`).

    ray job submit --working-dir . -- python jobs/caption.py --data s3://bucket/train --out s3://bucket/run
"""

import sys

from realfake_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
