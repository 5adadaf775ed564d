"""Calibration and operating points of a fine-tuned classifier, fitted on its validation split.

After training, :func:`fit` takes the best model's validation logits and finds a
:class:`~ecamp.config.Calibration` (one temperature for a softmax head; per label Platt's scale and bias, or a
temperature, for a sigmoid head) by minimising the negative log-likelihood (Platt's: against his smoothed
targets, which keep two parameters from over-fitting a small validation split), then per-label
:class:`~ecamp.config.OperatingPoints` by a rule: Youden's J (the default), a minimum sensitivity or a minimum
specificity, each on the validation ROC curve. :func:`report` scores both on any split: expected calibration
error (torchmetrics, 15 equal-width bins; multi-label: the mean over labels) and the Brier score before and
after calibration, and
sensitivity and specificity at the operating points. The model folder keeps the fitted values
(:mod:`ecamp.calibration` applies them); the test split is never used to fit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecamp.calibration import activate, probabilities
from ecamp.config import Calibration, OperatingPoints
from ecamp.errors import InvalidArgumentError

__all__ = ["CALIBRATION_CHOICES", "parse_rule", "fit_calibration", "fit_operating_points", "fit", "report",
           "Fitted", "reliability_diagram", "N_BINS"]

logger = logging.getLogger("ecamp")

CALIBRATION_CHOICES = ("auto", "temperature", "platt", "none")
N_BINS = 15  # equal-width bins of the expected calibration error (torchmetrics' default)
_LOG_SCALE = 6.0  # the fitted scale stays in [e^-6, e^6]: a temperature between 0.0025 and 400


def parse_rule(text: str) -> tuple[str, float | None]:
    """``"youden"``, ``"sensitivity=0.9"`` or ``"specificity=0.95"`` -> (kind, target)."""
    text = str(text).strip().lower()
    if text == "youden":
        return "youden", None
    kind, _, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if kind not in ("sensitivity", "specificity") or not 0 < target <= 1:
        raise InvalidArgumentError(f"--operating-point {text!r}: use youden, sensitivity=X or specificity=X with X in "
                                   f"(0, 1], e.g. sensitivity=0.9.")
    return kind, target


def _one_hot(targets: np.ndarray, multilabel: bool, n: int) -> np.ndarray:
    """Targets as 0/1 ``[N, C]`` (a multi-class target is its class index ``[N, 1]``)."""
    if multilabel:
        return targets.astype(np.float64)
    return np.eye(n)[targets[:, 0].astype(int)]


def _defined(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def _minimise(loss, x0: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    bounds = [(-_LOG_SCALE, _LOG_SCALE)] + [(-50.0, 50.0)] * (len(x0) - 1)
    return minimize(loss, x0, method="L-BFGS-B", jac=True, bounds=bounds).x


def _nll(z: torch.Tensor, y: torch.Tensor, softmax: bool, platt: bool):
    """The loss and gradient of ``(log scale[, bias])`` as numpy, for scipy."""
    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        p = torch.tensor(params, dtype=torch.float64, requires_grad=True)
        scaled = z * p[0].exp() + (p[1] if platt else 0.0)
        if softmax:
            value = torch.nn.functional.cross_entropy(scaled, y.argmax(1))
        else:
            value = torch.nn.functional.binary_cross_entropy_with_logits(scaled, y)
        value.backward()
        return float(value.detach()), p.grad.numpy().copy()
    return loss


def fit_calibration(logits: np.ndarray, targets: np.ndarray, *, multilabel: bool, method: str = "auto"
                    ) -> Calibration | None:
    """The calibration of ``logits`` ``[N, C]`` against ``targets`` (``[N, C]`` 0/1, or ``[N, 1]`` class indices)
    minimising the negative log-likelihood; ``method`` ``"auto"`` is a temperature for a softmax head and Platt's
    scaling per label for a sigmoid head, ``"none"`` returns None. A label with no positive or no negative keeps
    its logits (scale 1, bias 0)."""
    if method not in CALIBRATION_CHOICES:
        raise InvalidArgumentError(f"--calibration {method!r}: use one of {CALIBRATION_CHOICES}.")
    if method == "none":
        return None
    if method == "auto":
        method = "platt" if multilabel else "temperature"
    if method == "platt" and not multilabel:
        raise InvalidArgumentError("--calibration platt is for multi-label (sigmoid) heads; a softmax head takes "
                                   "one temperature (--calibration temperature or auto).")
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(_one_hot(np.asarray(targets), multilabel, z.shape[1]))
    if not multilabel:
        (log_s,) = _minimise(_nll(z, y, True, False), np.zeros(1))
        return Calibration("temperature", (math.exp(log_s),), (0.0,), n=len(z))
    platt = method == "platt"
    scale, bias = [], []
    for c in range(z.shape[1]):
        if not _defined(y[:, c].numpy()):
            logger.warning("Calibration: label %d has no positive or no negative in the validation split; its "
                           "probabilities are left uncalibrated.", c)
            scale.append(1.0)
            bias.append(0.0)
            continue
        target = y[:, c]
        if platt:  # Platt's (1999) targets for small sets: (N+ + 1) / (N+ + 2) and 1 / (N- + 2), not 1 and 0
            pos = float(target.sum())
            target = torch.where(target > 0, (pos + 1) / (pos + 2), 1 / (len(target) - pos + 2))
        # Platt fits a * (z - m) + b, centred on the label's mean logit m (the optimiser's bounds then hold for
        # any offset of the logits); stored as scale a, bias b - a * m
        m = float(z[:, c].mean()) if platt else 0.0
        params = _minimise(_nll(z[:, c] - m, target, False, platt), np.zeros(2 if platt else 1))
        scale.append(math.exp(params[0]))
        bias.append(float(params[1]) - scale[-1] * m if platt else 0.0)
    return Calibration(method, tuple(scale), tuple(bias), n=len(z))


def _threshold(scores: np.ndarray, y: np.ndarray, kind: str, target: float | None) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, scores, drop_intermediate=False)
    if kind == "youden":
        i = int(np.argmax(tpr - fpr))  # the first maximum: the highest threshold of the best J
    elif kind == "sensitivity":
        i = int(np.argmax(tpr >= target - 1e-12))  # the highest threshold that reaches the sensitivity
    else:
        i = int(np.nonzero(1 - fpr >= target - 1e-12)[0][-1])  # the lowest threshold that keeps the specificity
    if not np.isfinite(thr[i]):  # scikit-learn's "nothing positive" point: just above every score
        return float(np.nextafter(scores.max(), np.inf))
    return float(thr[i])


def fit_operating_points(probs: np.ndarray, targets: np.ndarray, *, multilabel: bool, rule: str = "youden"
                         ) -> tuple[float, ...]:
    """Per label, the probability threshold ``rule`` picks on the ROC curve of ``probs`` ``[N, C]`` (multi-class:
    one label against the rest). A label with no positive or no negative gets 0.5 (logged)."""
    kind, target = parse_rule(rule)
    y = _one_hot(np.asarray(targets), multilabel, probs.shape[1])
    out = []
    for c in range(probs.shape[1]):
        if not _defined(y[:, c]):
            logger.warning("Operating points: label %d has no positive or no negative in the validation split; its "
                           "threshold is 0.5.", c)
            out.append(0.5)
            continue
        out.append(_threshold(probs[:, c].astype(np.float64), y[:, c], kind, target))
    return tuple(out)


@dataclass(frozen=True)
class Fitted:
    calibration: Calibration | None
    points: OperatingPoints


def fit(logits: np.ndarray, targets: np.ndarray, *, multilabel: bool, method: str = "auto",
        rule: str = "youden") -> Fitted:
    """:func:`fit_calibration`, then :func:`fit_operating_points` on the calibrated and on the raw probabilities."""
    activation = "sigmoid" if multilabel else "softmax"
    cal = fit_calibration(logits, targets, multilabel=multilabel, method=method)
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    raw = activate(z, activation).numpy()
    calibrated = probabilities(z, activation, cal).numpy()
    points = OperatingPoints(rule.strip().lower(), fit_operating_points(calibrated, targets, multilabel=multilabel,
                                                                       rule=rule),
                             fit_operating_points(raw, targets, multilabel=multilabel, rule=rule))
    return Fitted(cal, points)


def _ece(probs: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    p = torch.as_tensor(probs, dtype=torch.float32)
    if not multilabel:
        return float(multiclass_calibration_error(p, torch.as_tensor(y.argmax(1)), num_classes=p.shape[1],
                                                  n_bins=N_BINS))
    return float(np.mean([float(binary_calibration_error(p[:, c].contiguous(), torch.as_tensor(y[:, c]).long(),
                                                                   n_bins=N_BINS))
                          for c in range(p.shape[1])]))


def _brier(probs: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    """The Brier score: the mean squared error of the probabilities (multi-class: summed over classes)."""
    sq = (probs.astype(np.float64) - y) ** 2
    return float(sq.mean() if multilabel else sq.sum(1).mean())


def report(fitted: Fitted, logits: np.ndarray, targets: np.ndarray, *, multilabel: bool, labels: list[str]
           ) -> dict[str, Any]:
    """On one split: ECE and the Brier score before and after calibration, and per label the sensitivity and
    specificity at the operating point (None where the split has no positive, or no negative). ECE is what users
    ask for; it is not a proper scoring rule (a model that gives every film the base rate scores well), so the
    Brier score, which is, stands beside it."""
    activation = "sigmoid" if multilabel else "softmax"
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    raw = activate(z, activation).numpy()
    cal = probabilities(z, activation, fitted.calibration).numpy()
    y = _one_hot(np.asarray(targets), multilabel, z.shape[1])
    decided = cal >= np.asarray(fitted.points.thresholds)
    per = {}
    for c, name in enumerate(labels):
        pos, neg = y[:, c] == 1, y[:, c] == 0
        per[name] = {"threshold": fitted.points.thresholds[c],
                     "sensitivity": float(decided[pos, c].mean()) if pos.any() else None,
                     "specificity": float((~decided[neg, c]).mean()) if neg.any() else None}
    return {"ece_before": _ece(raw, y, multilabel), "ece_after": _ece(cal, y, multilabel),
            "brier_before": _brier(raw, y, multilabel), "brier_after": _brier(cal, y, multilabel), "per_label": per}


def _curve(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean confidence, observed frequency and count per bin of flattened probabilities."""
    bins = np.minimum((probs * N_BINS).astype(int), N_BINS - 1)
    count = np.bincount(bins, minlength=N_BINS)
    conf = np.bincount(bins, probs, minlength=N_BINS)
    freq = np.bincount(bins, y, minlength=N_BINS)
    keep = count > 0
    return conf[keep] / count[keep], freq[keep] / count[keep], count[keep]


def reliability_diagram(out: str | Path, fitted: Fitted, logits: np.ndarray, targets: np.ndarray, *,
                        multilabel: bool, split: str, title: str = "") -> Path:
    """A PNG of observed frequency against predicted probability on ``split``, before and after calibration
    (every label's probabilities pooled for a sigmoid head; the top class's for a softmax head), with the ECE of
    each in the legend (needs matplotlib: the ``plot`` extra)."""
    from ecamp.maps import new_figure, save_figure

    activation = "sigmoid" if multilabel else "softmax"
    z = torch.as_tensor(np.asarray(logits, dtype=np.float32))
    y = _one_hot(np.asarray(targets), multilabel, z.shape[1])
    fig = new_figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
    for name, cal, colour in (("uncalibrated", None, "tab:red"), ("calibrated", fitted.calibration, "tab:blue")):
        if name == "calibrated" and cal is None:
            continue
        p = probabilities(z, activation, cal).numpy()
        ece = _ece(p, y, multilabel)
        if multilabel:
            flat_p, flat_y = p.ravel(), y.ravel()
        else:
            top = p.argmax(1)
            flat_p, flat_y = p[np.arange(len(p)), top], y[np.arange(len(p)), top]
        conf, freq, _ = _curve(flat_p.astype(np.float64), flat_y)
        ax.plot(conf, freq, marker="o", ms=4, color=colour, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability" + (" (top class)" if not multilabel else " (all labels)"))
    ax.set_ylabel("observed frequency")
    ax.set_title(title or f"Reliability on the {split} split ({len(z)} images, {N_BINS} bins)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def _logits(net: torch.nn.Module, batch: Any, device: torch.device) -> list:
    x, y = batch
    return list(zip(net(x.to(device)).float().cpu(), y, strict=True))


def _stack(entries: list) -> tuple[np.ndarray, np.ndarray]:
    return torch.stack([z for z, _ in entries]).numpy(), torch.stack([y for _, y in entries]).numpy()


def finish_classifier(head: Any, model: torch.nn.Module, run: Any, outputs: Any, summary: dict[str, Any],
                      output_dir: Path) -> dict[str, Any]:
    """:meth:`ClassificationTask.finish`: fit on the validation logits of the best weights, score on validation
    and test, rewrite ``best/`` with the fitted values, and write ``reliability.png`` and ``report.md``."""
    from ecamp.errors import MissingDependencyError
    from ecamp.fileio import atomic_folder, atomic_write

    task, labels = head.task, head.labels
    val_z, val_y = _stack(outputs("val", _logits))
    test_z, test_y = _stack(outputs("test", _logits))
    fitted = fit(val_z, val_y, multilabel=task.multilabel, method=head.calibration, rule=head.operating_point)
    scores = {s: report(fitted, z, y, multilabel=task.multilabel, labels=labels)
              for s, (z, y) in (("val", (val_z, val_y)), ("test", (test_z, test_y)))}
    cal = fitted.calibration
    fields = {
        "calibration": {"method": cal.method if cal else "none", "fitted_on": f"val ({len(val_z)} images)",
                        **{f"{s}_{m}_{w}": scores[s][f"{m}_{w}"] for s in scores for m in ("ece", "brier")
                           for w in ("before", "after")}},
        "operating_points": {"rule": fitted.points.rule, "labels": {
            name: {"threshold": scores["val"]["per_label"][name]["threshold"],
                   **{f"{s}_{m}": scores[s]["per_label"][name][m] for s in scores
                      for m in ("sensitivity", "specificity")}} for name in labels}}}
    head.block = head.block.replace(calibration=cal, operating_points=fitted.points)
    if not run.runtime.main:
        return fields
    metric = head.metric
    info = {"step": summary["best_step"], f"val_{metric}": summary[f"val_{metric}"]}
    atomic_folder(output_dir / "best", lambda tmp: head.export(model, tmp, info))
    picture = None
    try:
        picture = reliability_diagram(output_dir / "reliability.png", fitted, test_z, test_y,
                                      multilabel=task.multilabel, split="test")
    except MissingDependencyError as e:
        logger.warning("No reliability diagram: %s", e)
    text = _report_text(head, fields, summary, picture)
    atomic_write(output_dir / "report.md", lambda p: p.write_text(text, encoding="utf-8"))
    return fields


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _report_text(head: Any, fields: dict[str, Any], summary: dict[str, Any], picture: Path | None) -> str:
    c, ops = fields["calibration"], fields["operating_points"]
    lines = [f"# {head.desc}", "",
             f"Best validation {head.metric}: {summary[f'val_{head.metric}']:.4f} (step {summary['best_step']}); "
             f"the test scores are in metrics.json.", "",
             f"## Calibration: {c['method']}, fitted on {c['fitted_on']}", "",
             "| split | ECE before | ECE after | Brier before | Brier after |", "|---|---|---|---|---|",
             *(f"| {s} | {_fmt(c[f'{s}_ece_before'])} | {_fmt(c[f'{s}_ece_after'])} | "
               f"{_fmt(c[f'{s}_brier_before'])} | {_fmt(c[f'{s}_brier_after'])} |" for s in ("val", "test")),
             "", f"## Operating points: {ops['rule']} (fitted on val; thresholds on calibrated probabilities)", "",
             "| label | threshold | val sensitivity | val specificity | test sensitivity | test specificity |",
             "|---|---|---|---|---|---|"]
    for name, v in ops["labels"].items():
        lines.append(f"| {name} | {v['threshold']:.4f} | {_fmt(v['val_sensitivity'])} | "
                     f"{_fmt(v['val_specificity'])} | {_fmt(v['test_sensitivity'])} | {_fmt(v['test_specificity'])} |")
    if picture is not None:
        lines += ["", f"![Reliability on the test split]({picture.name})"]
    return "\n".join(lines) + "\n"
