"""realfake-ray: Real-Fake training-data synthesis (Yuan et al., ICLR 2024) on Ray.

Importing the package is cheap and does not import Ray: the pure modules (``method.losses``, ``method.vision_token``,
``prompts``, ``sampler``, ``models``) run on a bare GPU box with only torch and diffusers.
"""

__version__ = "0.1.0"

from realfake_ray._internal.log import install_console as _install_console

_install_console()  # "[<tag>] message" on stdout in the driver and in every Ray worker (see _internal/log.py)
