"""`sparse-vdit demo`: the main job.

Until the small trained model ships (issue 6), the demo is the kernel check: every pattern on a
small layout through every available backend, compared with the reference, with pictures.
"""

from __future__ import annotations

from .check import add_arguments, run

__all__ = ["add_arguments", "run"]
