"""Hand-written style statistics of an image: the baseline a trained model must beat (bench/bench_recipe.py) and a
check that generated styles are separable (tests)."""

import numpy as np

__all__ = ["style_statistics"]


def style_statistics(rgb: np.ndarray, colour: bool = True) -> np.ndarray:
    """FFT band energies, gradient orientation and magnitude histograms, contrast and the number of distinct grey
    levels of an (H, W, 3) float image in [0, 1]; with ``colour`` also a 4x4x4 colour histogram."""
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gy, gx = np.gradient(grey)
    mag = np.hypot(gx, gy)
    orientation = np.histogram(np.arctan2(gy, gx) % np.pi, bins=12, range=(0, np.pi), weights=mag)[0]
    spectrum = np.abs(np.fft.rfft2(grey - grey.mean()))
    radius = np.hypot(np.fft.rfftfreq(grey.shape[1])[None], np.fft.fftfreq(grey.shape[0])[:, None])
    bands = np.histogram(radius, bins=12, range=(0, 0.71), weights=spectrum)[0]
    magnitudes = np.histogram(mag, bins=8, range=(0, 0.5))[0] / grey.size
    levels = len(np.unique(np.rint(grey * 255)))
    parts = [orientation / (mag.sum() + 1e-6), np.log1p(bands), magnitudes, [mag.mean(), grey.std(), np.log(levels)]]
    if colour:
        parts.append(np.histogramdd(rgb.reshape(-1, 3), bins=4, range=[(0, 1)] * 3)[0].ravel() / grey.size)
    return np.concatenate(parts)
