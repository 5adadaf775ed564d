"""Embed images with an ECAMP encoder.

    python examples/extract_features.py cxr-vit-b image1.png image2.jpg
    python examples/extract_features.py local-dir:./my-export image.png

Prints one pooled 768-d embedding per image (mean of the patch tokens after the pre-trained final norm).
"""

import sys

import torch

import ecamp


def main(model_name: str, paths: list[str]) -> None:
    model = ecamp.load(model_name)
    tf = ecamp.get_transform(model)  # paths go through the weights' intensity policy (DICOM, 16-bit PNG...)

    with torch.inference_mode():
        for path in paths:
            z = model(tf(path)[None])[0]
            print(f"{path}: dim={z.numel()} norm={z.norm():.3f} first={z[:4].tolist()}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
