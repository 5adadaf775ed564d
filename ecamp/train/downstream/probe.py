"""Linear probing of frozen embeddings: scikit-learn logistic regression and AUROC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ecamp.errors import InvalidArgumentError, MissingDependencyError

__all__ = ["ProbeFit", "fit_linear_probe"]


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe: ``auroc`` of ``scores`` (the test split's positive-class probabilities) and ``classifier``
    (scikit-learn ``StandardScaler`` + ``LogisticRegression`` pipeline)."""

    auroc: float
    scores: np.ndarray
    classifier: Any


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                     c: float = 1.0, seed: int = 0) -> ProbeFit:
    """Standardise features on the training split, fit a logistic regression, score the test split."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise MissingDependencyError("Linear probing needs scikit-learn: pip install \"ecamp[train]\".") from e
    for split, y in (("training", train_y), ("test", test_y)):
        if len(np.unique(y)) < 2:
            raise InvalidArgumentError(f"The {split} split has only label {np.unique(y).tolist()} among {len(y)} "
                                       f"samples; a probe needs positives and negatives: use more samples.")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(train_x, train_y)
    scores = clf.predict_proba(test_x)[:, 1]
    return ProbeFit(float(roc_auc_score(test_y, scores)), scores, clf)

