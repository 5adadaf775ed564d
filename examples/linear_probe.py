"""Linear probe: frozen ECAMP embeddings + logistic regression (scikit-learn), AUROC per label.

    python examples/linear_probe.py MODEL TRAIN_LIST TEST_LIST IMAGE_ROOT
"""

import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import ecamp

name, train_list, test_list, root = sys.argv[1:5]
model = ecamp.load(name)                                     # pooled embedding: mean of normed patch tokens


def read(path):
    rows = [line.split() for line in open(path) if line.strip()]
    return [f"{root}/{r[0]}" for r in rows], np.array([[float(v) for v in r[1:]] for r in rows])


(train_x, train_y), (test_x, test_y) = read(train_list), read(test_list)
train_e = ecamp.embed(model, train_x, batch_size=64, num_workers=4)   # NaN rows for unreadable files
test_e = ecamp.embed(model, test_x, batch_size=64, num_workers=4)
for c in range(train_y.shape[1]):
    clf = LogisticRegression(max_iter=2000).fit(train_e, train_y[:, c])
    print(f"label {c}: AUROC {roc_auc_score(test_y[:, c], clf.predict_proba(test_e)[:, 1]):.3f}")
