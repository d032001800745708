"""Peer for bench/fm_throughput.py: AION-1's 4M transformer (random weights), one training
step (forward, backward, AdamW) per request, on the very batches omnisky's model gets.

Runs under the AION venv, never under omnisky's (omnisky does not import aion):

    OMP_NUM_THREADS=1 /work/aion-venv/bin/python bench/peers/aion_fm.py --data batches.npz \\
        --dim 256 --depth 4 --heads 4 --enc 256 --dec 128

The model is `aion.fourm.fm.FM` as the installed `polymathic-aion` builds it from a config
dict, with its own embedding modules for tok_image_hsc (24 x 24 = 576 tokens, vocab 4375),
tok_spectrum_desi (273, 1024), tok_flux_g/r/i/z (1, 1024) and tok_z (1, 1025), and the
block options set to what omnisky's model runs in the bench: GELU MLP, no QK-norm, no
biases. Its training forward is AION's own: every modality's tokens are embedded, then
the input and target budgets (`num_encoder_tokens`, `num_decoder_tokens`) are gathered
from the concatenation by the masks.

The masks come from `--data` (written by bench/fm_throughput.py): for batch i,
`tokens/<key>` (B, n_key) holds every token of each object, and enc_mod/enc_pos/enc_pad
(B, Nin), dec_mod/dec_pos/dec_pad (B, Ndec) the inputs and targets that omnisky's masking
drew (modality index in `keys` order, position in the modality). They become AION's
`input_mask` / `target_mask` (True = not selected); `decoder_attention_mask[:, 0] = n`
lets the targets of a modality attend to each other, as 4M's data pipeline does for
image-like modalities.

Protocol (so the two models can be timed in alternation, never at the same time): prints
one JSON line {"ready": true, ...}, then for each stdin line `step I` runs one training
step on batch I and prints {"step_s": seconds}; `quit` (or end of input) ends it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
# omnisky modality key -> AION-1 modality name
AION_NAMES = {"image.hsc": "tok_image_hsc", "spectrum.desi": "tok_spectrum_desi",
              "scalar.flux_g": "tok_flux_g", "scalar.flux_r": "tok_flux_r", "scalar.flux_i": "tok_flux_i",
              "scalar.flux_z": "tok_flux_z", "scalar.redshift": "tok_z"}


def build_model(args, names: list[str]):
    from aion.fourm.fm import FM
    config = {"domains_in": names, "domains_out": names, "dim": args.dim, "encoder_depth": args.depth,
              "decoder_depth": args.depth, "num_heads": args.heads, "mlp_ratio": 4.0,
              "qkv_bias": False, "proj_bias": False, "mlp_bias": False, "norm_bias": False,
              "act_layer": "GELU", "gated_mlp": False, "qk_norm": False}
    return FM(config)


def selection_mask(mod, pos, pad, m: int, n: int) -> torch.Tensor:
    """(B, N) modality/position/padding of the selected tokens -> (B, n) True = NOT selected."""
    out = torch.ones(mod.shape[0], n, dtype=torch.bool)
    rows, cols = np.nonzero((mod == m) & ~pad)
    out[torch.from_numpy(rows), torch.from_numpy(pos[rows, cols])] = False
    return out


def mod_dicts(data, keys: list[str], i: int) -> dict[str, dict[str, torch.Tensor]]:
    """Batch i as AION's training input: {aion_name: {tensor, input_mask, target_mask,
    decoder_attention_mask}}."""
    enc = [data[f"{i}/enc_{f}"] for f in ("mod", "pos", "pad")]
    dec = [data[f"{i}/dec_{f}"] for f in ("mod", "pos", "pad")]
    out = {}
    for m, key in enumerate(keys):
        tokens = torch.from_numpy(data[f"{i}/tokens/{key}"]).long()          # (B, n)
        B, n = tokens.shape
        attention = torch.zeros(B, n, dtype=torch.long)
        attention[:, 0] = n                                                  # the whole modality attends
        out[AION_NAMES[key]] = {"tensor": tokens, "input_mask": selection_mask(*enc, m, n),
                                "target_mask": selection_mask(*dec, m, n),
                                "decoder_attention_mask": attention}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="batches written by bench/fm_throughput.py (.npz)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="encoder and decoder layers each")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--enc", type=int, default=256, help="input token budget (num_encoder_tokens)")
    p.add_argument("--dec", type=int, default=128, help="target token budget (num_decoder_tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adamw", choices=sorted(ADAMW), default="fused", help="torch AdamW implementation")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the peer runs on the CPU)")
    args = p.parse_args()

    data = np.load(args.data)
    keys = [str(k) for k in data["keys"]]
    unknown = sorted(set(keys) - set(AION_NAMES))
    if unknown:
        raise SystemExit(f"aion_fm: no AION-1 modality for {unknown}; known: {sorted(AION_NAMES)}")
    batches = [mod_dicts(data, keys, i) for i in range(int(data["n_batches"]))]
    torch.manual_seed(args.seed)
    model = build_model(args, [AION_NAMES[k] for k in keys]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **ADAMW[args.adamw])
    print(json.dumps({"ready": True, "params_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 2),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)

    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        batch = {k: dict(v) for k, v in batches[int(cmd[1]) % len(batches)].items()}  # AION adds keys to these
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = model(batch, num_encoder_tokens=args.enc, num_decoder_tokens=args.dec, loss_type="mod")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(json.dumps({"step_s": time.perf_counter() - t0, "loss": loss.item()}), flush=True)


if __name__ == "__main__":
    main()
