"""Dense features for your own segmentation or detection head.

    python examples/segmentation_features.py MODEL IMAGE
"""

import sys

import torch

import ecamp
from ecamp.finetune import FeaturePyramid, multiscale_features

model = ecamp.load(sys.argv[1])
x = ecamp.get_transform(model)(sys.argv[2])[None]
with torch.no_grad():
    # blocks 3, 5, 7 and 11 of a ViT-B/16 at strides 4, 8, 16 and 32 (parameter-free resampling)
    for f in multiscale_features(model, x):
        print(tuple(f.shape))
    # or one map through a learnable ViTDet-style pyramid, to train with your head
    last = model.forward_intermediates(x, indices=1, output_fmt="NCHW", intermediates_only=True)[-1]
    for f in FeaturePyramid(model.num_features, 256)(last):
        print(tuple(f.shape))
