"""The layout of the uniform draws behind every random choice: each image makes `N_DRAWS` uniforms per
view, in one generator call for the whole batch, and each column has one meaning.

The layout is fixed whatever the ops, strengths and channel count, so the random stream (and each op's
draws) does not shift between ablations; changing it changes every run's views.
"""

from __future__ import annotations

from .boxes import CROP_DRAWS
from .colour import JITTER_OPS

FLAG_OPS = ("flip", "jitter", "grayscale", "blur", "solarize")  # per-image on/off draws
FACTORS = ("brightness", "contrast", "saturation", "hue", "blur_sigma")  # per-image strengths
# Columns of one image's uniform draws for one view: the crop's (areas and aspects, one per try, then
# top/left; boxes.py), the on/off flags, the strengths, and the jitter order (argsort of 4 uniforms: a
# uniform permutation).
FLAG_DRAWS = slice(CROP_DRAWS.stop, CROP_DRAWS.stop + len(FLAG_OPS))
FACTOR_DRAWS = slice(FLAG_DRAWS.stop, FLAG_DRAWS.stop + len(FACTORS))
ORDER_DRAWS = slice(FACTOR_DRAWS.stop, FACTOR_DRAWS.stop + len(JITTER_OPS))
N_DRAWS = ORDER_DRAWS.stop
