"""Preprocessing bound to the weights: eval and train transforms built from a pretrained_cfg.

Eval reproduces the authors' downstream pipeline (``Resize`` of the shorter side, ``CenterCrop``, ``Grayscale(3)``,
``ToTensor``, ``Normalize``) with torchvision's own transforms, so 8-bit images give the same numbers as their code.
Train mode is their fine-tuning augmentation (``RandomResizedCrop``, horizontal flip). Images with more than 8 bits
(16-bit PNG, DICOM, float arrays) are resized as 32-bit float (PIL mode ``F``), never quantised to 8 bits first.

The same pipeline can run in two halves (:meth:`EcampTransform.decode`, :meth:`EcampTransform.finish`): decoding
on the CPU (DataLoader workers), then the intensity policy's per-pixel steps, resize, crop and normalisation in
torch on a device, in batches. The torch half runs the same steps as the CPU path (the same table look-up and
equalisation table, the same torchvision ``Resize``/``CenterCrop`` objects, on tensors instead of PIL images), so
the two differ only by the resampling arithmetic (torch's antialiased interpolation vs Pillow's; tests bound it).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, InvalidArgumentError, InvalidImageError
from .fundus import fov_crop

__all__ = ["EcampTransform", "DecodedImage", "JointTransform", "DenseTransform", "transform_from_cfg", "to_pil",
           "read_dense_image", "requantize", "to_uint8", "normalize_grey", "LUMA"]

# ITU-R 601-2 luma, the weights PIL's convert("L") uses; for float colour input.
LUMA = (0.299, 0.587, 0.114)
_INTERP = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC"}
# timm's eval crop modes: "center" (resize the shorter side, centre crop: the authors' pipeline) and "squash"
_CROP_MODES = ("center", "squash")


def _check_float(arr: np.ndarray, what: str, path: str | None = None) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidImageError(f"{what} contains NaN or infinite values; clean it before preprocessing.", path=path)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InvalidImageError(f"{what} is float with values in [{lo:.4g}, {hi:.4g}]; float images must be "
                                f"scaled to [0, 1] (uint8 and uint16 arrays are scaled automatically).", path=path)
    return np.clip(arr, 0.0, 1.0)


def _from_array(arr: np.ndarray, what: str, policy: str = "bits", path: str | None = None, checked: bool = False
                ) -> Image.Image | torch.Tensor:
    """``path``: the file the array was read from, if any (for the errors' ``.path``); ``checked``: float input is
    already finite and in [0, 1] (what :func:`ecamp.io.read_image_native` returns), so the full-size scan is skipped."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidImageError(f"{what} has shape {arr.shape}; expected [H, W], [H, W, 1], [H, W, 3] or "
                                f"[H, W, 4] (batches go in a list or a 4-D array).", path=path)
    if min(arr.shape[:2]) < 1:
        raise InvalidImageError(f"{what} is empty (shape {arr.shape}).", path=path)
    if arr.dtype == np.uint8:
        if arr.ndim == 3 and arr.shape[2] == 4:
            return Image.fromarray(np.ascontiguousarray(arr), "RGBA").convert("RGB")
        return Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")
    if arr.dtype == np.uint16:
        if arr.ndim == 2:  # deep grey data: the same intensity policy as for a 16-bit file
            from .io import apply_policy_to_grey

            return _from_array(apply_policy_to_grey(arr, policy), what, path=path)
        arr = arr.astype(np.float32) / 65535.0
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False) if checked else _check_float(arr, what, path)
    else:
        raise InvalidImageError(f"{what} has dtype {arr.dtype}; use uint8, uint16 or float in [0, 1].", path=path)
    if arr.ndim == 3:
        arr = arr[:, :, :3]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), "F")


def _is_file_source(image: Any) -> bool:
    return isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(image, "read")


def to_pil(image: Any, what: str = "image", *, policy: str = "bits", fov: bool = False,
           frame: int | None = None) -> Image.Image | torch.Tensor:
    """Normalise one image to what the torchvision pipeline takes.

    Paths, bytes and file objects are read with :func:`ecamp.io.read_image` under ``policy``. 8-bit input becomes a
    PIL ``L``/``RGB`` image (the authors' exact path); deeper grey input a PIL ``F`` image in [0, 1]; deeper colour
    input a float ``[3, H, W]`` tensor in [0, 1]. ``fov`` crops a fundus photograph to its field of view first.
    """
    if _is_file_source(image):
        return _read_file(image, what, policy, fov, frame)[0]
    if fov:
        arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) and image.mode not in
                         ("L", "RGB", "I;16", "I", "F") else image)
        if isinstance(image, torch.Tensor):
            arr = image.detach().cpu().numpy()
            arr = arr.transpose(1, 2, 0) if arr.ndim == 3 else arr
        return _from_array(fov_crop(arr), what, policy)
    if isinstance(image, Image.Image):
        if image.mode in ("L", "RGB"):
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(image)
            if image.mode == "F":
                return _from_array(arr.astype(np.float32), what)
            if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
                raise InvalidImageError(f"{what} is a 32-bit integer image outside 0..65535; scale it first.")
            return _from_array(arr.astype(np.uint16), what, policy)
        if image.mode in ("1", "LA", "La"):
            return image.convert("L")
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise InvalidImageError(f"{what} is a tensor of shape {tuple(image.shape)}; expected [H, W], [1, H, W] "
                                    f"or [3, H, W] (or a batch [B, C, H, W]).")
        return _from_array(t.permute(1, 2, 0).numpy(), what, policy)
    if isinstance(image, np.ndarray):
        return _from_array(image, what, policy)
    raise InvalidImageError(f"{what} is a {type(image).__name__}; expected a PIL image, numpy array or tensor.")


def _read_file(image: Any, what: str, policy: str, fov: bool, frame: int | None = None, linear_first: bool = False
               ) -> tuple[Image.Image | torch.Tensor, tuple[float, float] | None]:
    """:func:`to_pil` of a file, and ``(scale, offset)`` when ``linear_first`` and the policy maps the stored values
    linearly (:attr:`ecamp.io.TableImage.affine`): the image is then the stored values as float, and the caller maps
    them after the geometry, which commutes with a linear map (to float32 rounding) and so runs the map on 224x224
    pixels instead of the full film."""
    from .io import TableImage, as_array, decode_image, source_path

    # an 8-bit file other than DICOM stays the Pillow image it was decoded to: the pixels of the array path below,
    # without its copies
    decoded = decode_image(image, policy=policy, frame=frame, pil=not fov)
    if isinstance(decoded, Image.Image):
        return decoded, None
    if linear_first and not fov and isinstance(decoded, TableImage) and decoded.affine is not None:
        return Image.fromarray(np.ascontiguousarray(decoded.index)).convert("F"), decoded.affine
    arr = as_array(decoded)
    return _from_array(fov_crop(arr) if fov else arr, what if what != "image" else str(image)[:200],
                       path=source_path(image), checked=True), None


def _size2(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return (int(value[-2]), int(value[-1])) if len(value) >= 2 else (int(value[0]), int(value[0]))


def _grey_if_equal(im: Image.Image) -> Image.Image:
    """An RGB image whose three channels are equal (a grey film stored as colour) as its one channel, else itself.
    Resizing that channel once is exact: Pillow resizes each channel alike, and its convert("L") of equal channels
    gives their value back ((19595 + 38470 + 7471) * v + 2**15 >> 16 == v), so the result is the colour path's at a
    third of its resizing cost."""
    from PIL import ImageChops

    r, g, b = im.split()
    if ImageChops.difference(r, g).getbbox() is None and ImageChops.difference(g, b).getbbox() is None:
        return r
    return im


class _GreyFromColour:
    """8-bit colour to grey exactly as torchvision's ``Grayscale`` (PIL ``convert("L")``), after the geometry as in
    the authors' pipeline. Float images pass through: they are grey already or converted by luma later."""

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image) and img.mode == "RGB":
            return img.convert("L")
        return img

    def __repr__(self) -> str:
        return "Grayscale(colour -> grey, ITU-R 601-2 luma)"


class EcampTransform:
    """Callable preprocessing: one image to ``[C, H, W]``, a list or a 4-D batch to ``[B, C, H, W]``.

    ``cfg`` is the dict it was built from (timm pretrained_cfg fields and the ``ecamp`` block); ``steps`` the
    torchvision transforms it applies after input conversion, exposed so they can be re-used elsewhere, and
    ``geometry`` their ``Compose``, which also moves ``tv_tensors`` boxes and masks exactly as it moves the pixels
    (:mod:`ecamp.explain` maps its heat maps back onto the film that way).
    """

    def __init__(self, cfg: dict[str, Any], *, train: bool = False):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2 as T

        self.cfg = cfg
        self.train = train
        from .config import EcampCfg

        self.ecamp = EcampCfg.from_dict(cfg.get("ecamp"), where="the cfg's ecamp block")
        self.grayscale, self.policy, self.fov_crop = self.ecamp.grayscale, self.ecamp.image_policy, self.ecamp.fov_crop
        h, w = _size2(cfg.get("input_size", (3, 224, 224)))
        interp_name = cfg.get("interpolation", "bilinear")
        if interp_name not in _INTERP:
            raise ConfigError(f"Unknown interpolation {interp_name!r}; use one of {sorted(_INTERP)}.")
        interp = getattr(InterpolationMode, _INTERP[interp_name])
        crop_pct = float(cfg.get("crop_pct", 1.0))
        crop_mode = cfg.get("crop_mode", "center")
        if crop_mode not in _CROP_MODES:
            raise ConfigError(f"Unknown crop_mode {crop_mode!r}; ecamp's transforms support {_CROP_MODES}.")
        if train:
            # The authors' fine-tuning augmentation: torchvision defaults (scale 0.08-1, bilinear).
            geometry = [T.RandomResizedCrop((h, w), antialias=True), T.RandomHorizontalFlip()]
        elif crop_mode == "squash":  # timm's squash: the whole image resized to the input size, no crop
            geometry = [T.Resize((math.floor(h / crop_pct), math.floor(w / crop_pct)), interpolation=interp,
                                 antialias=True), T.CenterCrop((h, w))]
        else:
            short = math.floor(min(h, w) / crop_pct) if h == w else tuple(math.floor(s / crop_pct) for s in (h, w))
            geometry = [T.Resize(short, interpolation=interp, antialias=True), T.CenterCrop((h, w))]
        self.out_channels = int(cfg.get("input_size", (3,))[0])
        steps = list(geometry)
        if self.grayscale:
            steps.append(_GreyFromColour())
        steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        self.steps = steps
        self.geometry = T.Compose(steps)
        mean, std = list(cfg.get("mean", (0.5,) * 3)), list(cfg.get("std", (0.5,) * 3))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._on_device: dict[str, tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Luma weights, mean and std on ``device``, copied there once: a copy from pageable memory per batch would
        wait for the device's queue."""
        if str(device) not in self._on_device:
            self._on_device[str(device)] = tuple(t.to(device) for t in (torch.tensor(LUMA).view(3, 1, 1),
                                                                        self.mean, self.std))
        return self._on_device[str(device)]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get the transform without device copies
        return {**self.__dict__, "_on_device": {}}

    def _one(self, image: Any, what: str) -> torch.Tensor:
        image_in, linear = _read_file(image, what, self.policy, self.fov_crop, linear_first=True) \
            if _is_file_source(image) else (to_pil(image, what, policy=self.policy, fov=self.fov_crop), None)
        if self.grayscale and isinstance(image_in, Image.Image) and image_in.mode == "RGB":
            image_in = _grey_if_equal(image_in)
        x = self.geometry(image_in).as_subclass(torch.Tensor)
        if linear is not None:  # the intensity policy's linear map, after the geometry (see _read_file)
            x = (x.double() * linear[0] + linear[1]).float()
        return self._channels_and_normalise(x, what, image)

    def _channels_and_normalise(self, x: torch.Tensor, what: str, image: Any = None) -> torch.Tensor:
        """``[..., C, H, W]`` in [0, 1] after the geometry -> the model's channels, normalised."""
        luma, mean, std = self._constants(x.device)
        if self.grayscale and x.shape[-3] == 3:  # colour float input: luma as PIL's convert("L") does
            x = (x * luma).sum(-3, keepdim=True)
        if x.shape[-3] == 1 and self.out_channels == 3:
            x = x.expand(*x.shape[:-3], 3, -1, -1)
        elif x.shape[-3] != self.out_channels:
            from .io import source_path

            path = source_path(image) if _is_file_source(image) else None
            raise InvalidImageError(f"{what} has {x.shape[-3]} channels after conversion but the model expects "
                                    f"{self.out_channels}.", path=path)
        return ((x - mean) / std).contiguous()

    # -- the pipeline in two halves: decoding on the CPU, the rest in torch on a device ---------------------------
    def decode(self, image: Any) -> DecodedImage:
        """The CPU half: a file read to its stored integer (or float) pixels and, for a table-driven intensity
        policy, the table; no per-pixel step of the policy runs (:func:`ecamp.io.decode_image`).

        What the torch half does not take comes back finished by the CPU path (``ready``): in-memory images
        (PIL, arrays, tensors) and train mode. A fundus crop (``fov_crop``) maps the intensities first, here.
        """
        if self.train or not _is_file_source(image):
            return DecodedImage(ready=self(image))
        from .io import TableImage, as_array, decode_image, source_path

        what, path = str(image)[:200], source_path(image)
        decoded = decode_image(image, policy=self.policy)
        if self.fov_crop:
            decoded = fov_crop(as_array(decoded))
        arr = decoded.index if isinstance(decoded, TableImage) else decoded
        channels = 1 if arr.ndim == 2 or self.grayscale else 3
        if not (channels == self.out_channels or (channels == 1 and self.out_channels == 3)):
            raise InvalidImageError(f"{what} has {3 if arr.ndim == 3 else 1} channels after conversion but the model "
                                    f"expects {self.out_channels}.", path=path)
        if not isinstance(decoded, TableImage):
            return DecodedImage(pixels=_tensor(decoded))
        return DecodedImage(pixels=_tensor(decoded.index), table=_tensor(decoded.table), equalize=decoded.equalize,
                            pad=None if decoded.pad is None else _tensor(decoded.pad))

    def finish(self, items: Sequence[DecodedImage], device: str | torch.device | None = None) -> torch.Tensor:
        """The torch half, on ``device`` (default: where the items are): ``[B, C, H, W]`` from :meth:`decode`'s
        items, in order.

        Per image, the intensity policy's steps as :meth:`ecamp.io.TableImage.apply` (table look-up, equalisation
        with :func:`ecamp.io.equalize_lut`, padding to black); then, for the images of one size at a time, the
        transform's own torchvision geometry steps on the stacked tensors, and the channels and normalisation of
        the CPU path. Nothing waits for the device.
        """
        if not items:
            raise InvalidImageError("Empty batch: pass at least one image.")
        out: list[torch.Tensor | None] = [None] * len(items)
        planes: dict[int, torch.Tensor] = {}
        groups: dict[tuple, list[int]] = {}
        for k, item in enumerate(items):
            item = item.to(device, non_blocking=True) if device is not None else item
            if item.ready is not None:
                out[k] = item.ready
                continue
            planes[k] = _intensities(item)
            groups.setdefault((planes[k].dtype, tuple(planes[k].shape)), []).append(k)
        for ks in groups.values():
            x = self.geometry(torch.stack([planes.pop(k) for k in ks])).as_subclass(torch.Tensor)
            for k, y in zip(ks, self._channels_and_normalise(x, f"image {ks[0]}"), strict=True):
                out[k] = y
        return torch.stack(out)

    def __call__(self, images: Any) -> torch.Tensor:
        if isinstance(images, (list, tuple)) and not images:
            raise InvalidImageError("Empty batch: pass at least one image.")
        batched = isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4) or \
            (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] in (1, 3))
        if batched:
            return torch.stack([self._one(im, f"image {i}") for i, im in enumerate(images)])
        return self._one(images, "image")

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(mode={'train' if self.train else 'eval'}, "
                 f"modality={self.ecamp.modality}, image_policy={self.policy}, fov_crop={self.fov_crop},"]
        lines += [f"    {step}," for step in self.steps]
        if self.grayscale:
            lines.append(f"    grey -> {self.out_channels} channels,")
        lines.append(f"    Normalize(mean={list(self.cfg.get('mean', []))}, std={list(self.cfg.get('std', []))}),")
        lines.append(")")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One image between :meth:`EcampTransform.decode` (CPU) and :meth:`EcampTransform.finish` (any device).

    ``pixels``: ``[H, W]`` or ``[H, W, 3]``, uint8, float32 in [0, 1], or, with ``table``, the stored values as table
    indices (uint8, or int16 holding uint16 bits); ``table``, ``equalize``, ``pad`` as in :class:`ecamp.io.TableImage`;
    ``ready``: a finished ``[C, H, W]`` tensor from the CPU path instead. DataLoader's ``pin_memory`` pins it.
    """

    pixels: torch.Tensor | None = None
    table: torch.Tensor | None = None
    equalize: bool = False
    pad: torch.Tensor | None = None
    ready: torch.Tensor | None = None

    def _map(self, fn) -> DecodedImage:
        return DecodedImage(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                               for f in fields(self)})

    def pin_memory(self) -> DecodedImage:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: str | torch.device, non_blocking: bool = False) -> DecodedImage:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor without a copy; uint16 as int16 bits (torch's uint16 has few operations)."""
    if arr.dtype == np.uint16:
        arr = arr.view(np.int16)
    with warnings.catch_warnings():
        # a read-only view of a DICOM file's buffer: the tensor is only read, and copied when pinned or moved
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(arr))


def _intensities(item: DecodedImage) -> torch.Tensor:
    """:meth:`ecamp.io.TableImage.apply` in torch, on the item's device, as ``[C, H, W]``."""
    x = item.pixels
    if item.table is not None:
        x = item.table[x.long() & 0xFFFF if x.dtype == torch.int16 else x.long()]
        if item.equalize:
            from .io import equalize_lut

            levels = x.long() if item.pad is None else x.long().masked_fill(item.pad, 256)  # padding: bin 256
            levels = levels.reshape(-1)
            # scatter_add_ rather than bincount, which reads the largest value back to the host on CUDA
            hist = torch.zeros(257, dtype=torch.int64, device=x.device).scatter_add_(0, levels,
                                                                                    torch.ones_like(levels))
            x = equalize_lut(hist[:256])[x.long()]
        if item.pad is not None:
            x = x.masked_fill(item.pad, 0)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def transform_from_cfg(cfg: Mapping[str, Any], *, train: bool = False, **overrides: Any) -> EcampTransform:
    """The preprocessing of a pretrained_cfg dict with ecamp's settings under ``"ecamp"`` (what
    :func:`ecamp.get_transform` resolves a name or a model to).

    ``overrides`` replace cfg fields: ``input_size``/``img_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, ``crop_mode`` (``center`` or ``squash``), and the ecamp settings ``grayscale``, ``image_policy``,
    ``fov_crop``.
    """
    from .config import EcampCfg

    cfg = dict(cfg)
    block = EcampCfg.from_dict(cfg.get("ecamp"), where="the cfg's ecamp block")
    changes = {key: overrides.pop(key) for key in ("grayscale", "image_policy", "fov_crop") if key in overrides}
    if "img_size" in overrides:
        size = _size2(overrides.pop("img_size"))
        overrides["input_size"] = (cfg.get("input_size", (3,))[0], *size)
    unknown = set(overrides) - {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    if unknown:
        raise InvalidArgumentError(f"Unknown transform override(s) {sorted(unknown)}.")
    cfg.update(overrides)
    cfg["ecamp"] = block.replace(**changes).to_dict(with_source=True) if changes else cfg.get("ecamp") or {}
    return EcampTransform(cfg, train=train)


# -- the grey-film path of training readers and dense heads ----------------------------------------------------------
def to_uint8(arr: np.ndarray) -> np.ndarray:
    """A :func:`ecamp.io.read_image_native` result at 8 bits, as the authors' pre-training read MIMIC-CXR-JPG:
    uint8 stays, [0, 1] floats are rounded."""
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
    return arr


def read_dense_image(source: Any, policy: str = "bits", *, rgb: bool = False, uint8: bool = False) -> torch.Tensor:
    """A file at full depth as float32 in [0, 1]: ``[1, H, W]`` grey (colour: the mean of its channels) or, with
    ``rgb``, ``[3, H, W]``; ``uint8`` rounds to 8-bit levels (the authors' cv2 path)."""
    from .io import read_image

    arr = read_image(source, policy=policy)
    if arr.ndim == 3 and not rgb:
        arr = arr.mean(-1)
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None],
                                              dtype=np.float32))
    if rgb and x.shape[0] == 1:
        x = x.expand(3, -1, -1).contiguous()
    return torch.round(x * 255) / 255 if uint8 else x


def requantize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """A normalised input back on 8-bit levels, as cv2 writes a resized 8-bit image (the ``linear-uint8`` resize)."""
    return (torch.round((x * std + mean) * 255) / 255 - mean) / std


def normalize_grey(x: torch.Tensor, mean: float, std: float, channels: int = 3) -> torch.Tensor:
    """``[1, H, W]`` grey in [0, 1] -> ``[channels, H, W]`` normalised with one mean and std (grey weights)."""
    return ((x.as_subclass(torch.Tensor).expand(channels, -1, -1) - mean) / std).float().contiguous()


class JointTransform:
    """A grey film and its target (a ``tv_tensors.Mask`` or ``tv_tensors.BoundingBoxes``) through one geometry.

    The image is read at full depth with the cfg's intensity policy (:func:`read_dense_image`), resized to the cfg's
    input size together with the target, optionally augmented by ``augment`` (a torchvision v2 transform drawn once per
    call and applied to both, or to the image alone with ``augment_target=False``), and normalised with the cfg's
    grey mean and std. ``antialias=False`` resizes as plain bilinear interpolation (``F.interpolate``).
    """

    def __init__(self, cfg: dict[str, Any], *, augment: Any = None, augment_target: bool = True,
                 antialias: bool = True):
        from torchvision.transforms import v2 as T

        size = _size2(cfg.get("input_size", (3, 224, 224)))
        from .config import EcampCfg

        self.policy = EcampCfg.from_dict(cfg.get("ecamp"), where="the cfg's ecamp block").image_policy
        self.mean, self.std = float(cfg["mean"][0]), float(cfg["std"][0])
        self.channels = int(cfg.get("input_size", (3,))[0])
        self.resize = T.Resize(size, antialias=antialias)
        self.augment, self.augment_target = augment, augment_target
        self.joint = T.Compose([augment, self.resize]) if augment is not None else self.resize

    def __call__(self, source: Any, target: Any) -> tuple[torch.Tensor, Any]:
        from torchvision import tv_tensors

        x = source if isinstance(source, torch.Tensor) else read_dense_image(source, self.policy)
        x = tv_tensors.Image(x)
        if self.augment is not None and not self.augment_target:
            x, target = self.resize(self.augment(x)), self.resize(target)
        else:
            x, target = self.joint(x, target)
        return normalize_grey(x, self.mean, self.std, self.channels), target


class DenseTransform:
    """One file -> ``(input [C, S, S], (height, width) of the original)``: the input a dense head (segmentation,
    detection) was trained and validated on. The image is read at full depth with the cfg's intensity policy
    (:func:`read_dense_image`), resized to the input size as a whole (no crop; :class:`JointTransform`) and
    normalised with the grey mean and std. ``resize="linear-uint8"`` and ``rgb`` are the authors' variants (the
    training protocol's ``resize`` and ``riga_rgb``)."""

    def __init__(self, cfg: Mapping[str, Any], *, resize: str = "antialias-float", rgb: bool = False):
        if resize not in ("antialias-float", "linear-uint8"):
            raise ConfigError(f"Unknown dense resize {resize!r}; use antialias-float or linear-uint8.")
        self.resize, self.rgb, self.uint8 = resize, rgb, resize == "linear-uint8"
        self.joint = JointTransform(dict(cfg), antialias=not self.uint8)

    def __call__(self, source: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        x = read_dense_image(source, self.joint.policy, rgb=self.rgb, uint8=self.uint8)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x, _ = self.joint(x, None)
        return (requantize(x, self.joint.mean, self.joint.std) if self.uint8 else x), size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={tuple(self.joint.resize.size)}, policy={self.joint.policy}, "
                f"resize={self.resize}, rgb={self.rgb}, mean={self.joint.mean}, std={self.joint.std})")
