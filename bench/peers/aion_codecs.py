"""Peer for bench/tokenizers.py: AION-1's image and spectrum codecs, random weights, timed.

Runs under the AION venv, never under omnisky's (omnisky does not import aion):

    OMP_NUM_THREADS=1 /work/aion-venv/bin/python bench/peers/aion_codecs.py --batch 8 --repeats 2

Input shapes as AION-1 sees them: a 4-band (DES g,r,i,z) 96x96 image -> 576 tokens, and a
7781-pixel DESI spectrum (3600-9824 A at 0.8 A) -> 1 + 272 tokens. Codec constructor
arguments are the class defaults of the installed `polymathic-aion` where they are
consistent (image: quantizer_levels [7, 5, 5, 5, 5] for 5 latent channels, hidden 512, 2
compressions, 4 blocks each; spectrum: ConvNeXt depths (3, 3, 9, 3), widths 96 .. 768,
LFQ 1024 codes). Two spectrum defaults contradict each other (encoder width 768 vs
latent_channels 512, which the constructor asserts equal; embedding_dim 4 vs LFQ dim
10), so latent_channels = 768 and embedding_dim = 10 here: the ConvNeXt widths as
shipped, and 8704 / 32 = 272 + 1 tokens as AION-1 states for DESI. Prints one JSON line: objects/s for
encode and decode of each, the batch, threads and token counts.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, repeats: int) -> float:
    """Best wall time (s) of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--spectrum-pixels", type=int, default=7781)
    a = p.parse_args()
    from aion.codecs.image import ImageCodec
    from aion.codecs.spectrum import SpectrumCodec
    from aion.modalities import DESISpectrum, LegacySurveyImage

    torch.manual_seed(0)
    B = a.batch
    out = dict(peer="aion", torch_threads=torch.get_num_threads(), batch=B)
    with torch.inference_mode():
        codec = ImageCodec(quantizer_levels=[7, 5, 5, 5, 5]).eval()
        bands = ["DES-G", "DES-R", "DES-I", "DES-Z"]
        flux = 0.05 * torch.randn(B, 4, a.size, a.size)                   # (B, 4, 96, 96) nanomaggies
        image = lambda: LegacySurveyImage(flux=flux.clone(), bands=bands)   # the codec clamps in place
        tokens = codec.encode(image())
        t_enc = timed(lambda: codec.encode(image()), a.repeats)
        t_dec = timed(lambda: codec.decode(tokens, bands=bands), a.repeats)
        out.update(image_tokens=int(tokens[0].numel()), image_encode_per_s=B / t_enc,
                   image_decode_per_s=B / t_dec,
                   image_params=sum(p.numel() for p in codec.parameters()))
        del codec

        codec = SpectrumCodec(latent_channels=768, embedding_dim=10).eval()
        L = a.spectrum_pixels
        wave = (3600.0 + 0.8 * torch.arange(L, dtype=torch.float32)).expand(B, L)   # (B, L) Angstrom
        spec = DESISpectrum(flux=1 + 0.1 * torch.randn(B, L), ivar=torch.full((B, L), 25.0),
                            mask=torch.zeros(B, L, dtype=torch.bool), wavelength=wave)
        tokens = codec.encode(spec)
        t_enc = timed(lambda: codec.encode(spec), a.repeats)
        t_dec = timed(lambda: codec.decode(tokens, wavelength=wave), a.repeats)
        out.update(spectrum_tokens=int(tokens.shape[-1]), spectrum_encode_per_s=B / t_enc,
                   spectrum_decode_per_s=B / t_dec,
                   spectrum_params=sum(p.numel() for p in codec.parameters()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
