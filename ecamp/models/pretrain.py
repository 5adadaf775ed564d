"""The ECAMP pre-training model: MAE ViT encoder and decoder, super-resolution head, context fusion and BERT MLM.

Built from timm (``VisionTransformer``, ``Block``) and transformers (BERT embeddings, attention, encoder layers and MLM
head) modules, following the authors' method (dossier sections 3 and 11). The defaults reproduce their code; every
deliberate deviation is a named option of :class:`ECAMPPretrainConfig` (see ``docs/fidelity.md``).

Shapes for the default config: ``batch["image"]`` [B, 3, 448, 448] normalised; the encoder sees its bicubic
downsample to 224 (no antialiasing, as the authors' torchvision did on tensors); 49 of 196 patches are visible.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BatchError, ConfigError, InvalidWeightsFileError, WeightsMismatchError
from .pretrain_config import ECAMPPretrainConfig
from .text_model import TextModel

__all__ = ["ECAMPPretrainConfig", "ECAMPPretrainModel", "random_masking", "sincos_pos_embed_2d", "BatchError",
           "authors_to_ecamp_key", "read_authors_checkpoint", "encoder_config", "ENCODER_ARCHITECTURE",
           "ENCODER_KEYS"]

# The timm architecture the encoder is built as; non-default sizes travel in ``model_args`` (as timm's Hub
# configs do), so exported folders rebuild with ``timm.create_model``.
ENCODER_ARCHITECTURE = "vit_base_patch16_224"


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, ``[1, grid*grid (+1), dim]``, zero row for the CLS token."""
    if dim % 4:
        raise ConfigError(f"sin-cos position embeddings need a dimension divisible by 4, got {dim}.")

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """MAE per-sample masking: the patches with the smallest ``noise`` are kept (ascending argsort).

    Returns ``(kept tokens [B, K, D], mask [B, L] with 1 = removed, ids_restore [B, L], ids_keep [B, K])``.
    """
    b, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(b, length, device=x.device)
    elif noise.shape != (b, length):
        raise BatchError(f"noise must have shape {(b, length)}, got {tuple(noise.shape)}.")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore, ids_keep


class SuperResolutionHead(nn.Module):
    """Bilinear x2, then conv3x3 -> ReLU -> conv3x3 plus the upsampled residual, then (optionally) ReLU."""

    def __init__(self, channels: int = 3, scale: int = 2, final_relu: bool = True):
        super().__init__()
        self.scale = scale
        self.final_relu = final_relu
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        out = self.conv2(F.relu(self.conv1(up))) + up
        return F.relu(out) if self.final_relu else out


# The authors' checkpoint key prefixes (dossier section 8) -> this module's names.
_AUTHORS_PREFIXES = (
    ("bert_encoder.model.bert.cross_attn_layer.", "text.context_fusion_layer."),
    ("bert_encoder.model.bert.context_fusion_layer.", "text.context_fusion_layer."),
    ("bert_encoder.model.bert.embeddings.", "text.embeddings."),
    ("bert_encoder.model.bert.encoder.", "text.encoder."),
    ("bert_encoder.model.cls.", "text.cls."),
)
ENCODER_KEYS = re.compile(r"^(patch_embed\.|cls_token$|pos_embed$|blocks\.|norm\.)")
# The authors' keys with no counterpart here: the unused pooler and a non-persistent buffer of old transformers.
_AUTHORS_UNUSED = re.compile(r"^bert_encoder\.model\.bert\.pooler\.|\.position_ids$|\.token_type_ids$")


def authors_to_ecamp_key(key: str) -> str | None:
    """Map one key of the authors' state dict to this model's name; None for keys with no counterpart."""
    if _AUTHORS_UNUSED.search(key):
        return None
    if ENCODER_KEYS.match(key):
        return "encoder." + key
    for old, new in _AUTHORS_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


class ECAMPPretrainModel(nn.Module):
    """ECAMP pre-training model; ``forward(batch)`` returns ``loss``, ``mim_loss``, ``sr_loss``, ``mlm_loss``.

    ``encoder`` is a timm ``VisionTransformer`` (fixed sin-cos position embedding); :meth:`to_encoder` returns a
    stand-alone copy that ``ecamp.save_pretrained`` exports and ``ecamp.load`` serves.
    """

    def __init__(self, config: ECAMPPretrainConfig | None = None):
        super().__init__()
        import timm
        from timm.models.vision_transformer import Block

        cfg = config or ECAMPPretrainConfig()
        cfg.validate()
        self.config = cfg
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.encoder = timm.create_model(ENCODER_ARCHITECTURE, pretrained=False, **_encoder_args(cfg))
        self.encoder.pos_embed.requires_grad_(False)
        num_patches = cfg.grid**2
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.decoder_depth)])
        self.decoder_norm = norm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans)
        self.super_res = SuperResolutionHead(cfg.in_chans, cfg.sr_scale, cfg.sr_final_relu)
        self.bert_mlp = nn.Linear(cfg.embed_dim, cfg.text_hidden_size)
        self.text = TextModel(cfg)
        self._init_weights()

    # -- initialisation (the authors' MAE-style init, applied to the whole model) -------------------------------
    def _init_weights(self) -> None:
        cfg = self.config
        with torch.no_grad():
            self.encoder.pos_embed.copy_(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid))
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(cfg.decoder_embed_dim, cfg.grid))
            w = self.encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.normal_(self.encoder.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        text_modules = set(self.text.modules())
        for m in self.modules():
            if isinstance(m, nn.Linear) and (cfg.xavier_text_init or m not in text_modules):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):  # BERT's own init, which the authors' model kept
                nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
        if not cfg.xavier_text_init:
            for m in text_modules:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        nn.init.zeros_(self.text.cls.predictions.bias)

    # -- image side ---------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, h = self.config.patch_size, imgs.shape[2] // self.config.patch_size
        x = imgs.reshape(imgs.shape[0], imgs.shape[1], h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * h, p * p * imgs.shape[1])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.in_chans
        h = int(round(math.sqrt(x.shape[1])))
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        x, mask, ids_restore, ids_keep = random_masking(x, mask_ratio, noise)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], dim=1))
        return enc.norm(x), mask, ids_restore, ids_keep

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(x.shape[0], n_mask, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def _pixel_loss(self, pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """MSE inside ``region`` ([B, 1, H, W] of 0/1): averaged over all pixels (authors) or over the region."""
        err = (pred - target) ** 2 * region
        if self.config.pixel_loss_over_region:
            return err.sum() / (region.sum() * pred.shape[1]).clamp_min(1)
        return err.mean()

    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        cfg = self.config
        need = ("image", "input_ids", "labels", "attention_mask", "token_type_ids", "weights", "sr_window")
        missing = [k for k in need if k not in batch]
        if missing:
            raise BatchError(f"Batch lacks {missing}; the pre-training data pipeline produces all of {list(need)}.")
        img = batch["image"]
        want = (cfg.in_chans, cfg.sr_img_size, cfg.sr_img_size)
        if img.ndim != 4 or tuple(img.shape[1:]) != want:
            raise BatchError(f"batch['image'] must be [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(img.shape)}.")
        b, length = img.shape[0], batch["input_ids"].shape[-1]
        for k in ("input_ids", "labels", "attention_mask", "token_type_ids", "weights"):
            if tuple(batch[k].shape) != (b, length):
                raise BatchError(f"batch[{k!r}] must be [{b}, {length}], got {tuple(batch[k].shape)}.")
        if length > cfg.max_text_len:
            raise BatchError(f"Text length {length} exceeds max_text_len {cfg.max_text_len}.")
        win = batch["sr_window"]
        hi = cfg.grid - cfg.sr_window
        what = (f"batch['sr_window'] must be [{b}, 2] cell offsets in 0..{hi} (a {cfg.sr_window}x{cfg.sr_window} "
                f"window on the {cfg.grid}x{cfg.grid} grid)")
        if tuple(win.shape) != (b, 2):
            raise BatchError(f"{what}, got shape {tuple(win.shape)}.")
        if win.device.type == "cpu":  # free here; on an accelerator reading the range back would stall every step
            if win.min() < 0 or win.max() > hi:
                raise BatchError(f"{what}, got range [{int(win.min())}, {int(win.max())}].")
        else:  # checked on the device without waiting for it; a bad window stops the process at a later sync
            torch._assert_async(((win >= 0) & (win <= hi)).all(), what)

    def sr_region(self, sr_window: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] 0/1 mask of the SR window at the SR resolution; rows from ``sr_window[:, 0]``."""
        cfg = self.config
        cells = torch.arange(cfg.grid, device=sr_window.device)
        top, left = sr_window[:, 0:1], sr_window[:, 1:2]
        rows = (cells >= top) & (cells < top + cfg.sr_window)
        cols = (cells >= left) & (cells < left + cfg.sr_window)
        grid = (rows[:, :, None] & cols[:, None, :]).float()[:, None]
        cell = cfg.patch_size * cfg.sr_scale
        return grid.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)

    def forward(self, batch: Mapping[str, torch.Tensor], mask_ratio: float | None = None,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        cfg = self.config
        self._check_batch(batch)
        ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        if noise is None and "noise" in batch:  # per-sample noise from the data pipeline
            noise = batch["noise"]
        big = batch["image"]
        imgs = F.interpolate(big, size=(cfg.img_size, cfg.img_size), mode="bicubic", align_corners=False,
                             antialias=cfg.encoder_resize_antialias)
        latent, mask, ids_restore, _ = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        target = imgs
        if cfg.norm_pix_loss:
            patches = self.patchify(imgs)
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            target = self.unpatchify((patches - mean) / (var + 1e-6) ** 0.5)
        recon = self.unpatchify(pred)
        pixel_mask = mask.reshape(-1, 1, cfg.grid, cfg.grid)
        pixel_mask = pixel_mask.repeat_interleave(cfg.patch_size, 2).repeat_interleave(cfg.patch_size, 3)
        mim_loss = self._pixel_loss(recon, target, pixel_mask)
        sr = self.super_res(recon)
        sr_loss = self._pixel_loss(sr, big, self.sr_region(batch["sr_window"].long()))

        projected = self.bert_mlp(latent)
        image_tokens = projected[:, 1:]
        gap = image_tokens.mean(dim=1, keepdim=True)
        logits = self.text(batch["input_ids"].long(), batch["attention_mask"], batch["token_type_ids"].long(),
                           image_tokens, gap)
        labels = batch["labels"].long()
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        valid = labels.reshape(-1) != -100
        weighted = ce * batch["weights"].reshape(-1).float()
        # The authors' labels cover every position, so this is their plain mean over B x L.
        mlm_loss = torch.where(valid, weighted, 0.0).sum() / valid.sum().clamp_min(1)  # a masked sum: no host sync
        loss = cfg.mim_weight * mim_loss + cfg.sr_weight * sr_loss + cfg.mlm_weight * mlm_loss
        return {"loss": loss, "mim_loss": mim_loss.detach(), "sr_loss": sr_loss.detach(),
                "mlm_loss": mlm_loss.detach(), "logits": logits, "mask": mask, "reconstruction": recon, "sr": sr}

    # -- encoder export -----------------------------------------------------------------------------------------
    def to_encoder(self, pretrained_cfg: Mapping[str, Any], ecamp_cfg: Mapping[str, Any]) -> nn.Module:
        """A stand-alone timm ``VisionTransformer`` with this model's encoder weights, ready for
        ``ecamp.save_pretrained``: pooled embedding = mean of the normed patch tokens, trainable position embedding
        (as downstream code has it). The caller gives the preprocessing cfg the export carries
        (:func:`ecamp.convert.encoder_cfgs` reads it from the manifest)."""
        from ..config import EcampCfg
        from ..models.encoder import build_encoder

        enc = build_encoder(encoder_config(self.config, pretrained_cfg))
        enc.load_state_dict(self.encoder.state_dict(), strict=True)
        enc.ecamp_cfg = EcampCfg.from_dict(ecamp_cfg)
        return enc.eval()

    # -- ecamp's own folder format (written by ecamp.save_pretrained, ecamp.folders) -----------------------------
    @classmethod
    def from_folder(cls, folder: str | Path, *, config_path: str | Path | None = None,
                    weights_path: str | Path | None = None) -> ECAMPPretrainModel:
        """Read a folder written by :func:`ecamp.save_pretrained` (``ecamp.load_pretrain`` resolves names and Hub repos
        to such a folder and verifies it)."""
        import json

        from safetensors.torch import load_model

        from ..config import EcampCfg

        folder = Path(folder)
        config_path = Path(config_path or folder / "config.json")
        weights_path = Path(weights_path or folder / "model.safetensors")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            cfg = ECAMPPretrainConfig.from_dict(config["ecamp_pretrain_config"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidWeightsFileError(f"{config_path} is not an ECAMP pre-training config: {e}",
                                          path=config_path) from e
        model = cls(cfg)
        try:
            missing, unexpected = load_model(model, str(weights_path), strict=False)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise InvalidWeightsFileError(f"{weights_path} cannot be loaded: {e}", path=weights_path) from e
        if missing or unexpected:
            raise WeightsMismatchError(f"{weights_path} does not fit its config.json: missing {sorted(missing)[:6]}, "
                                       f"unexpected {sorted(unexpected)[:6]}.", path=weights_path)
        model.ecamp_cfg = EcampCfg.from_dict(config.get("ecamp"), where=f"{config_path}: ecamp")
        model.source_folder = folder
        return model

    @classmethod
    def from_authors(cls, path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
                     config: ECAMPPretrainConfig | None = None) -> ECAMPPretrainModel:
        """Load an authors'-format pre-training checkpoint (``{"model": ...}`` or a bare state dict, with the
        released ``cross_attn_layer`` or the later ``context_fusion_layer`` names) strictly. Only the unused pooler
        is dropped; anything else missing or unexpected raises :class:`WeightsMismatchError`."""
        if isinstance(path_or_state_dict, (str, Path)):
            source = str(path_or_state_dict)
            state = read_authors_checkpoint(path_or_state_dict)
        else:
            source = "state dict"
            state = _unwrap(path_or_state_dict, source)
        model = cls(config or ECAMPPretrainConfig())
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            new = authors_to_ecamp_key(key)
            if new is not None:
                mapped[new] = value
        model.load_strict(mapped, source=source)
        return model

    def load_strict(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        target = self.state_dict()
        missing = sorted(set(target) - set(state))
        unexpected = sorted(set(state) - set(target))
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in state
                  if k in target and state[k].shape != target[k].shape]
        if missing or unexpected or shapes:
            raise WeightsMismatchError(
                f"{source} does not fit ECAMPPretrainModel({_diff_config(self.config)}): missing {missing[:6]}, "
                f"unexpected {unexpected[:6]}, mis-shaped {shapes[:4]}. Pass the matching ECAMPPretrainConfig.")
        self.load_state_dict(dict(state), strict=True)

    def to_authors_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under the authors' key names (``context_fusion_layer`` spelling)."""
        out = {}
        inverse = [(new, old) for old, new in _AUTHORS_PREFIXES if "cross_attn" not in old]
        for key, value in self.state_dict().items():
            if key.startswith("encoder."):
                out[key[len("encoder."):]] = value
                continue
            for new, old in inverse:
                if key.startswith(new):
                    out[old + key[len(new):]] = value
                    break
            else:
                out[key] = value
        return out


def _diff_config(cfg: ECAMPPretrainConfig) -> str:
    default = ECAMPPretrainConfig()
    diff = {k: v for k, v in cfg.to_dict().items() if getattr(default, k) != v}
    return ", ".join(f"{k}={v}" for k, v in diff.items()) or "default"


def _encoder_args(cfg: ECAMPPretrainConfig) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments of the encoder: the sizes, mean pooling after the final norm."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=0,
                global_pool="avg", fc_norm=False)


def encoder_config(cfg: ECAMPPretrainConfig, pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The timm-format ``config.json`` of this architecture's stand-alone encoder."""
    args = _encoder_args(cfg)
    return {"architecture": ENCODER_ARCHITECTURE, "num_classes": args.pop("num_classes"), "model_args": args,
            "pretrained_cfg": dict(pretrained_cfg)}


def read_authors_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an authors'-format ``.pth``, read with ``torch.load(weights_only=True)`` (no arbitrary
    unpickling; the ``args`` Namespace the authors store is the only extra class allowed)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidWeightsFileError(f"{path} does not exist or is not a file.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise InvalidWeightsFileError(f"{path} is not a readable PyTorch checkpoint (read with "
                                      f"weights_only=True, so arbitrary pickles are refused): {e}") from e
    return _unwrap(obj, str(path))


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidWeightsFileError(f"{source} holds no state dict (expected {{'model': state_dict}} or a "
                                      f"state dict).")
    return dict(obj)
