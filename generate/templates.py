"""Standard template records of each survey, for decoding when an object has no record of
the target modality to take its grid from (the `like=` of a tokenizer's decode).

Templates come from the survey definitions the simulated sky observes with
(`shards.render.IMAGING`, `shards.spectrograph.SPECTROGRAPHS`): bands, pixel scale,
zero point, median PSF, wavelength grid, resolution and the typical sky noise as ivar.
"""
from __future__ import annotations

import numpy as np

from ..shards.render import IMAGING
from ..shards.schema import Image, Scalar, Spectrum
from ..shards.spectrograph import SPECTROGRAPHS


def template_for(key: str, image_size: int = 32):
    """A template record for modality `key` ('image.hsc', 'spectrum.desi', 'scalar.redshift')."""
    kind, name = key.split(".", 1)
    if kind == "image":
        if name not in IMAGING:
            raise KeyError(f"no imaging survey {name!r} to template {key!r}; known: {sorted(IMAGING)}")
        s = IMAGING[name]
        c = len(s.bands)
        ivar = np.broadcast_to((1.0 / s.sky_sigma() ** 2)[:, None, None], (c, image_size, image_size))
        return Image(np.zeros((c, image_size, image_size), np.float32), ivar.astype(np.float32),
                     np.zeros((c, image_size, image_size), bool), s.bands, s.pixel_scale, s.name,
                     s.zero_point, np.array(s.psf_fwhm, np.float32))
    if kind == "spectrum":
        if name not in SPECTROGRAPHS:
            raise KeyError(f"no spectrograph {name!r} to template {key!r}; known: {sorted(SPECTROGRAPHS)}")
        sp = SPECTROGRAPHS[name]()
        n = len(sp.wavelength)
        return Spectrum(np.zeros(n, np.float32), (1.0 / sp.sky_sigma ** 2).astype(np.float32),
                        np.zeros(n, bool), sp.wavelength, sp.name, sp.resolution.astype(np.float32))
    if kind == "scalar":
        return Scalar(name, 0.0)
    raise KeyError(f"unknown modality kind in {key!r}")
