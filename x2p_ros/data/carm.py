"""A C-arm's image chain, from the material line integrals of x2p_ros/data/drr.py
to the image a C-arm hands over (bone bright, docs/design.md section 4).

In the order the physics happens: a tube spectrum (kVp and filtration), the
polychromatic primary (beam hardening comes with it), scatter, the image
intensifier's vignetting, focal-spot and detector blur, quantum (Poisson) and
electronic (Gaussian) noise, the log transform, and the vendor's
post-processing: edge enhancement, windowing with a gamma LUT, the round field
of an image intensifier or collimator shutters, 8- or 16-bit output. Every
setting is drawn per image by `Look.sample`, so that a model cannot rely on one
look.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from . import drr

SPECTRUM_BIN_KEV = 5.0


def spectrum(kvp: float, filtration_mm_al: float) -> tuple[np.ndarray, np.ndarray]:
    """(energies keV, weights summing to 1) of what an energy-integrating detector
    records from a tungsten tube: Kramers' bremsstrahlung (photons per keV in
    proportion to (kVp - E) / E) through the filtration, each photon counted by its energy."""
    if not 40.0 <= kvp <= 150.0:
        raise ValueError(f"tube voltage must be 40 to 150 kVp, got {kvp}")
    energies = np.arange(15.0 + SPECTRUM_BIN_KEV / 2, kvp, SPECTRUM_BIN_KEV)
    photons = (kvp - energies) / energies
    photons *= np.exp(-drr.mass_attenuation(drr.MU_RHO_AL, energies) * drr.RHO_AL * filtration_mm_al / 10.0)
    weights = photons * energies
    return energies, weights / weights.sum()


def primary(lines: torch.Tensor, kvp: float, filtration_mm_al: float) -> np.ndarray:
    """Primary intensity (1 in air), float64 (H, W), of the material line integrals (2, H, W) in mm."""
    energies, weights = spectrum(kvp, filtration_mm_al)
    mu = torch.as_tensor(drr.mu_per_mm(energies), dtype=lines.dtype, device=lines.device)  # (2, E)
    exponent = torch.einsum("me,mhw->ehw", mu, lines)  # (E, H, W)
    weights_t = torch.as_tensor(weights, dtype=lines.dtype, device=lines.device)
    return torch.einsum("e,ehw->hw", weights_t, torch.exp(-exponent)).cpu().numpy().astype(np.float64)


@dataclass
class Look:
    """Everything random about one image's acquisition and display."""
    kvp: float = 80.0
    filtration_mm_al: float = 3.5
    photons: float = 2000.0  # per pixel behind the patient at the field's centre (automatic exposure control)
    electronic_noise: float = 2.0  # standard deviation, in photons per pixel
    scatter: float = 0.05  # scatter-to-primary ratio, in air
    blur_px: float = 0.5  # focal spot and detector (Gaussian sigma)
    intensifier: bool = False  # round field with vignetting (else a flat panel)
    field_radius: float = 0.7  # of the image's side, from its centre
    vignetting: float = 0.0  # intensity lost at the field's edge
    shutters: tuple[float, float] = (0.0, 0.0)  # collimator blades: share of the width hidden left, right
    dark_surround: bool = True  # where nothing is exposed, the display is black (else white)
    edge_gain: float = 0.0  # unsharp masking
    edge_sigma_px: float = 8.0
    gamma: float = 1.0
    window: tuple[float, float] = (0.5, 99.5)  # percentiles of the exposed field mapped to black and white
    bits: int = 16

    @classmethod
    def sample(cls, rng: np.random.Generator, size: int, photons=(300.0, 2e4), scatter=(0.0, 0.3)) -> "Look":
        px = size / 512.0  # settings are drawn for a 512 x 512 detector and scaled (a smaller image bins pixels)
        intensifier = bool(rng.random() < 0.5)
        shutters = tuple(float(x) for x in rng.uniform(0.0, 0.22, size=2)) if rng.random() < 0.4 else (0.0, 0.0)
        return cls(kvp=rng.uniform(60, 120), filtration_mm_al=rng.uniform(2.5, 6.0),
                   photons=float(np.exp(rng.uniform(*np.log(photons)))) / px ** 2,
                   electronic_noise=rng.uniform(0.0, 8.0),
                   scatter=rng.uniform(*scatter), blur_px=rng.uniform(0.2, 1.6) * px, intensifier=intensifier,
                   field_radius=rng.uniform(0.5, 0.62) if intensifier else 1.0,
                   vignetting=rng.uniform(0.1, 0.45) if intensifier else 0.0,
                   shutters=shutters, dark_surround=bool(rng.random() < 0.7),
                   edge_gain=rng.uniform(0.0, 1.5) if rng.random() < 0.7 else 0.0,
                   edge_sigma_px=rng.uniform(3.0, 20.0) * px, gamma=float(np.exp(rng.uniform(-0.45, 0.45))),
                   window=(rng.uniform(0.0, 3.0), rng.uniform(98.5, 100.0)),
                   bits=8 if rng.random() < 0.35 else 16)

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def exposed_field(look: Look, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32, 1 where the detector is exposed and 0 behind the round field's
    edge or the shutters, with a soft edge a pixel or two wide as real blades give."""
    h, w = shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    side = float(max(h, w))
    r = np.hypot(u - (w - 1) / 2, v - (h - 1) / 2)
    field = np.clip(look.field_radius * side - r, 0.0, 1.0)
    field *= np.clip(u - look.shutters[0] * w, 0.0, 1.0) * np.clip((1.0 - look.shutters[1]) * w - u, 0.0, 1.0)
    return field


def inside_field(look: Look, shape: tuple[int, int], uv: np.ndarray, margin_px: float) -> np.ndarray:
    """Which pixels (N, 2) lie at least margin_px inside the exposed field."""
    h, w = shape
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    r = np.hypot(uv[:, 0] - (w - 1) / 2, uv[:, 1] - (h - 1) / 2)
    return ((r <= look.field_radius * max(h, w) - margin_px)
            & (uv[:, 0] >= look.shutters[0] * w + margin_px) & (uv[:, 0] <= (1 - look.shutters[1]) * w - margin_px))


def image(lines: torch.Tensor, look: Look, rng: np.random.Generator) -> np.ndarray:
    """The uint16 image (bone bright) a C-arm with this look makes of material line integrals (2, H, W)."""
    intensity = primary(lines, look.kvp, look.filtration_mm_al)
    h, w = intensity.shape
    field = exposed_field(look, (h, w)).astype(np.float64)
    if look.scatter > 0:  # scatter is smooth: blurred at an eighth of the resolution
        small = cv2.resize(intensity * field, (max(w // 8, 1), max(h // 8, 1)), interpolation=cv2.INTER_AREA)
        blurred = cv2.GaussianBlur(small, (0, 0), 0.08 * max(small.shape))
        intensity = intensity + look.scatter * cv2.resize(blurred, (w, h), interpolation=cv2.INTER_LINEAR)
    if look.vignetting > 0:
        v, u = np.mgrid[0:h, 0:w]
        r2 = ((u - (w - 1) / 2) ** 2 + (v - (h - 1) / 2) ** 2) / (look.field_radius * max(h, w)) ** 2
        intensity = intensity * (1.0 - look.vignetting * np.clip(r2, 0.0, 1.0))
    if look.blur_px > 0:
        intensity = cv2.GaussianBlur(intensity, (0, 0), look.blur_px)
    # automatic exposure control: the dose is set so that the middle of the field gets `photons`
    centre = intensity[h // 2 - h // 8:h // 2 + h // 8, w // 2 - w // 8:w // 2 + w // 8]
    in_air = look.photons / max(float(np.median(centre)), 1e-6)
    counts = rng.poisson(intensity * in_air) + rng.normal(0.0, look.electronic_noise, size=(h, w))
    observed = -np.log(np.clip(counts, 0.5, None) / in_air)  # bone bright from here
    if look.edge_gain > 0:
        observed = observed + look.edge_gain * (observed - cv2.GaussianBlur(observed, (0, 0), look.edge_sigma_px))
    lo, hi = np.percentile(observed[field > 0.5], look.window)
    shown = np.clip((observed - lo) / max(hi - lo, 1e-6), 0.0, 1.0) ** look.gamma
    surround = 0.0 if look.dark_surround else 1.0
    shown = field * shown + (1.0 - field) * surround
    levels = 255 if look.bits == 8 else 65535
    return (np.round(shown * levels) * (65535 // levels)).astype(np.uint16)
