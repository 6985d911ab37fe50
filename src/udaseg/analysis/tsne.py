"""Two-dimensional t-SNE (van der Maaten & Hinton, 2008) of sampled pixel embeddings (scikit-learn).

Source and target samples of one model are embedded together, so their relative positions can be
compared; features with more than 50 channels are first reduced to 50 by PCA (the usual t-SNE
preprocessing, which also makes it fast). Both steps are seeded.
"""

from __future__ import annotations

import numpy as np

from udaseg.errors import UserError

PCA_DIM = 50


def tsne_embedding(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``features: N×D`` -> ``N×2`` t-SNE coordinates."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        raise UserError("t-SNE needs scikit-learn; install it with 'pip install udaseg[bench]' "
                        "or skip the plot with --no-tsne") from None
    count = features.shape[0]
    if count <= perplexity:
        raise UserError(f"t-SNE with perplexity {perplexity:g} needs more than {perplexity:g} pixels, "
                        f"the sample has {count}; analyse more images or lower --perplexity")
    data = features.astype(np.float64)
    if data.shape[1] > PCA_DIM and count > PCA_DIM:
        data = PCA(n_components=PCA_DIM, random_state=seed).fit_transform(data)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(data).astype(np.float32)
