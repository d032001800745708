"""What a training step costs: model FLOPs of a batch, the device's peak, peak memory.

    flops = TrainingFlops(model)            # the FourM (its parameters may be ZeRO-3 shards)
    f = flops(batch)                        # forward + backward FLOPs of one micro-batch
    mfu = f_per_s_per_device / peak_flops(device)
    gib = peak_memory_gib(device)

Model FLOPs count the matrix products over the tokens a batch holds (padding excluded),
2 FLOPs per multiply-add and 3x the forward for forward + backward, as in PaLM's MFU;
activation checkpointing's recomputation is not counted. Per micro-batch (D = width):
  encoder blocks: every Linear weight once per input token, + self-attention 2*D*n_in^2
  decoder blocks: every Linear weight once per target token, except the cross-attention
                  key/value projection (once per input token), + attention within each
                  target modality 2*D*n_m^2 and cross-attention 2*D*n_tgt*n_in
  heads: D * vocab_m per target token of modality m
"""
from __future__ import annotations

import resource

import torch
from torch import nn

# dense bf16 peak per device (FLOP/s), by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))     # ZeRO-3 shards keep the full size in ds_numel


def _linear_weights(module: nn.Module, skip: str | None = None) -> int:
    return sum(_numel(m.weight) for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and not (skip and name.endswith(skip)))


class TrainingFlops:
    """Model FLOPs (forward + backward) of FourM micro-batches; see the module doc."""

    def __init__(self, model: nn.Module):
        self.dim = model.config.dim
        self.enc_weights = sum(_linear_weights(b) for b in model.encoder)           # per input token
        self.dec_weights = sum(_linear_weights(b, skip="cross.kv") for b in model.decoder)  # per target
        self.cross_kv = sum(_numel(b.cross.kv.weight) for b in model.decoder)       # per input token
        self.enc_depth, self.dec_depth = len(model.encoder), len(model.decoder)
        self.vocab = torch.tensor([s.vocab_size for s in model.table], dtype=torch.float64)
        self.n_modalities = len(model.table)

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        n_in = (~batch["enc_pad"]).sum(1).double()                                  # (B,)
        valid = ~batch["dec_pad"]
        n_tgt = valid.sum(1).double()                                               # (B,)
        B, M = valid.shape[0], self.n_modalities
        rows = torch.arange(B).unsqueeze(1).expand_as(valid)[valid] * M + batch["dec_mod"][valid]
        n_bm = torch.bincount(rows, minlength=B * M).double()                       # (B*M,) targets per modality
        per_m = n_bm.view(B, M).sum(0)                                              # (M,)
        D = self.dim
        macs = (n_in.sum() * (self.enc_weights + self.cross_kv) + n_tgt.sum() * self.dec_weights
                + self.enc_depth * 2 * D * (n_in ** 2).sum()
                + self.dec_depth * 2 * D * ((n_bm ** 2).sum() + (n_tgt * n_in).sum())
                + D * (per_m * self.vocab).sum())
        return 6.0 * float(macs)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Dense bf16 peak FLOP/s of one device: `override_tflops` if set, else from the GPU's
    name (PEAK_BF16); None on CPUs and unknown GPUs (no MFU then)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: max memory allocated by tensors on `device`; CPU: this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # KiB on Linux
