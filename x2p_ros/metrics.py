"""The paper's metrics: PCL at thresholds, mean position error (MPE), and the
normalised area under the PCL curve between two thresholds (AUC). A ground-truth
vertebra without a prediction is a miss at every threshold (error = inf)."""
from __future__ import annotations

import numpy as np


def match_errors(pred, pred_present, gt) -> np.ndarray:
    """Error of each ground-truth point (M, D) against the prediction with the same
    index (N, D); inf where there is none or it is not present."""
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    present = np.asarray(pred_present, dtype=bool)
    errors = np.full(len(gt), np.inf)
    n = min(len(gt), len(pred))
    err = np.linalg.norm(pred[:n] - gt[:n], axis=-1)
    errors[:n] = np.where(present[:n], err, np.inf)
    return errors


def identity_swaps(pred, pred_present, gt) -> int:
    """Present predictions nearer to another ground-truth vertebra than to their
    own index's: the chain has taken one vertebra for another."""
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)[:len(gt)]
    present = np.asarray(pred_present, dtype=bool)[:len(gt)]
    if not len(pred):
        return 0
    nearest = np.linalg.norm(pred[:, None] - gt[None], axis=-1).argmin(axis=1)  # (N,)
    return int(np.sum(present & (nearest != np.arange(len(pred)))))


def spurious(pred_present, n_gt: int) -> int:
    """Present predictions past the ground truth's last vertebra: poses of vertebrae that are not there.
    PCL and MPE never see them, so that a lower presence threshold would look better on them alone."""
    present = np.asarray(pred_present, dtype=bool)
    return int(np.sum(present[n_gt:]))


def steps(pred, pred_present, gt) -> tuple[np.ndarray, np.ndarray]:
    """The true and the predicted distance from each vertebra to the next one below, for every pair of
    consecutive indices whose two predictions are present: whether a model reads the spacing of the
    vertebrae from the images or steps by a spacing it has learnt, whatever the anatomy."""
    n = min(len(gt), len(pred))
    if n < 2:
        return np.zeros(0), np.zeros(0)
    gt, pred = np.asarray(gt, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    present = np.asarray(pred_present, dtype=bool)[:n]
    both = present[:-1] & present[1:]  # (n - 1,)
    true = np.linalg.norm(np.diff(gt[:n], axis=0), axis=-1)
    predicted = np.linalg.norm(np.diff(pred[:n], axis=0), axis=-1)
    return true[both], predicted[both]


def step_summary(true, predicted, unit: str = "mm") -> dict:
    """How the predicted steps follow the true ones: their means, the mean absolute difference (keys
    true_UNIT, predicted_UNIT, error_UNIT: mm in 3D, px for heatmap peaks), and the least-squares slope and
    the correlation of predicted on true (slope 1 and correlation 1: the spacing is read; slope 0: every step
    is the same whatever the anatomy). NaN where there are too few steps."""
    true, predicted = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    out = {"n": int(true.size), f"true_{unit}": float("nan"), f"predicted_{unit}": float("nan"),
           f"error_{unit}": float("nan"), "slope": float("nan"), "correlation": float("nan")}
    if true.size:
        out.update({f"true_{unit}": float(true.mean()), f"predicted_{unit}": float(predicted.mean()),
                    f"error_{unit}": float(np.abs(predicted - true).mean())})
    if true.size >= 2 and np.ptp(true) > 0:
        dt, dp = true - true.mean(), predicted - predicted.mean()
        out["slope"] = float((dt * dp).sum() / (dt * dt).sum())
        if np.ptp(predicted) > 0:
            out["correlation"] = float((dt * dp).sum() / np.sqrt((dt * dt).sum() * (dp * dp).sum()))
    return out


def pcl(errors, threshold: float) -> float:
    errors = np.asarray(errors, dtype=np.float64)
    return float(np.mean(errors <= threshold)) if errors.size else float("nan")


def mpe(errors) -> float:
    """Mean error over the ground truth that has a prediction."""
    errors = np.asarray(errors, dtype=np.float64)
    found = errors[np.isfinite(errors)]
    return float(found.mean()) if found.size else float("nan")


def auc(errors, low: float = 10.0, high: float = 50.0) -> float:
    """(1 / (high - low)) * integral of PCL(t) dt over [low, high], exactly: each
    point contributes the length of [max(e, low), high]."""
    errors = np.asarray(errors, dtype=np.float64)
    if not errors.size:
        return float("nan")
    return float(np.mean(np.clip(high - np.maximum(errors, low), 0.0, high - low)) / (high - low))


def summary(errors, thresholds=(10.0, 20.0), auc_range=(10.0, 50.0)) -> dict:
    errors = np.asarray(errors, dtype=np.float64)
    out = {f"pcl@{t:g}": pcl(errors, t) for t in thresholds}
    out.update(mpe=mpe(errors), auc=auc(errors, *auc_range), n=int(errors.size),
               missed=int(np.sum(~np.isfinite(errors))))
    return out
