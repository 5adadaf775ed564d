"""Linear probing of frozen embeddings: scikit-learn logistic regression and AUROC."""

from __future__ import annotations

import numpy as np

from ecamp.errors import MissingDependencyError

__all__ = ["linear_probe_auroc"]


def linear_probe_auroc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                       c: float = 1.0, seed: int = 0) -> float:
    """Standardise features on the training split, fit a logistic regression, return the test AUROC."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise MissingDependencyError("Linear probing needs scikit-learn: pip install \"ecamp[train]\".") from e
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(train_x, train_y)
    return float(roc_auc_score(test_y, clf.predict_proba(test_x)[:, 1]))
