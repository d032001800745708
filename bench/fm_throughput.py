"""FM training throughput: one full step (forward, backward, AdamW) on a modality set shaped
like AION-1's, on this machine. Prints one JSON line.

    python bench/fm_throughput.py --dim 256 --depth 4 --heads 4 --batch 8 --enc 256 --dec 128

tokens_per_s = (non-padding encoder + decoder tokens per optimizer step) / median step time.
Modalities: an image of 576 tokens (vocab 4375), a spectrum of 273 (vocab 1024), five
scalars of one token (vocab 1024); every object holds all of them. Masking is drawn in
numpy as in the data workers, outside the timed region. Each attention backend that runs
here is timed in the same run (sdpa and reference on CPU; xformers too on CUDA), so the
ratio between backends is measured side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from omnisky.fm.data import collate
from omnisky.fm.masking import MaskingConfig, sample_masks
from omnisky.fm.modality import ModalityTable
from omnisky.fm.model import FMConfig, FourM

AION_LIKE = {"image.hsc": (4375, 576), "spectrum.desi": (1024, 273),
             **{f"scalar.{n}": (1024, 1) for n in ("flux_g", "flux_r", "flux_i", "flux_z", "redshift")}}


def batches(table: ModalityTable, cfg: MaskingConfig, batch: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        objs = [{k: rng.integers(0, v, size=t).astype(np.int32) for k, (v, t) in AION_LIKE.items()}
                for _ in range(batch)]
        out.append(collate([sample_masks(o, table, cfg, rng) for o in objs]))
    return out


def time_steps(model, data, device, warmup: int, steps: int) -> tuple[float, int]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, tokens = [], 0
    for i, batch in enumerate(data[: warmup + steps]):
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens = int((~batch["enc_pad"]).sum() + (~batch["dec_pad"]).sum())
    return statistics.median(times), tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4, help="encoder and decoder layers each")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--enc", type=int, default=256, help="input token budget per object")
    ap.add_argument("--dec", type=int, default=128, help="target token budget per object")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = ModalityTable.from_dict({k: {"vocab_size": v, "n_tokens": n} for k, (v, n) in AION_LIKE.items()})
    # alphas high: every modality gets a share, so budgets are used nearly in full
    masking = MaskingConfig(args.enc, args.dec, input_alphas=(5.0,), target_alphas=(5.0,))
    data = batches(table, masking, args.batch, args.warmup + args.steps)
    backends = ["sdpa", "reference"] + (["xformers"] if device.type == "cuda" else [])
    out = dict(device=str(device), threads=torch.get_num_threads(), **vars(args))
    for backend in backends:
        torch.manual_seed(0)
        cfg = FMConfig(dim=args.dim, enc_depth=args.depth, dec_depth=args.depth, heads=args.heads, attention=backend)
        model = FourM(cfg, table).to(device).train()
        step_s, tokens = time_steps(model, data, device, args.warmup, args.steps)
        out[f"{backend}_step_s"] = round(step_s, 4)
        out[f"{backend}_tokens_per_s"] = round(tokens / step_s, 1)
        out["tokens_per_step"] = tokens
        out["params_m"] = round(model.num_params() / 1e6, 2)
    out["tokens_per_s"] = out["sdpa_tokens_per_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
