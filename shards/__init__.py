"""omnisky.shards: observations in.

schema (records), bands (registry), codec (sample <-> tar members), writer (shards +
manifest), reader (webdataset streams), sky (the simulated sky), cli (omnisky-shards).
Knows nothing of tokenizers or the FM.
"""
from .schema import Image, Record, RecordError, Sample, Scalar, Spectrum, mask_invalid  # noqa: F401
