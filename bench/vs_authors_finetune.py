"""ecamp's downstream fine-tuning under ``--authors-protocol`` beside the authors' own script, on phantom lists.

    python bench/vs_authors_finetune.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR --head cls
    python bench/vs_authors_finetune.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR --head cls \\
        --mode linear-probe
    python bench/vs_authors_finetune.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR --head seg
    python bench/vs_authors_finetune.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR --head seg \\
        --seg-task siim --n 40 --epochs 2
    python bench/vs_authors_finetune.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR --head seg \\
        --seg-task riga --n 40 --epochs 3
    python bench/vs_authors_finetune.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR --head det \\
        --n 40 --epochs 2

The authors' ``ECAMP/Fine-tuning/Classification/train.py`` (``--head cls``), ``Segmentation/train.py`` with
``--task RSNA`` (``--head seg``) or ``--task SIIM`` (``--seg-task siim``), ``Segmentation/train_RIGA.py``
(``--seg-task riga``) or ``Detection/train.py`` with ``--task RSNA`` (``--head det``) is imported at run
time from the checkout given and run through its own ``main()``; nothing of it is copied here. ``ecamp train
phantom`` writes the lists in the authors' formats: ``--kind classification`` for classification, ``--kind
detection`` (``image_path,bbox``) at 1024 px for RSNA segmentation, whose masks are the filled boxes on a 1024 x
1024 grid (ecamp reads them after ``ecamp.train.downstream.segmentation.convert_lists``), and at 256 px for
detection (its coordinates rewritten as floats, as the authors' published lists, see :func:`_float_boxes`).
With ``--seg-task siim`` (their ``--task SIIM``) the same boxes
are written as their SIIM lists (``ImageId, EncodedPixels``: the filled boxes run-length encoded down the columns,
``-1`` for none; only ``train_list``, ``val_list`` and ``test_list``, what ``--data_volume 100`` reads) with the films
as ``train/images/1024/dicom/<ImageId>.png`` (their ``SIIMSegmentDataset`` opens PNGs there), and ecamp reads them
after ``convert_lists("siim", ...)``. Their unseeded negative sampling (D4, ``np.random.choice(neg, n_pos,
replace=False)``) is made to choose every negative: the phantom training list holds as many negatives as positives
(:func:`balance_siim_rows`), so both sides train on the same images whatever the draw. With ``--seg-task riga``
the films with a box (at 224 px: ``--size`` must be their ``--img_size``, so that their mask resize is the identity
and the masks are the same on both sides) are tinted to RGB and written with label maps (disc 128 = the box, cup
255 = its middle half) as their ``img_path, mask_path`` lists (:func:`_riga_phantom`), read by both sides as they
are; the encoder is a fundus model (``fundus-vit-b``'s preprocessing). Their
``./datasets/<task>/`` layout (detection: ``./<task>/``) is made in a scratch folder that is their working
directory. Both sides start from the same encoder weights (the authors' side reads
them as a ``{"model": state_dict}`` file, as it reads ECAMP's release), train with the same recipe, and run
``--seeds`` (two) seeds each. The table gives steps per epoch, the learning rate at every step, the evaluation
points, the selected step, the test metric of each side's selected weights scored by both sides' test code, and
each side's end-to-end test metric. The script exits 1 on a difference that ``docs/fidelity.md`` does not name.

What is compared, and how:

- steps per epoch: the length of each side's training loader;
- learning rate: the value in the optimizer at every ``optimizer.step()`` (a wrapper records it), bit for bit;
- evaluation points: the steps at which each side validated;
- selected step: each side's (the authors': their last ``save_model_*``). The two runs see different validation
  scores (their random streams differ: data order, augmentation, head init), so the rule is checked instead:
  ecamp's selection (``ecamp.train.downstream.loop.replay_selection``, what its loop runs) replayed on the
  authors' validation scores must pick their saved step and stop where they stopped;
- test metric on the same weights: the authors' selected weights scored by ecamp's test code, and ecamp's
  selected weights (written as their ``<name>_best{auc,acc,dice}_checkpoint.bin``; the segmentation keys mapped
  onto their ``SegViT``) by their ``test()``; each must equal the other side's own score of them. For
  segmentation their test tensors are also saved and scored by ecamp's model, which must give their Dice exactly,
  and the two sides' test inputs are compared: masks must be identical, images may be one 8-bit level apart
  (their cv2 ``INTER_LINEAR`` on 8-bit images against ecamp's ``resize=linear-uint8``, D6), and then the Dice of
  each side's own inputs may differ by that. Detection the same way (boxes instead of masks), and on their
  recorded test pass also: ecamp's decoding of its raw maps against the boxes their ``YOLOLoss`` decoded, ecamp's
  NMS (``nms_iou_plus_one``) on the very boxes their ``non_max_suppression`` got, and ecamp's mAP (its
  torchmetrics) of the very predictions their metric (their pinned torchmetrics 0.7.2) scored;
- end-to-end: each side's test metric of its own run, per seed (reported, not compared: the random streams
  differ).

The budget is a whole number of epochs (``--epochs``), since the authors check it only at epoch ends (#35, not
reproduced by ecamp). Detection validates from the first epoch on both sides (their ``--start_eval 0``, ecamp's
recipe ``start_eval: 0`` through ``--config``): their run.sh's 50-100 is past a budget this small. Both sides train in
fp32: the authors' ``--fp16`` needs apex and CUDA (D13), so it is not passed, and ecamp gets ``--precision fp32``.

The authors' process gets ``--authors-pythonpath`` first on its path, holding their pinned packages for Python
3.11 (``pip install --target DIR --no-deps timm==0.4.12 scikit-learn==1.3.2 numpy==1.24.4 scipy==1.10.1
pandas==2.0.3 pytz tzdata python-dateutil six ml-collections==0.1.1 absl-py contextlib2
opencv-python-headless==4.10.0.84``, for segmentation and detection ``albumentations==1.4.18 albucore==0.0.17
eval-type-backport scikit-image==0.21.0 lazy_loader einops``, with pydantic >= 2.7 from this environment or added
there, and for detection ``torchmetrics==0.7.2 pyDeprecate==0.3.2 terminaltables "setuptools<81"`` (their torchmetrics
imports ``pkg_resources``); ``DIR`` may be several folders joined by ``os.pathsep``);
torch, torchvision and Pillow are this environment's. To run their files unedited it also, where they are
missing, provides an empty ``apex`` (imported at ``train.py:18-19``, used only with ``--fp16``), an empty ``ipdb``,
a ``SummaryWriter`` that writes nothing (``torch.utils.tensorboard`` needs the tensorboard package) and, for
segmentation, an empty ``segmentation_models_pytorch`` (only their ResNet-50 U-Net uses it). With ``--model tiny``
(the default: a randomly initialised ViT of width 48, depth 2, 3 heads, written by this script at 64 px for
classification and 224 px for segmentation and detection) their ``models_vit.vit_base_patch16``, ``SegViT`` or
``ViTDetector`` is built, from their own classes, at that size (their segmentation decoder, detection neck and
YOLOv3 head as they are). Their detection code runs on the CPU as it is (no shim beyond these). Their RIGA script
needs two more: its training transform is given the mask channel-last (as written, albumentations raises on it,
#45), and for the test of ecamp's weights its ``main()``, which trains whatever ``--stage`` says, skips training.
Each change is printed. Their data loaders keep their 16 workers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
# per head: the authors' folder and --task (whose ./datasets/<task>/ holds the lists), the metric, the list suffix,
# their checkpoint name, the tiny encoder's input size (their SegViT is built at timm's default 224), the default lr
HEADS = {
    "cls": {"folder": "Classification", "task": "ChestX-ray14", "metric": "auroc", "suffix": ".txt",
            "checkpoint": "ecamp_bestauc_checkpoint.bin", "img_size": 64, "lr": 3e-2},
    "seg": {"folder": "Segmentation", "task": "RSNA", "metric": "dice", "suffix": ".csv",
            "checkpoint": "ecamp_bestdice_checkpoint.bin", "img_size": 224, "lr": 5e-4},
    "det": {"folder": "Detection", "task": "RSNA", "metric": "map", "suffix": ".csv",
            "checkpoint": "ecamp_bestmap_checkpoint.bin", "img_size": 224, "lr": 5e-4},
}
# where each head's data sets read their lists, relative to their working directory
LIST_DIR = {"cls": "datasets/{task}", "seg": "datasets/{task}", "det": "{task}"}
# the authors' script per segmentation task (RIGA's has two decoders, disc and cup)
SEG_SCRIPT = {"rsna": "train.py", "siim": "train.py", "riga": "train_RIGA.py"}


def _script_name(head: str, seg_task: str | None) -> str:
    """The authors' script a comparison runs, in its head's folder."""
    return SEG_SCRIPT[seg_task or "rsna"] if head == "seg" else "train.py"
TINY = {"patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3, "mlp_ratio": 4.0}


# -- the authors' process ----------------------------------------------------------------------------------------
def _shim_authors(changes: list[str], head: str) -> None:
    """Make the authors' Classification code importable here without editing it; each change goes to ``changes``."""
    import types

    try:
        import apex  # noqa: F401
    except ImportError:
        apex = types.ModuleType("apex")
        apex.amp = types.ModuleType("apex.amp")
        apex.parallel = types.ModuleType("apex.parallel")
        apex.parallel.DistributedDataParallel = None
        sys.modules.update({"apex": apex, "apex.amp": apex.amp, "apex.parallel": apex.parallel})
        changes.append("apex is not installed: an empty apex module lets train.py:18-19 import (apex is used only "
                       "with --fp16, which is not passed)")
    try:
        import ipdb  # noqa: F401
    except ImportError:
        sys.modules["ipdb"] = types.ModuleType("ipdb")
        changes.append("ipdb is not installed: an empty module (train.py:32, models_vit.py:21, my_dataset.py:9 "
                       "import it; nothing calls it)")
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        board = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:  # their scalars only go to TensorBoard
            def __init__(self, *a, **k):
                pass

            def add_scalar(self, *a, **k):
                pass

            def close(self):
                pass

        board.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = board
        changes.append("tensorboard is not installed: a SummaryWriter that writes nothing (train.py:16, :367)")
    try:
        if head == "seg":
            import segmentation_models_pytorch  # noqa: F401
    except ImportError:
        sys.modules["segmentation_models_pytorch"] = types.ModuleType("segmentation_models_pytorch")
        changes.append("segmentation_models_pytorch is not installed: an empty module (Segmentation/train.py:27 "
                       "imports it; only its ResNet-50 U-Net branch uses it)")


def _size_authors_model(mod, head: str, vit: dict | None, changes: list[str]) -> None:
    """Build the authors' model at the encoder's size where it is not their ViT-B/16 (their own classes)."""
    if vit is None:
        return
    from functools import partial

    from torch import nn

    if head == "cls":
        import models_vit

        models_vit.vit_base_patch16 = partial(models_vit.VisionTransformer, in_chans=3, qkv_bias=True,
                                              norm_layer=partial(nn.LayerNorm, eps=1e-6), **vit)
        changes.append(f"models_vit.vit_base_patch16 builds their VisionTransformer at {vit} (the encoder's size) "
                       f"instead of ViT-B/16 at 224")
    elif head == "det":
        vit_detector = mod.ViTDetector
        size = {"patch_size": vit["patch_size"], "hidden_size": vit["embed_dim"], "num_hidden_layers": vit["depth"],
                "num_attention_heads": vit["num_heads"], "mlp_ratio": vit["mlp_ratio"]}
        mod.ViTDetector = lambda **kw: vit_detector(**{**kw, **size})
        changes.append(f"train.py's ViTDetector is built with {size} (the encoder's size) instead of ViT-B/16; its "
                       f"neck and ModelMain's YOLOv3 head are theirs as they are")
    else:
        seg_vit = mod.SegViT
        size = {"patch_size": vit["patch_size"], "hidden_size": vit["embed_dim"], "num_hidden_layers": vit["depth"],
                "num_attention_heads": vit["num_heads"], "mlp_ratio": vit["mlp_ratio"]}
        mod.SegViT = lambda **kw: seg_vit(**{**kw, **size})
        changes.append(f"train.py's SegViT is built with {size} (the encoder's size) instead of ViT-B/16; its "
                       f"decoder is theirs as it is")


def _riga_channel_last(changes: list[str]) -> None:
    """Let the authors' RIGA training transform run (#45): ``my_dataset.py:348-351`` gives albumentations the mask
    channel-first, ``(2, S, S)`` beside the ``(H, W, 3)`` image, which every albumentations >= 1.3 (their pinned
    1.4.18 included) refuses at the first training sample (``Height and Width of image, mask or masks should be
    equal``). Their transform is called with the mask channel-last and its output turned back; the films are S x S
    at their ``--img_size``, so image and mask are the same size, as the shape check wants."""
    import numpy as np
    from utils import my_dataset

    make = my_dataset.RIGASegmentDataset.train_transforms

    def train_transforms(self, *a, **k):
        compose = make(self, *a, **k)

        def channel_last(image, mask):
            out = compose(image=image, mask=np.ascontiguousarray(np.moveaxis(mask, 0, -1)))
            return {**out, "mask": np.moveaxis(out["mask"], -1, 0)}

        return channel_last

    my_dataset.RIGASegmentDataset.train_transforms = train_transforms
    changes.append("RIGASegmentDataset's training transform gets the (2, S, S) mask channel-last and returns it "
                   "channel-first: as written (my_dataset.py:348-351) albumentations 1.4.18 raises on its shape check "
                   "at the first training sample (#45); the phantom films are S x S at --img_size")


def _authors_worker(spec: dict) -> dict:
    """Run the authors' train.py ``main()`` with ``spec["argv"]``; record what the table needs."""
    import importlib.util

    import numpy as np
    import torch

    head = spec["head"]
    root = Path(spec["authors"]) / "ECAMP" / "Fine-tuning" / HEADS[head]["folder"]
    os.chdir(spec["cwd"])  # their data sets read ./datasets/<task>/<list>
    sys.path.insert(0, str(root))
    changes: list[str] = []
    _shim_authors(changes, head)
    module_spec = importlib.util.spec_from_file_location(f"authors_{HEADS[head]['folder'].lower()}_train",
                                                         root / _script_name(head, spec.get("seg_task")))
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    _size_authors_model(mod, head, spec["vit"], changes)
    if spec.get("seg_task") == "riga":
        _riga_channel_last(changes)
        if spec["argv"][spec["argv"].index("--stage") + 1] == "test":
            train = mod.train

            def train_unless_test(args, model):
                return None if args.stage == "test" else train(args, model)

            mod.train = train_unless_test
            changes.append("train_RIGA.py's main() trains whatever --stage says (:567-568; their train.py:524 trains "
                           "only under --stage train), and its train() fails on the one loader get_loader gives "
                           "under --stage test (:343): for ecamp's weights train() is skipped, so main() goes on "
                           "to their own setup() and test() of the checkpoint in --output_dir (:570-575)")
    rec: dict = {"changes": changes, "lrs": [], "evals": [], "saves": [], "steps_per_epoch": None, "test": None,
                 "test_per_class": None, "missing_keys": None}
    phase = {"now": "train", "step": None}
    test_parts: list = []
    det_dump: dict = {"nms": [], "preds": [], "targets": []}

    # recording wrappers: each calls the authors' function and returns its result unchanged
    def recording(cls):
        step = cls.step

        def optimizer_step(self, *a, **k):
            rec["lrs"].append(self.param_groups[0]["lr"])
            return step(self, *a, **k)

        cls.step = optimizer_step

    recording(torch.optim.SGD)  # classification
    recording(torch.optim.AdamW)  # segmentation
    get_loader, valid, test = mod.get_loader, mod.valid, mod.test
    load_name = "load_weight" if hasattr(mod, "load_weight") else "load_weights"
    load_weight = getattr(mod, load_name)

    def get_loader_rec(args):
        out = get_loader(args)
        if isinstance(out, tuple):
            rec["steps_per_epoch"] = len(out[0])
        return out

    def valid_rec(args, model, writer, loader, global_step):
        phase.update(now="valid", step=global_step)
        result = valid(args, model, writer, loader, global_step)
        rec["evals"].append([global_step, float(result if head == "det" else result[0])])  # det: the mAP alone
        phase["now"] = "train"
        return result

    def test_rec(*a, **k):
        phase["now"] = "test"
        if head == "seg" and spec.get("dump_inputs"):  # their test inputs, for ecamp's model to score as well
            xs, ys = zip(*list(a[2]), strict=True)
            torch.save({"x": torch.cat(xs), "y": torch.cat(ys)}, spec["dump_inputs"])
        if head == "det":  # their setup() loads the test weights with strict=False: the keys it did not find
            args = a[0]
            have = torch.load(args.pretrained_path, map_location="cpu")
            rec["missing_keys"] = sorted(set(a[1].state_dict()) - set(have))
            batches = list(a[2])
            det_dump["x"] = torch.cat([b["imgs"] for b in batches])
            det_dump["y"] = torch.cat([b["labels"] for b in batches])
        out = test(*a, **k)
        if head == "det" and spec.get("dump_inputs"):
            torch.save(det_dump, spec["dump_inputs"])
        return out

    def load_weight_rec(model, weight_path, args):
        if args.stage == "test":
            have = torch.load(weight_path, map_location="cpu")
            rec["missing_keys"] = sorted(set(model.state_dict()) - set(have))
        return load_weight(model, weight_path, args)

    def save_rec(save):
        def saving(args, model):
            rec["saves"].append(phase["step"])
            return save(args, model)
        return saving

    if head == "cls":
        auc, accuracy = mod.auc, mod.simple_accuracy

        def auc_rec(pred, labels, num_classes):
            out = auc(pred, labels, num_classes)
            if phase["now"] == "test":
                rec["test_per_class"] = [float(v) for v in out]
                rec["test"] = float(np.array(out).mean())  # their test(): np.array(aurocs).mean()
            return out

        def accuracy_rec(preds, labels):
            out = accuracy(preds, labels)
            if phase["now"] == "test" and not spec["multilabel"]:
                rec["test"] = float(out)
            return out

        mod.auc, mod.simple_accuracy = auc_rec, accuracy_rec
        mod.save_model_auc, mod.save_model_acc = save_rec(mod.save_model_auc), save_rec(mod.save_model_acc)
    elif head == "seg":
        get_dice = mod.get_dice

        def dice_rec(probability, truth, threshold=0.5):
            out = get_dice(probability, truth, threshold)
            if phase["now"] == "test":
                test_parts.append(out)
                if spec.get("seg_task") == "riga":  # train_RIGA.py test(): disc and cup alternate; their means' mean
                    disc, cup = np.concatenate(test_parts[0::2]), np.concatenate(test_parts[1::2] or [[np.nan]])
                    rec["test"] = float((disc.mean() + cup.mean()) / 2)
                else:
                    rec["test"] = float(np.concatenate(test_parts).mean())  # their test(): the mean Dice per image
            return out

        mod.get_dice = dice_rec
        mod.save_model_dice = save_rec(mod.save_model_dice)
    if head == "det":
        nms, metric_cls = mod.non_max_suppression, mod.MeanAveragePrecision

        def nms_rec(prediction, num_classes, conf_thres=0.5, nms_thres=0.4):
            decoded = prediction.clone()  # their NMS rewrites the boxes in place
            out = nms(prediction, num_classes, conf_thres=conf_thres, nms_thres=nms_thres)
            if phase["now"] == "test":
                det_dump["nms"].append({"decoded": decoded, "kept": out, "conf": conf_thres, "iou": nms_thres})
            return out

        class MeanAveragePrecisionRec(metric_cls):  # their torchmetrics' metric, its inputs and result recorded
            def update(self, preds, target):
                if phase["now"] == "test":
                    det_dump["preds"] += [{k: v.detach().clone() for k, v in d.items()} for d in preds]
                    det_dump["targets"] += [{k: v.detach().clone() for k, v in d.items()} for d in target]
                return super().update(preds, target)

            def compute(self):
                out = super().compute()
                if phase["now"] == "test":
                    rec["test"] = float(out["map"])
                return out

        mod.non_max_suppression, mod.MeanAveragePrecision = nms_rec, MeanAveragePrecisionRec
        mod.save_model_map = save_rec(mod.save_model_map)
    mod.get_loader, mod.valid, mod.test = get_loader_rec, valid_rec, test_rec
    setattr(mod, load_name, load_weight_rec)
    sys.argv = ["train.py", *spec["argv"]]
    try:
        mod.main()
    except Exception as e:  # noqa: BLE001 - reported in the table: what their code did
        import traceback

        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if str(root) in f.filename),
                     f"{tb[-1].filename}:{tb[-1].lineno}")
        traceback.print_exc()  # the whole story in the worker's log; the table gets the last line
        lines = str(e).strip().splitlines()
        rec["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''} (at {where})"
    return rec


# -- ecamp's process ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _record_ecamp(rec: dict):
    import torch

    from ecamp.train.downstream import loop

    saved = {cls: cls.step for cls in (torch.optim.SGD, torch.optim.AdamW)}
    endless = loop._endless

    def recording(step):
        def optimizer_step(self, *a, **k):
            rec["lrs"].append(self.param_groups[0]["lr"])
            return step(self, *a, **k)
        return optimizer_step

    def endless_rec(loader, sampler):
        rec["steps_per_epoch"] = len(loader)
        return endless(loader, sampler)

    for cls, step in saved.items():
        cls.step = recording(step)
    loop._endless = endless_rec
    try:
        yield
    finally:
        for cls, step in saved.items():
            cls.step = step
        loop._endless = endless


# the authors' SegViT keys <-> ecamp's SegmentationModel keys (their decoder_k stage j = ecamp's layer 4(k-1)+j;
# their RIGA SegViT's decoder_disc and decoder_cup = ecamp's decoders 0 and 1)
_SEG_DECODERS = {"decoder": 0, "decoder_disc": 0, "decoder_cup": 1}


def _seg_key_to_ecamp(key: str) -> str:
    if key.startswith("encoder.seg_head."):
        return key[len("encoder."):]
    name, _, rest = key.partition(".")
    if name in _SEG_DECODERS:
        n = _SEG_DECODERS[name]
        if rest.startswith("final_out."):
            return f"decoders.{n}.16." + rest[len("final_out."):]
        stage, layer, rest = rest[len("decoder_"):].split(".", 2)
        return f"decoders.{n}.{4 * (int(stage) - 1) + int(layer)}.{rest}"
    return key


def _seg_key_to_authors(key: str, riga: bool = False) -> str | None:
    if key.startswith("seg_head."):
        return "encoder." + key
    if key.startswith("decoders."):
        n, layer, rest = key[len("decoders."):].split(".", 2)
        name = ("decoder_disc", "decoder_cup")[int(n)] if riga else "decoder"
        layer = int(layer)
        return f"{name}.final_out.{rest}" if layer == 16 else f"{name}.decoder_{layer // 4 + 1}.{layer % 4}.{rest}"
    if key.startswith("encoder.norm."):
        return None  # their encoder has no final norm (D3); ecamp's is frozen and unused under raw-block
    return key


# the authors' ModelMain(ViTDetector) keys <-> ecamp's DetectionModel keys
_DET_NECK = {"traspose": "middle.0", "layer1": "middle.1", "transpose1": "fine.0", "layer2": "fine.2",
             "downsample": "coarse.0", "layer3": "coarse.1"}
_DET_BOTTLENECK = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
_DET_STACK = {"embedding0": "coarse", "embedding1": "middle", "embedding2": "fine"}


def _det_key_to_ecamp(key: str) -> str:
    if key.startswith("backbone.encoder.det_head."):
        return key[len("backbone.encoder."):]
    if key.startswith("backbone.encoder."):
        return "encoder." + key[len("backbone.encoder."):]
    if key.startswith("backbone.layers."):
        part, rest = key[len("backbone.layers."):].split(".", 1)
        first, _, tail = rest.partition(".")
        if first in _DET_BOTTLENECK:
            rest = f"body.{_DET_BOTTLENECK[first]}.{tail}"
        return f"neck.{_DET_NECK[part]}.{rest}"
    if key.startswith(("embedding1_cbl.", "embedding2_cbl.")):
        part, layer, rest = key.split(".", 2)
        return f"head.lateral{part[9]}.{'0' if layer == 'conv' else '1'}.{rest}"
    part, layer, rest = key.split(".", 2)
    if layer == "conv_out":
        return f"head.{_DET_STACK[part]}.out.1.{rest}"
    sub, rest = rest.split(".", 1)
    sub = "0" if sub == "conv" else "1"
    where = f"trunk.{layer}" if int(layer) < 5 else "out.0"
    return f"head.{_DET_STACK[part]}.{where}.{sub}.{rest}"


def _det_key_to_authors(key: str) -> str | None:
    if key.startswith("encoder.norm."):
        return None  # their encoder has no final norm (D3); ecamp's is frozen and unused under raw-block
    if key.startswith("det_head."):
        return "backbone.encoder." + key
    if key.startswith("encoder."):
        return "backbone." + key
    if key.startswith("neck."):
        scale, idx, rest = key[len("neck."):].split(".", 2)
        part = {v: k for k, v in _DET_NECK.items()}[f"{scale}.{idx}"]
        if rest.startswith("body."):
            layer, tail = rest[len("body."):].split(".", 1)
            rest = f"{ {v: k for k, v in _DET_BOTTLENECK.items()}[layer]}.{tail}"
        return f"backbone.layers.{part}.{rest}"
    if key.startswith("head.lateral"):
        n, sub, rest = key[len("head.lateral"):].split(".", 2)
        return f"embedding{n}_cbl.{'conv' if sub == '0' else 'bn'}.{rest}"
    scale, where, rest = key[len("head."):].split(".", 2)
    part = {v: k for k, v in _DET_STACK.items()}[scale]
    layer, rest = rest.split(".", 1)
    if where == "out" and layer == "1":
        return f"{part}.conv_out.{rest}"
    layer = layer if where == "trunk" else "5"
    sub, rest = rest.split(".", 1)
    return f"{part}.{layer}.{'conv' if sub == '0' else 'bn'}.{rest}"


def _ecamp_run(spec: dict):
    """The head, FinetuneRun and runtime ``run_finetune`` sets up for this comparison (the authors' protocol)."""
    from ecamp.train.common.distributed import setup_runtime
    from ecamp.train.downstream.classification import ClassificationTask
    from ecamp.train.downstream.detection import DetectionTask
    from ecamp.train.downstream.protocol import resolve_protocol
    from ecamp.train.downstream.segmentation import SegmentationTask
    from ecamp.train.downstream.task import FinetuneRun

    head = {"cls": lambda: ClassificationTask("phantom", 100, spec["mode"]),
            "seg": lambda: SegmentationTask(spec.get("seg_task", "rsna"), 100),
            "det": lambda: DetectionTask("rsna", 100)}[spec["head"]]()
    proto = resolve_protocol({"precision": "fp32"}, True, head.metric)
    data, lists = Path(spec["data"]), Path(spec["lists"])
    files = head.list_files(lists, proto)
    rows = {s: head.read_list(f) for s, f in files.items()}
    rt = setup_runtime("cpu", seed=0)
    run = FinetuneRun(spec["model"], data, lists, True, proto, head.default_recipe(), 0, files, rows, rt)
    run.rows = head.prepare_rows(run)
    return head, run, rt


def _ecamp_test_of(spec: dict, state: dict) -> dict:
    """ecamp's test score of the authors' selected weights ``state`` (run_finetune's test step: the same data
    set, predictions and score); for segmentation also the score of their own test tensors and how far the two
    sides' test inputs are apart."""
    import ecamp
    from ecamp.train.downstream.loop import evaluate

    head, run, rt = _ecamp_run(spec)
    if spec["head"] == "cls":
        model = ecamp.load(spec["model"], num_classes=head.task.num_classes, fc_norm=True)
        model.load_state_dict(state, strict=True)
        head.trunk = model
    else:
        model = head.build_model(run)
        to_ecamp = _seg_key_to_ecamp if spec["head"] == "seg" else _det_key_to_ecamp
        mapped = {to_ecamp(k): v for k, v in state.items()}
        own = model.state_dict()
        missing = sorted(set(own) - set(mapped) - {k for k in own if k.startswith("encoder.norm.")})
        if missing or set(mapped) - set(own):
            raise KeyError(f"the authors' SegViT keys do not map onto ecamp's model: missing {missing[:5]}, "
                           f"unexpected {sorted(set(mapped) - set(own))[:5]}")
        model.load_state_dict({**own, **mapped}, strict=True)
    sets = head.datasets(run)

    def score(dataset):
        scored = evaluate(model, dataset, lambda net, batch: head.predict(net, batch, rt.device), head.score, rt,
                          batch_size=16, collate_fn=getattr(head, "collate_fn", None))
        return scored[0] if isinstance(scored, tuple) else scored

    out = {"own_inputs": score(sets["test"])}
    dump = Path(spec.get("authors_inputs", ""))
    if spec["head"] == "det" and dump.is_file():
        out.update(_det_checks(head, model, sets["test"], torch_load(dump), rt))
        return out
    if spec["head"] == "seg" and dump.is_file():  # their test tensors through ecamp's model and score
        import torch

        theirs = torch.load(dump)
        # their get_dice thresholds the truth at 0.5 (their SIIM masks are INTER_AREA-resized, fractional: #46);
        # RIGA's come as [B, 2 (disc, cup), S, S]
        y = (theirs["y"] > 0.5).float()
        x, y = theirs["x"], y if y.ndim == 4 else y.unsqueeze(1)
        out["their_inputs"] = score(torch.utils.data.TensorDataset(x, y))
        ours = [sets["test"][i] for i in range(len(sets["test"]))]
        ox, oy = torch.stack([t[0] for t in ours]), torch.stack([t[1] for t in ours])
        std = head.cfg["std"][0]  # normalised units -> 8-bit levels
        out["inputs"] = {"mask_pixels_differing": int((oy != y).sum()),
                         "image_max_levels": float((ox - x).abs().max() * std * 255),
                         "image_share_differing": float(((ox - x).abs() * std * 255 > 0.5).float().mean())}
    return out


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _det_checks(head, model, dataset, theirs: dict, rt) -> dict:
    """Detection, on the authors' own test records: their test tensors through ecamp's model, decoding, NMS and
    metric; ecamp's NMS on the boxes their NMS was given; ecamp's metric on the predictions their metric scored;
    and how far the two sides' test inputs are apart."""
    import torch

    from ecamp.models.heads import decode, postprocess
    from ecamp.train.downstream.detection import mean_average_precision

    x, y = theirs["x"].float(), theirs["y"].float()  # y: [B, objects, (class, cx, cy, w, h)] normalised, zero-padded
    size = model.img_size
    boxes = []
    for t in y:
        t = t[t[:, 3] > 0]
        boxes.append(torch.stack([t[:, 1] - t[:, 3] / 2, t[:, 2] - t[:, 4] / 2, t[:, 1] + t[:, 3] / 2,
                                  t[:, 2] + t[:, 4] / 2], 1))
    out = {}
    model.eval()
    preds = []
    for i in range(0, len(x), 16):
        preds += head.predict(model, (x[i:i + 16], boxes[i:i + 16]), rt.device)
    out["their_inputs"] = head.score(preds)
    # NMS on the same decoded boxes: every kept box, score and order equal
    nms_same, n_kept = True, 0
    for call in theirs["nms"]:
        mine = postprocess(call["decoded"].clone(), call["conf"], call["iou"], iou_plus_one=True)
        for kept, ours in zip(call["kept"], mine, strict=True):
            kept = kept if kept is not None else torch.zeros(0, 7)
            n_kept += len(kept)
            # their torch.sort is not stable: boxes of one score may come in another order, so the kept boxes are
            # compared as sets of (box, score), and the scores in order
            same = len(kept) == len(ours["boxes"]) and torch.equal(kept[:, 4], ours["scores"]) and sorted(
                map(tuple, kept[:, :5].tolist())) == sorted(
                map(tuple, torch.cat([ours["boxes"], ours["scores"][:, None]], 1).tolist()))
            nms_same = nms_same and same
    out["nms"] = {"same": nms_same, "kept": n_kept, "calls": len(theirs["nms"])}
    # decoding: ecamp's decode of ecamp's raw maps on their inputs against the boxes their NMS was given
    with torch.no_grad():
        decoded = torch.cat([decode(model(x[i:i + 16]), model.anchors, size, 1) for i in range(0, len(x), 16)])
    theirs_decoded = torch.cat([c["decoded"] for c in theirs["nms"]])
    out["decoded_max_diff"] = float((decoded - theirs_decoded).abs().max()) if decoded.shape == \
        theirs_decoded.shape else None
    # the metric on the predictions their metric scored (their labels are floats; ecamp's torchmetrics wants ints)
    p = [{"boxes": d["boxes"].float(), "scores": d["scores"].float(), "labels": d["labels"].long()}
         for d in theirs["preds"]]
    t = [{"boxes": d["boxes"].float(), "labels": d["labels"].long()} for d in theirs["targets"]]
    out["metric_on_their_predictions"] = mean_average_precision(p, t, authors=True)
    out["images_scored"] = len(p)
    ours = [dataset[i] for i in range(len(dataset))]
    ox = torch.stack([o[0] for o in ours])
    from ecamp.factory import resolve_model_cfg

    std = resolve_model_cfg(head.encoder)["std"][0]  # normalised units -> 8-bit levels
    ob = [o[1] for o in ours]
    out["inputs"] = {"boxes_differing": int(sum(
                         a.shape != b.shape or not torch.allclose(a, b, atol=1e-6) for a, b in zip(ob, boxes,
                                                                                                 strict=True))),
                     "image_max_levels": float((ox - x).abs().max() * std * 255),
                     "image_share_differing": float(((ox - x).abs() * std * 255 > 0.5).float().mean())}
    return out


def _ecamp_worker(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from ecamp.train.cli import main

    rec: dict = {"lrs": [], "steps_per_epoch": None}
    out, metric = Path(spec["out"]), HEADS[spec["head"]]["metric"]
    task = ["--dataset", "phantom", "--mode", spec["mode"]] if spec["head"] == "cls" else \
        ["--head", spec["head"], "--dataset", spec.get("seg_task", "rsna") if spec["head"] == "seg" else "rsna",
         "--lists", spec["lists"]]
    if spec["head"] == "det":  # the recipe's start_eval (their run.sh's 50-100) is past this budget; both get 0
        config = out.parent / f"{out.name}-recipe.yaml"
        config.write_text("head: det\ndataset: rsna\nfraction: 100\nstart_eval: 0\n")
        task += ["--config", str(config)]
    with _record_ecamp(rec):
        rc = main(["finetune", *task, "--fraction", "100", "--data-root", spec["data"], "--output-dir", str(out),
                   "--model", spec["model"], "--authors-protocol", "--precision", "fp32", "--max-steps",
                   str(spec["steps"]), "--lr", str(spec["lr"]), "--batch-size", str(spec["batch_size"]), "--warmup",
                   str(spec["warmup"]), "--seed", str(spec["seed"]), "--num-workers", "0", "--no-progress"])
    if rc:
        return {**rec, "error": f"ecamp train finetune exited {rc}"}
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rec.update(evals=[[r["step"], r[f"val_{metric}"]] for r in rows], selected=metrics["best_step"],
               test=metrics[f"test_{metric}"])
    # ecamp's selected weights as the authors' test() reads them (their setup() for --stage test)
    best = load_file(str(out / "best" / "model.safetensors"))
    if spec["head"] in ("seg", "det"):
        riga = spec.get("seg_task") == "riga"
        to_authors = (lambda k: _seg_key_to_authors(k, riga)) if spec["head"] == "seg" else _det_key_to_authors
        best = {to_authors(k): v for k, v in best.items() if to_authors(k)}
    Path(spec["as_authors"]).mkdir(parents=True, exist_ok=True)
    torch.save(best, Path(spec["as_authors"]) / HEADS[spec["head"]]["checkpoint"])
    # the authors' selected weights, scored by ecamp's test code
    theirs = Path(spec["authors_best"])
    if theirs.is_file():
        rec["test_of_authors"] = _ecamp_test_of(spec, torch.load(theirs, map_location="cpu"))
    return rec


# -- the parent --------------------------------------------------------------------------------------------------
def _run_worker(kind: str, spec: dict, work: Path, env: dict, log: Path) -> dict:
    spec_file, result = work / f"{log.stem}.spec.json", work / f"{log.stem}.result.json"
    spec_file.write_text(json.dumps(spec))
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, str(HERE), "--worker", kind, "--spec", str(spec_file), "--result",
                            str(result)], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(work))
    if not result.is_file():
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"The {kind} process exited {p.returncode} without a result; the end of {log}:\n"
                         + "\n".join(tail))
    return json.loads(result.read_text())


def _tiny_encoder(folder: Path, img_size: int, base: str = "cxr-vit-b") -> None:
    """A randomly initialised ECAMP-style encoder at the size of :data:`TINY`, as an ecamp folder, with the
    preprocessing of ``base`` (the fundus encoder's for RIGA)."""
    import timm
    import torch

    import ecamp
    from ecamp.config import EcampCfg

    cfg = ecamp.get_pretrained_cfg(base)
    block = cfg.pop("ecamp")
    cfg["input_size"] = [3, img_size, img_size]
    for key in ("hf_hub_id", "tag"):
        cfg.pop(key, None)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg=cfg, num_classes=0,
                              global_pool="avg", fc_norm=False, img_size=img_size,
                              **{k: v for k, v in TINY.items() if k != "mlp_ratio"})
    model.ecamp_cfg = EcampCfg.from_dict(block).replace(name=None, source=None)
    ecamp.save_pretrained(model, folder, name=f"tiny-{base.split('-')[0]}")


def _vit_size(model_name: str) -> dict | None:
    """The authors' ``VisionTransformer`` arguments for the encoder, or None where it is their ViT-B/16 at 224."""
    import ecamp

    enc = ecamp.load(model_name)
    size = {"img_size": enc.patch_embed.img_size[0], "patch_size": enc.patch_embed.patch_size[0],
            "embed_dim": enc.embed_dim, "depth": len(enc.blocks), "num_heads": enc.blocks[0].attn.num_heads,
            "mlp_ratio": enc.blocks[0].mlp.fc1.out_features / enc.embed_dim}
    base = {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}
    return None if size == base else size


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) if v else "none"
    return str(v)


def _phantom(args, work: Path) -> tuple[Path, Path]:
    """The phantom films and lists (data root, the lists ecamp reads) of the head."""
    data = work / f"data-{args.head}"
    kind = "classification" if args.head == "cls" else "detection"  # RSNA segmentation reads the box lists
    if not (data / f"test_list{HEADS[args.head]['suffix']}").is_file():
        subprocess.run([sys.executable, "-m", "ecamp", "train", "phantom", "--kind", kind, "--out", str(data), "--n",
                        str(args.n), "--seed", "0", "--size", str(args.size)], check=True, stdout=subprocess.DEVNULL)
    if args.head == "det":
        _float_boxes(data)
    if args.head in ("cls", "det"):
        return data, data
    from ecamp.train.downstream.segmentation import convert_lists

    if args.seg_task == "siim":
        return _siim_phantom(data, work, args.size)
    if args.seg_task == "riga":
        riga = _riga_phantom(data, work, args.size)
        return riga, riga

    # ecamp reads converted lists (img_path, mask_path) whose masks lie under its data root: one that links the
    # films and holds the masks
    root = work / "root-seg"
    if not (root / "test_list.csv").is_file():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "images").exists():
            (root / "images").symlink_to(data / "images", target_is_directory=True)
        convert_lists("rsna", data, root, size=args.size)  # the authors' RSNA masks: the filled boxes
    return data, root


def rle_encode(mask) -> str:
    """0/1 [height, width] -> the SIIM-ACR run-length string (offsets relative to the previous run's end, counted
    down the columns, as their ``rle2mask`` and ecamp's ``rle_decode`` read it); ``"-1"`` when empty."""
    import numpy as np

    flat = np.asarray(mask).T.reshape(-1).astype(bool)
    if not flat.any():
        return "-1"
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.astype(np.int8), [0]])))
    starts, ends = edges[0::2], edges[1::2]
    out, pos = [], 0
    for a, b in zip(starts, ends, strict=True):
        out += [int(a - pos), int(b - a)]
        pos = int(b)
    return " ".join(map(str, out))


def balance_siim_rows(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep as many negatives (``"-1"``) as positives, so that the authors' unseeded
    ``np.random.choice(neg, size=n_pos, replace=False)`` (D4) takes every negative: both sides then train on the
    same images. Positives beyond the negatives are dropped too (their choice would fail without replacement)."""
    pos = [r for r in rows if r[1] != "-1"]
    neg = [r for r in rows if r[1] == "-1"]
    k = min(len(pos), len(neg))
    keep = {r[0] for r in pos[:k] + neg[:k]}
    return [r for r in rows if r[0] in keep]


def _siim_phantom(data: Path, work: Path, size: int) -> tuple[Path, Path]:
    """SIIM lists in the authors' layout from the phantom box lists: ``ImageId, EncodedPixels`` (the filled boxes
    run-length encoded, ``-1`` for none) and the films as ``train/images/1024/dicom/<ImageId>.png`` (their
    ``SIIMSegmentDataset`` opens PNGs there); ecamp reads them after ``convert_lists("siim", ...)``."""
    import csv

    from ecamp.train.downstream.segmentation import convert_lists, read_rsna_boxes

    siim = work / "data-siim"
    if not (siim / "test_list.csv").is_file():
        films = siim / "train" / "images" / "1024" / "dicom"
        films.mkdir(parents=True, exist_ok=True)
        for path in (data / f"{split}_list.csv" for split in ("train", "val", "test")):  # --data_volume 100 only
            rows = []
            for image_path, mask in read_rsna_boxes(path, size=size):
                image_id = Path(image_path).stem
                link = films / f"{image_id}.png"
                if not link.exists():
                    link.symlink_to((data / image_path).resolve())
                rows.append((image_id, rle_encode(mask)))
            if path.stem == "train_list":
                rows = balance_siim_rows(rows)
            with open(siim / path.name, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["ImageId", "EncodedPixels"])
                w.writerows(rows)
    root = work / "root-siim"
    if not (root / "test_list.csv").is_file():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "train").exists():
            (root / "train").symlink_to(siim / "train", target_is_directory=True)
        convert_lists("siim", siim, root, size=size)
    return siim, root


def riga_masks(box_mask):
    """A RIGA label map (their ``FinalLabel`` images, 8-bit grey) from a filled box: the disc (128) is the box, the
    cup (255) its middle half in each direction; an empty box gives an empty map."""
    import numpy as np

    out = np.zeros(box_mask.shape, np.uint8)
    ys, xs = np.nonzero(box_mask)
    if len(ys):
        out[box_mask > 0] = 128
        (y0, y1), (x0, x1) = (ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1)
        dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
        out[y0 + dy:y1 - dy, x0 + dx:x1 - dx] = 255
    return out


def _riga_phantom(data: Path, work: Path, size: int) -> Path:
    """RIGA lists in the authors' format (``img_path, mask_path``) from the phantom box lists: each film tinted to
    colour (RIGA's photographs are RGB; the authors normalise each channel, D7) as ``Image/<name>.png`` and its
    label map (:func:`riga_masks`) as ``FinalLabel/<name>.png``. Both sides read the same files. Films without a box
    are left out: every RIGA photograph shows its disc, and their data set keeps an empty map as ``uint8`` beside
    the float maps of the others (``my_dataset.py:341-342``), which their collate cannot stack."""
    import csv

    import numpy as np
    from PIL import Image

    from ecamp.train.downstream.segmentation import read_rsna_boxes

    riga = work / "data-riga"
    if (riga / "test_list.csv").is_file():
        return riga
    (riga / "Image").mkdir(parents=True, exist_ok=True)
    (riga / "FinalLabel").mkdir(parents=True, exist_ok=True)
    for path in (data / f"{split}_list.csv" for split in ("train", "val", "test")):  # --data_volume 100 only
        rows = []
        for image_path, box in read_rsna_boxes(path, size=size):
            if not box.any():
                continue
            name = f"{Path(image_path).stem}.png"
            grey = np.asarray(Image.open(data / image_path).convert("L"), dtype=np.float32)
            rgb = np.stack([grey, grey * 0.75, grey * 0.5], -1).round().astype(np.uint8)
            Image.fromarray(rgb).save(riga / "Image" / name)
            Image.fromarray(riga_masks(box)).save(riga / "FinalLabel" / name)
            rows.append((f"Image/{name}", f"FinalLabel/{name}"))
        with open(riga / path.name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["img_path", "mask_path"])
            w.writerows(rows)
    return riga


def seg_inputs_named(images_ok: bool, mask_pixels_differing: int, task: str) -> str | None:
    """The fidelity.md entry that names a difference of the segmentation test inputs, None if none does: images one
    8-bit level apart (D6) with identical masks; for SIIM, masks from their ``INTER_AREA`` resize of the 1024-px mask
    (``my_dataset.py:137``, fractional, then read at 0.5 by their ``get_dice``) against ecamp's nearest (#46)."""
    if not images_ok:
        return None
    if mask_pixels_differing == 0:
        return "D6"
    return "D6, #46" if task == "SIIM" else None


def _float_boxes(data: Path) -> None:
    """Write the phantom box lists with float coordinates, as the authors' published RSNA lists
    (``[[663.0, 487.0, 844.0, 764.0]]``): from integer literals their data set's ``bbox.copy()``
    (``Detection/utils/my_dataset.py:54-58``) keeps an integer array and truncates box centres to whole pixels, which
    their own lists never do. Both sides then read the same files."""
    import ast
    import csv

    for path in data.glob("*.csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["bbox"] = str([[float(v) for v in box] for box in ast.literal_eval(row["bbox"])])
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image_path", "bbox"])
            w.writeheader()
            w.writerows(rows)


def compare(args) -> int:
    spec_head = dict(HEADS[args.head])
    if args.head == "seg":
        spec_head["task"] = args.seg_task.upper()
    if args.head != "cls" and args.mode != "finetune":
        raise SystemExit("--mode linear-probe exists for --head cls only.")
    if args.head == "seg" and args.seg_task != "riga" and args.size != 1024:
        raise SystemExit("--head seg needs --size 1024: the authors' RSNA masks are 1024 x 1024 "
                         "(Segmentation/utils/my_dataset.py:237) and augmented with the image.")
    if args.head == "seg" and args.seg_task == "riga" and args.size != 224:
        raise SystemExit("--seg-task riga needs --size 224: their RIGA transform is run with the mask channel-last "
                         "(#45), which albumentations accepts only where image and mask are the same size.")
    checkout = Path(args.authors).resolve()
    script = checkout / "ECAMP" / "Fine-tuning" / spec_head["folder"] / _script_name(args.head, args.seg_task)
    if not script.is_file():
        raise SystemExit(f"{checkout} is not a checkout of ToniChopp/ECAMP (no {script.relative_to(checkout)}); "
                         f"pass the folder that holds ECAMP/.")
    import torch

    import ecamp

    args.lr = args.lr if args.lr is not None else spec_head["lr"]
    work = Path(args.work or tempfile.mkdtemp(prefix="vs-authors-ft-"))
    work.mkdir(parents=True, exist_ok=True)
    data, lists_dir = _phantom(args, work)
    model = args.model
    if model == "tiny":
        base = "fundus-vit-b" if args.head == "seg" and args.seg_task == "riga" else "cxr-vit-b"
        folder = work / f"tiny-encoder-{spec_head['img_size']}{'-fundus' if base != 'cxr-vit-b' else ''}"
        if not (folder / "config.json").is_file():
            _tiny_encoder(folder, spec_head["img_size"], base)
        model = f"local-dir:{folder}"
    vit = _vit_size(model)
    img_size = vit["img_size"] if vit else 224
    if args.head != "cls" and img_size != 224:
        raise SystemExit(f"--head {args.head}: their {'SegViT' if args.head == 'seg' else 'ModelMain'} is built at "
                         f"224 px; the encoder takes {img_size}.")
    pretrained = work / f"pretrained-{args.head}.pth"  # the encoder as the authors' setup() reads ECAMP's release
    torch.save({"model": ecamp.load(model).state_dict()}, pretrained)
    lists = {p.name: p for p in data.glob(f"*{spec_head['suffix']}")}
    n_train = sum(1 for ln in lists[f"train_list{spec_head['suffix']}"].read_text().splitlines()[
        1 if args.head != "cls" else 0:] if ln.strip())
    per_epoch = -(-n_train // args.batch_size)
    steps = args.epochs * per_epoch
    env = dict(os.environ)
    authors_env = dict(env)
    if args.authors_pythonpath:
        authors_env["PYTHONPATH"] = os.pathsep.join([args.authors_pythonpath, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    runs = []
    for seed in args.seeds:
        tag = f"{args.head}-{args.mode}-s{seed}" if args.head != "seg" else f"seg-{args.seg_task}-s{seed}"
        cwd = work / f"authors-{tag}"
        shutil.rmtree(cwd, ignore_errors=True)
        list_dir = cwd / LIST_DIR[args.head].format(task=spec_head["task"])
        list_dir.mkdir(parents=True)
        for name, path in lists.items():
            shutil.copy(path, list_dir / name)
        out = cwd / "output"
        argv = ["--name", "ecamp", "--stage", "train", "--model", "vit_base_patch16", "--task", spec_head["task"],
                "--pretrained_path", str(pretrained), "--dataset_path", str(data), "--output_dir", str(out),
                "--data_volume", "100", "--num_steps", str(steps), "--img_size", str(img_size), "--learning_rate",
                str(args.lr), "--warmup_steps", str(args.warmup), "--train_batch_size", str(args.batch_size),
                "--seed", str(seed)]
        if args.head == "cls":
            argv += ["--num_classes", "4", "--eval_batch_size", "64"]
            argv += ["--mode", "LinearProbe"] if args.mode == "linear-probe" else []
        else:  # their run.sh passes --weight_decay 0.05 (also their default)
            argv += ["--eval_batch_size", "16", "--weight_decay", "0.05"]
            argv += ["--start_eval", "0"] if args.head == "det" else []
        base = {"authors": str(checkout), "head": args.head, "vit": vit, "multilabel": True,
                "seg_task": args.seg_task}
        inputs = work / f"authors-test-inputs-{tag}.pt"
        theirs = _run_worker("authors", {**base, "cwd": str(cwd), "argv": argv, "dump_inputs": str(inputs)}, work,
                             authors_env, work / f"authors-{tag}.log")
        as_authors = work / f"ecamp-weights-{tag}"
        ours = _run_worker("ecamp", {"head": args.head, "seg_task": args.seg_task,
                                     "data": str(data if args.head == "cls" else lists_dir),
                                     "lists": str(lists_dir), "model": model,
                                     "mode": args.mode, "steps": steps, "lr": args.lr, "batch_size": args.batch_size,
                                     "warmup": args.warmup, "seed": seed, "out": str(work / f"ecamp-{tag}"),
                                     "as_authors": str(as_authors), "authors_best": str(out / spec_head["checkpoint"]),
                                     "authors_inputs": str(inputs)},
                           work, env, work / f"ecamp-{tag}.log")
        test_argv = [a if a != "train" else "test" for a in argv]
        test_argv[test_argv.index("--output_dir") + 1] = str(as_authors)
        cross = _run_worker("authors", {**base, "cwd": str(cwd), "argv": test_argv}, work, authors_env,
                            work / f"authors-test-{tag}.log")
        runs.append((seed, theirs, ours, cross))
    return _report(args, runs, vit, n_train, steps, per_epoch, work)


def _report(args, runs, vit, n_train, steps, per_epoch, work: Path) -> int:
    from ecamp.train.downstream.loop import replay_selection
    from ecamp.train.downstream.protocol import resolve_protocol

    spec_head = dict(HEADS[args.head], task=args.seg_task.upper()) if args.head == "seg" else HEADS[args.head]
    metric, name = spec_head["metric"], {"auroc": "AUROC", "dice": "Dice", "map": "mAP"}[spec_head["metric"]]
    # Classification/train.py:427, Segmentation/train.py:416, Detection/train.py:511
    patience = {"cls": 20, "seg": 40, "det": 20}[args.head]
    proto = resolve_protocol({"precision": "fp32"}, True, metric)
    script = f"{spec_head['folder']}/{_script_name(args.head, args.seg_task if args.head == 'seg' else None)}"
    print(f"ecamp train finetune --authors-protocol vs the authors' {script}; {datetime.date.today()}")
    lists_kind = {"SIIM": "the RLE lists", "RIGA": "the image and label-map lists"}.get(spec_head["task"],
                                                                                      "the box lists")
    what = f"mode {args.mode}" if args.head == "cls" else f"task {spec_head['task']} ({lists_kind})"
    what += ", start_eval 0 on both sides" if args.head == "det" else ""
    print(f"head {args.head}, {what}, model {args.model}{f' {vit}' if vit else ''}, phantom n={args.n} at "
          f"{args.size} px ({n_train} training images), batch {args.batch_size}, lr {args.lr}, warm-up "
          f"{args.warmup}, {args.epochs} epochs = {steps} steps, fp32 on the CPU, seeds {args.seeds}")
    changes = list(dict.fromkeys(c for run in runs for rec in (run[1], run[3]) for c in rec.get("changes", [])))
    print("Run-time changes to the authors' code (their files are not edited):")
    for c in changes or ["none"]:
        print(f"  - {c}")
    rows, failures = [], []

    def row(item, theirs, ours, same, note=""):
        rows.append((item, _fmt(theirs), _fmt(ours), "yes" if same is True else ("no" if same is False else same),
                     note))
        if same is False:
            failures.append(item)

    tol = 1e-6
    for seed, theirs, ours, cross in runs:
        for side, rec in (("authors", theirs), ("ecamp", ours), ("authors test()", cross)):
            if rec.get("error"):
                row(f"seed {seed}: {side} run", rec["error"], "", False)
        row(f"seed {seed}: steps per epoch", theirs.get("steps_per_epoch"), ours.get("steps_per_epoch"),
            theirs.get("steps_per_epoch") == ours.get("steps_per_epoch") == per_epoch)
        la, le = theirs.get("lrs", []), ours.get("lrs", [])
        diff = [i + 1 for i, (a, b) in enumerate(zip(la, le, strict=False)) if a != b]
        row(f"seed {seed}: LR at every step ({len(la)} / {len(le)} steps)",
            f"steps 1-{min(len(la), 5)}: {_fmt(la[:5])}", "bit for bit" if not diff and len(la) == len(le) else
            f"differs at steps {diff[:5]}", not diff and len(la) == len(le) == steps)
        ea, ee = [s for s, _ in theirs.get("evals", [])], [s for s, _ in ours.get("evals", [])]
        row(f"seed {seed}: evaluation points", ea, ee, ea == ee)
        scores = [v for _, v in theirs.get("evals", [])]
        picked, ran = replay_selection(scores, proto, patience)
        replayed = ea[picked] if picked is not None else None
        their_pick = theirs["saves"][-1] if theirs.get("saves") else None
        row(f"seed {seed}: selected step", their_pick, ours.get("selected"), replayed == their_pick and ran == len(ea),
            f"ecamp's rule on their validation scores {_fmt(scores)}: step {_fmt(replayed)}")
        scored = ours.get("test_of_authors") or {}
        ta, te = theirs.get("test"), scored.get("own_inputs")
        # D6: their cv2 INTER_LINEAR on 8-bit images (11-bit fixed-point weights) against ecamp's linear-uint8
        # (bilinear, no antialias, rounded to 8 bits) may differ by one level; masks must agree exactly
        named = None
        if "inputs" in scored and args.head == "det":
            d = scored["inputs"]
            ok = d["boxes_differing"] == 0 and d["image_max_levels"] <= 1.0 + 1e-3
            row(f"seed {seed}: test inputs (their data set / ecamp's)", "images, boxes",
                f"{100 * d['image_share_differing']:.1f} % of pixels 1 level apart (max {d['image_max_levels']:.3g}), "
                f"boxes {'identical' if not d['boxes_differing'] else 'differ'}", "D6" if ok else False,
                "float box lists, as theirs")
            named = "D6" if ok else None
            tt = scored.get("their_inputs")
            row(f"seed {seed}: test {name} of the authors' weights on their test tensors", ta, tt,
                ta is not None and tt is not None and abs(ta - tt) <= tol, "their test() / ecamp's model and score")
            nms = scored["nms"]
            row(f"seed {seed}: NMS on their decoded test boxes ({nms['calls']} batches, {nms['kept']} kept)",
                "their non_max_suppression", "ecamp's: the same boxes and scores" if nms["same"] else "differs",
                nms["same"], "D10: nms_iou_plus_one; tied scores may come in another order (their unstable sort)")
            dd = scored.get("decoded_max_diff")
            row(f"seed {seed}: decoded boxes on their test tensors (max abs difference, px)", "", dd,
                dd is not None and dd <= 1e-3, "ecamp's model and decode / their ModelMain and YOLOLoss")
            mp = scored.get("metric_on_their_predictions")
            row(f"seed {seed}: mAP of their test predictions ({scored.get('images_scored')} images)", ta, mp,
                ta is not None and mp is not None and abs(ta - mp) <= tol,
                "their torchmetrics 0.7.2 / ecamp's torchmetrics")
        elif "inputs" in scored:
            d = scored["inputs"]
            ok = d["image_max_levels"] <= 1.0 + 1e-3
            # no resize on either side (RIGA at --img_size): images equal but for float rounding, nothing to name
            exact = d["image_max_levels"] < 0.5 and not d["mask_pixels_differing"]
            named = None if exact else seg_inputs_named(ok, d["mask_pixels_differing"], spec_head["task"])
            images = (f"images equal to float rounding (max {d['image_max_levels']:.3g} levels)" if exact else
                      f"{100 * d['image_share_differing']:.1f} % of pixels 1 level apart "
                      f"(max {d['image_max_levels']:.3g})")
            row(f"seed {seed}: test inputs (their data set / ecamp's)", "images, masks",
                f"{images}, masks {'identical' if not d['mask_pixels_differing'] else 'differ'}",
                True if exact else (named or False),
                "SIIM masks: their INTER_AREA 1024 -> 224 (at 0.5) / ecamp's nearest" if d["mask_pixels_differing"]
                else "")
            tt = scored.get("their_inputs")
            row(f"seed {seed}: test {name} of the authors' weights on their test tensors", ta, tt,
                ta is not None and tt is not None and abs(ta - tt) <= tol, "their test() / ecamp's model and score")

        def agree(a, b, named=named):
            if a is None or b is None:
                return False
            return True if abs(a - b) <= tol else (named or False)

        row(f"seed {seed}: test {name} of the authors' weights", ta, te, agree(ta, te),
            "their test() / ecamp's test code")
        ca, ce = cross.get("test"), ours.get("test")
        same = agree(ca, ce) if not cross.get("missing_keys") else False
        row(f"seed {seed}: test {name} of ecamp's weights", ca, ce, same,
            "their test() / ecamp's" + (f"; keys missing: {cross['missing_keys']}" if cross.get("missing_keys")
                                        else ""))
    for seed, theirs, ours, _ in runs:
        row(f"seed {seed}: end-to-end test {name}", theirs.get("test"), ours.get("test"), "-",
            "each side's own run (random streams differ)")
    head = ("item", "authors", "ecamp --authors-protocol", "same")
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, width, strict=True)) + "  note")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], width, strict=True)) + (f"  {r[4]}" if r[4] else ""))
    print(f"LR by step (seed {runs[0][0]}): step, authors, ecamp")
    la, le = runs[0][1].get("lrs", []), runs[0][2].get("lrs", [])
    for i in range(max(len(la), len(le))):
        print(f"  {i + 1:>3} {_fmt(la[i] if i < len(la) else None):>12} {_fmt(le[i] if i < len(le) else None):>12}")
    print(f"logs and outputs: {work}")
    if failures:
        print(f"{len(failures)} difference(s) that docs/fidelity.md does not name: {failures}")
        return 1
    print("no difference beyond those docs/fidelity.md names")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors", required=False, metavar="CHECKOUT", help="a ToniChopp/ECAMP checkout (holds ECAMP/)")
    p.add_argument("--authors-pythonpath", default=None, metavar="DIR",
                   help="put DIR (their pinned timm 0.4.12, scikit-learn 1.3.2, numpy 1.24...) first on the "
                        "authors' process's path")
    p.add_argument("--head", choices=("cls", "seg", "det"), default="cls")
    p.add_argument("--mode", choices=("finetune", "linear-probe"), default="finetune")
    p.add_argument("--seg-task", choices=("rsna", "siim", "riga"), default="rsna",
                   help="--head seg: the authors' train.py --task RSNA (box lists) or SIIM (RLE lists), or "
                        "train_RIGA.py (image and label-map lists)")
    p.add_argument("--model", default="tiny", help="tiny (written here, random weights) or an ecamp model name")
    p.add_argument("--n", type=int, default=80, help="phantom films (20 %% test, 10 %% validation)")
    p.add_argument("--size", type=int, default=None,
                   help="phantom film side in pixels (default: 96; seg 1024, det 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default: 3e-2 cls, 5e-4 seg and det")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one, kept)")
    p.add_argument("--worker", default=None, choices=["authors", "ecamp"], help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        rec = _authors_worker(spec) if args.worker == "authors" else _ecamp_worker(spec)
        Path(args.result).write_text(json.dumps(rec))
        return
    if not args.authors:
        p.error("--authors CHECKOUT is required")
    args.size = args.size or {"cls": 96, "seg": 224 if args.seg_task == "riga" else 1024, "det": 256}[args.head]
    sys.exit(compare(args))


if __name__ == "__main__":
    main()
