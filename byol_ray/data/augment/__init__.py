"""BYOL's two view distributions T and T', applied to a whole batch at once on the batch's device.

Each image draws its own crop box, flip, colour-jitter factors and order, grayscale, blur sigma and
solarize decision, independently, from a `torch.Generator` the caller passes in (on the batch's device),
so a run is reproducible and, by saving the generator state, resumable. The work is split in two halves,
every random draw in one generator call, then a pure tensor function of the draws (batched.py), so that
its cost on a GPU is a fixed, small number of kernels.

Both views of `TwoViews` are one batch of 2B images through the same ops (each row with its own view's
probabilities and strengths), reading the B source images without copying them per view, so a step's
augmentation is a fixed number of dispatched ops however large the batch (tests/data/test_augment.py bounds
it).

At Fashion-MNIST sizes a CPU call is mostly per-op overhead and small matmuls, so the CPU paths avoid the
ops that are slow there: a comparison or `where` over every pixel, an addcmul whose first argument is
broadcast, ops on tensors whose last dimension is tiny, grouped convolutions on small images
(blur.MATRIX_BLUR_MAX_SIDE), and rebuilding the crop matrices of small inputs
(resample.RESAMPLE_TABLE_FLOATS).

The ops (``AugmentConfig.ops``, a subset of ``AUG_OPS``) and what they do, on images in [0, 1]:

- ``crop``: torchvision's RandomResizedCrop box (area fraction U(scale), log-aspect U(log ratio), 10 tries
  then a centre crop), resampled with ``grid_sample``'s bicubic kernel (computed as two matmuls) and
  clamped to [0, 1]. Boxes are whole pixels like torchvision's (inputs up to ~32 px read their matrices
  from a table of every box, so `apply` reads a box's values as whole pixels). Without ``crop`` the image
  is only resized to ``out_size``. The resample does not antialias, which only matters when a box is much
  larger than ``out_size`` (large ImageNet-style inputs).
- ``flip``: horizontal flip, folded into the crop's affine matrix (one resample for both).
- ``jitter``: brightness, contrast, saturation and hue in a random order drawn per image, clamped to
  [0, 1] after each. Brightness is ADDITIVE (x + delta, delta ~ U(-b, b)) as in the authors' code, not
  torchvision's multiplicative one. Contrast blends with the per-image mean of the grayscale image,
  saturation with the grayscale image (factors ~ U(max(0, 1-s), 1+s)). Hue rotates H in HSV by
  delta ~ U(-h, h) (the HSV route of torchvision and ``tf.image.adjust_hue``, not the YIQ rotation).
- ``grayscale``: luma 0.2989 R + 0.5870 G + 0.1140 B, copied to the 3 channels.
- ``blur``: Gaussian, sigma ~ U(blur_sigma), separable, reflect padding; the kernel side is
  ``blur_kernel_frac`` of the output side made odd as in the authors' code (224 -> 23, 96 -> 9), at least 3.
  Views up to blur.MATRIX_BLUR_MAX_SIDE are blurred as K x K^T with per-image blur matrices, larger ones by
  grouped convolutions.
- ``solarize``: x -> 1 - x where x >= threshold.

Crop and flip always come first (they set the output size); the other ops follow in the order listed.
An op that is not listed never fires in either view; that is how the paper's ablations are written.
For 1-channel images saturation, hue and grayscale do nothing (``noop_ops(1)``); their draws are still
made so the random stream, and hence every other op's draw, is the same as for 3 channels.

Normalisation by mean/std comes last. ``eval_transform`` is the deterministic evaluation transform
(resize the shorter side, centre crop, normalise). ``reference_view_transform`` is a per-image
torchvision pipeline with the same parameters, kept for speed and distribution comparisons.

The modules, in import order (each imports only those above it):

- images.py: uint8/float conversion, the shape check, mean/std normalisation.
- boxes.py: crop-box sampling (torchvision's RandomResizedCrop box for every image at once).
- colour.py: luma weights, the jitter ops, the 1-channel no-ops, the HSV hue rotation.
- draws.py: the layout of each image's uniform draws (which column drives which choice).
- blur.py: the blur kernel side, the convolution and matrix blurs.
- constants.py: the tensors a call needs, built once per input shape.
- resample.py: the crop's bicubic matrices (computed, or read from tables of every box), the resize.
- jitter.py: colour jitter in each image's own order.
- batched.py: `BatchedViews`, drawing every view's parameters and applying them.
- views.py: `TwoViews` and `ViewTransform`.
- evaluation.py: `eval_transform`.
- reference.py: the per-image torchvision reference pipeline.
"""

from .batched import BatchedViews
from .blur import blur_band, blur_kernel_size, gaussian_blur, matrix_blur
from .boxes import sample_crop_boxes
from .colour import JITTER_OPS, LUMA, noop_ops
from .evaluation import eval_transform
from .reference import reference_view_transform
from .views import TwoViews, ViewTransform

__all__ = [
    "JITTER_OPS",
    "LUMA",
    "BatchedViews",
    "TwoViews",
    "ViewTransform",
    "blur_band",
    "blur_kernel_size",
    "eval_transform",
    "gaussian_blur",
    "matrix_blur",
    "noop_ops",
    "reference_view_transform",
    "sample_crop_boxes",
]
