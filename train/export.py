"""The consolidated FM: a `FourM.from_pretrained` folder from a live run or a checkpoint.

    python -m omnisky.train.export runs/fm                  # newest checkpoint -> runs/fm/model
    python -m omnisky.train.export runs/fm --step 4000 --out runs/fm/model-4000

In a run, `consolidated_state_dict` gathers the ZeRO-3 partitions (every rank takes part)
and the main process saves them; `check_export` then compares the saved model's logits
with the live model's. Offline, the checkpoint's DeepSpeed shards (ZeRO-1/2/3) are merged
into fp32 tensors with DeepSpeed's zero_to_fp32 (which unpickles DeepSpeed's own files:
export only checkpoints you wrote); a non-DeepSpeed checkpoint's model.safetensors is
read as is. The FM config and modality table come from the checkpoint's trainer_state.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import from_dict
from ..fm.model import FMConfig, FourM
from ..fm.modality import ModalityTable
from .loop import checkpoint_dirs

MODEL_TAG = "pytorch_model"   # accelerate's tag for the first model's DeepSpeed checkpoint


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0


def consolidated_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """Full CPU state dict on every rank; under ZeRO-3 the partitions are gathered first
    (a collective: call it on every rank)."""
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def probe_inputs(table: ModalityTable, batch: int = 2, seed: int = 0):
    """Fixed logits() arguments over the whole table: the first half of the modalities
    given (random ids), every position of the others as targets."""
    g = torch.Generator().manual_seed(seed)
    keys = table.keys
    given = keys[: max(1, len(keys) // 2)]
    targets = keys[len(given):] or keys[-1:]
    inputs = {k: torch.randint(table[k].vocab_size, (batch, table[k].n_tokens), generator=g) for k in given}
    return inputs, {k: torch.arange(table[k].n_tokens).expand(batch, -1) for k in targets}


@torch.no_grad()
def check_export(accelerator, model, directory: str | Path) -> float | None:
    """Max |logits(live model) - logits(FourM.from_pretrained(directory))| over a fixed
    probe, in fp32 without autocast, on the main process (None elsewhere). Every rank
    must call it (a ZeRO-3 forward gathers parameters)."""
    module = accelerator.unwrap_model(model)
    was_training = module.training
    module.eval()
    inputs, targets = probe_inputs(module.table)
    live = module.logits({k: v.to(accelerator.device) for k, v in inputs.items()},
                         {k: v.to(accelerator.device) for k, v in targets.items()})
    module.train(was_training)
    if not accelerator.is_main_process:
        return None
    saved = FourM.from_pretrained(directory).logits(inputs, targets)
    return max((live[k].float().cpu() - saved[k].float()).abs().max().item() for k in targets)


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> FourM:
    """A checkpoint folder (checkpoints/step-N) -> a FourM saved under `out`."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{checkpoint}: no trainer_state.json (not a complete checkpoint)")
    extra = json.loads(state_file.read_text()).get("extra", {})
    if "modalities" not in extra or "config" not in extra:
        raise ValueError(f"{state_file}: extra holds no 'config'/'modalities' (not an FM checkpoint)")
    model = FourM(from_dict(FMConfig, extra["config"]["model"]), ModalityTable.from_dict(extra["modalities"]))
    if (checkpoint / MODEL_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=MODEL_TAG)
    elif (checkpoint / "model.safetensors").exists():
        from safetensors.torch import load_file
        state = load_file(str(checkpoint / "model.safetensors"))
    else:
        raise FileNotFoundError(f"{checkpoint}: neither DeepSpeed shards ({MODEL_TAG}/) nor model.safetensors")
    model.load_state_dict(state)
    model.save(out)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training output folder (with checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/model)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if args.step is None:
        dirs = checkpoint_dirs(run)
        if not dirs:
            raise SystemExit(f"{run}: no complete checkpoint under {run / 'checkpoints'}")
        checkpoint = dirs[-1]
    else:
        checkpoint = run / "checkpoints" / f"step-{args.step}"
    out = Path(args.out) if args.out else run / "model"
    model = export_checkpoint(checkpoint, out)
    print(f"omnisky.train.export: {checkpoint} -> {out} ({model.num_params() / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
