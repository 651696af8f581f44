"""Mask bit values shared by every stage (16-bit masks).

Static bits come from the detrend masks and the chip stage; dynamic bits are added by the
camera stage once star positions are known, and are kept apart so they can be told apart or
cleared. The values follow the spirit of the IPP's ``MASK.VALUE`` recipe; they are documented
in ``docs/products.md``.
"""

from __future__ import annotations

# Static (chip stage)
DETECTOR = 0x0001   # bad pixel / bad column from the static mask
DEAD_CELL = 0x0002  # whole cell unusable
SAT = 0x0004        # saturated pixel
BLEED = 0x0008      # bleed trail of a saturated star
CR = 0x0010         # cosmic ray
GAP = 0x0020        # no data: cell gap or outside the detector
LOW = 0x0040        # pixel flat response too low / non-positive
SUSPECT = 0x0080    # nonlinear regime, corrected but less certain

# Dynamic (camera stage)
GHOST = 0x0100      # optical ghost of a bright star
GLINT = 0x0200      # glint (scattered light streak)
STARCORE = 0x0400   # saturated-star halo circle
SPIKE = 0x0800      # diffraction spike
CROSSTALK = 0x1000  # electronic crosstalk image
STREAK = 0x2000     # satellite/meteor streak

# Warp/stack
CONV = 0x4000       # output pixel touched by a masked input pixel during resampling
REJECTED = 0x8000   # rejected as an outlier when stacking

STATIC = DETECTOR | DEAD_CELL | SAT | BLEED | CR | GAP | LOW
DYNAMIC = GHOST | GLINT | STARCORE | SPIKE | CROSSTALK | STREAK
BAD = STATIC | DYNAMIC  # pixels excluded from photometry and stacking
NAMES = {name: value for name, value in globals().items()
         if name.isupper() and isinstance(value, int) and name not in ("STATIC", "DYNAMIC", "BAD")}
