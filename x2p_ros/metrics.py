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
