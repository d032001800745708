"""The modality set the FM benches use, shaped like AION-1's (bench/fm_throughput.py, bench/fm_memory.py).

An image of 576 tokens (vocab 4375: AION-1's FSQ levels 7 x 5^4), a spectrum of 273 tokens
(vocab 1024: its LFQ's 10 bits) and five scalars of one token (1024 ordered bins), with
the code grids an omnisky tokenizer would state for them (fm.codes).
"""
from __future__ import annotations

from omnisky.fm.modality import ModalityTable

AION_LIKE = {"image.hsc": (4375, 576), "spectrum.desi": (1024, 273),
             **{f"scalar.{n}": (1024, 1) for n in ("flux_g", "flux_r", "flux_i", "flux_z", "redshift")}}
CODE_LEVELS = {"image.hsc": [7, 5, 5, 5, 5], "spectrum.desi": [2] * 10}   # scalars: [vocab], ordered bins


def aion_like_table() -> ModalityTable:
    return ModalityTable.from_dict({k: {"vocab_size": v, "n_tokens": n, "code_levels": CODE_LEVELS.get(k, [v])}
                                    for k, (v, n) in AION_LIKE.items()})
