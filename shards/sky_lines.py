"""Night-sky emission lines for the simulated spectrographs, measured from real DESI data.

    SKY_LINES   # (J, 2): vacuum wavelength (A), equivalent width (A) against the sky continuum

Each line's strength is its equivalent width relative to the sky continuum: the flux of
the line over the continuum's flux per Angstrom. `measure_sky_lines` derives the table
from the real DESI coadds in ../shared/data/desi*/ (the 4 targets' fibres): in each arm
the per-pixel variance 1/ivar over its running median (101 pixels) is 1 + (sky line flux
/ continuum flux) where the sky dominates the noise; peaks above 1 are lines, and the
excess summed over +-2 pixels (0.8 A each) is the equivalent width. The telluric A band
(7590-7660 A), which raises the variance by absorption, not emission, is left out. The
table below is its output (154 lines: [O I] 5577, Na D, [O I] 6300/6364 and the OH
Meinel bands), rounded; `tests/test_observe.py` re-derives it where the data is present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ARMS = {"B": (3600.0, 5780.0), "R": (5780.0, 7570.0), "Z": (7570.0, 9824.1)}
TELLURIC_A = (7590.0, 7660.0)

SKY_LINES = np.array([
    (5579.2, 84), (5891.2, 7), (5896.8, 5), (6301.6, 18), (6308.8, 2), (6365.6, 7),
    (6500.8, 3), (6535.2, 3), (6555.2, 3), (6578.4, 3), (6831.2, 5), (6836.0, 4),
    (6865.6, 5), (6872.8, 3), (6891.2, 2), (6902.4, 2), (6914.4, 2), (6924.8, 4),
    (6941.6, 2), (6951.2, 5), (6980.0, 3), (7242.4, 13), (7247.2, 11), (7255.2, 3),
    (7278.4, 17), (7286.4, 5), (7305.6, 3), (7318.4, 11), (7331.2, 4), (7343.2, 11),
    (7360.8, 5), (7371.2, 10), (7394.4, 3), (7404.0, 6), (7440.8, 4), (7485.6, 2),
    (7526.4, 7), (7573.6, 2), (7714.4, 14), (7719.2, 20), (7728.0, 3), (7752.8, 24),
    (7761.6, 5), (7775.2, 2), (7782.4, 3), (7796.0, 16), (7810.4, 5), (7824.0, 18),
    (7843.2, 3), (7855.2, 18), (7862.4, 5), (7870.4, 4), (7872.8, 7), (7880.8, 3),
    (7892.0, 8), (7916.0, 25), (7923.2, 10), (7933.6, 5), (7951.2, 3), (7967.2, 18),
    (7981.6, 7), (7996.0, 23), (8016.0, 4), (8028.0, 16), (8054.4, 3), (8064.0, 6),
    (8104.8, 3), (8281.6, 12), (8284.0, 14), (8291.2, 26), (8301.6, 22), (8312.8, 4),
    (8347.2, 73), (8355.2, 17), (8367.2, 5), (8384.8, 14), (8401.6, 44), (8417.6, 14),
    (8432.8, 56), (8454.4, 14), (8468.0, 32), (8495.2, 8), (8507.2, 19), (8540.8, 3),
    (8551.2, 7), (8599.2, 2), (8627.2, 4), (8630.4, 4), (8634.4, 3), (8657.6, 3),
    (8662.4, 3), (8667.2, 3), (8672.0, 3), (8677.6, 2), (8763.2, 37), (8770.4, 48),
    (8780.8, 48), (8793.6, 11), (8828.8, 132), (8838.4, 33), (8852.0, 7), (8869.6, 18),
    (8888.0, 74), (8905.6, 22), (8922.4, 100), (8945.6, 18), (8960.8, 47), (8990.4, 27),
    (8994.4, 2), (9003.2, 38), (9040.8, 4), (9052.0, 12), (9095.2, 4), (9104.8, 5),
    (9154.4, 5), (9163.2, 4), (9219.2, 3), (9227.2, 3), (9310.4, 52), (9316.0, 63),
    (9319.2, 12), (9326.4, 94), (9340.8, 9), (9345.6, 3), (9378.4, 273), (9384.0, 4),
    (9389.6, 3), (9404.8, 8), (9422.4, 19), (9429.6, 3), (9441.6, 262), (9461.6, 47),
    (9479.2, 103), (9484.0, 5), (9504.0, 61), (9521.6, 47), (9538.4, 2), (9555.2, 21),
    (9569.6, 73), (9610.4, 8), (9623.2, 16), (9671.2, 9), (9684.0, 22), (9692.8, 2),
    (9702.4, 17), (9714.4, 5), (9722.4, 28), (9740.8, 11), (9748.0, 5), (9793.6, 115),
    (9802.4, 26), (9810.4, 4), (9814.4, 7), (9820.0, 5),
])


def measure_sky_lines(paths: list[Path], min_ratio: float = 1.0) -> np.ndarray:
    """(J, 2) sky lines (wavelength A, equivalent width A) from DESI coadd files."""
    from astropy.io import fits
    from scipy.ndimage import median_filter
    from scipy.signal import find_peaks
    per_file = []
    for path in paths:
        with fits.open(path) as h:
            target = h["FIBERMAP"].data["OBJTYPE"] == "TGT"
            wave, ratio = [], []
            for arm, (lo, hi) in ARMS.items():
                w = np.asarray(h[f"{arm}_WAVELENGTH"].data, np.float64)
                ivar = np.asarray(h[f"{arm}_IVAR"].data, np.float64)[target]
                sigma = np.nanmedian(np.where(ivar > 0, 1 / np.sqrt(np.where(ivar > 0, ivar, 1)), np.nan), 0)
                r = (sigma / median_filter(sigma, 101, mode="nearest")) ** 2 - 1
                sel = (w >= lo) & (w < hi)
                wave.append(w[sel])
                ratio.append(r[sel])
            per_file.append((np.concatenate(wave), np.concatenate(ratio)))
    w = per_file[0][0]
    r = np.nan_to_num(np.nanmedian(np.stack([np.interp(w, a, b) for a, b in per_file]), 0))
    peaks, _ = find_peaks(r, height=min_ratio, distance=3)
    peaks = peaks[~((w[peaks] > TELLURIC_A[0]) & (w[peaks] < TELLURIC_A[1]))]
    ew = np.array([np.clip(r[max(i - 2, 0):i + 3], 0, None).sum() * (w[1] - w[0]) for i in peaks])
    return np.stack([w[peaks], ew], 1)
