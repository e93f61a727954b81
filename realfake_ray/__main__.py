import sys

from realfake_ray.cli import main

sys.exit(main())
