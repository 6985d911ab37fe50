"""Diagnostics of trained checkpoints (``udaseg analyze``; docs/ANALYSIS.md).

============== =========================================================================
distances      class centres, CCD (T2S-DA Eq. 19), PDD (Eq. 20), source–target centre cosine
calibration    reliability bins, ECE and the share of pixels above the pseudo-label threshold
sampling       class-balanced uniform sampling of pixel features from a stream of images
embeddings     checkpoint loading with the method's heads, feature taps, the feature pass
tsne           scikit-learn t-SNE of sampled embeddings
plots          the figures (matplotlib, off-screen)
report         analysis.json and the self-contained report.html
commands       the ``udaseg analyze`` command
============== =========================================================================
"""

from udaseg.analysis.calibration import ReliabilityAccumulator
from udaseg.analysis.distances import (
    ClassFeatureStatistics,
    centre_cosine_similarity,
    class_centre_distance,
    pixel_discrimination_distance,
)
from udaseg.analysis.sampling import ClassBalancedReservoir

__all__ = [
    "ClassBalancedReservoir",
    "ClassFeatureStatistics",
    "ReliabilityAccumulator",
    "centre_cosine_similarity",
    "class_centre_distance",
    "pixel_discrimination_distance",
]
