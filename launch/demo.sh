#!/usr/bin/env bash
# The whole pipeline on the built-in simulated sky, at tiny size, on CPU:
#   simulate -> tokenizers (image, spectrum, scalar; each separately) -> token shards
#   -> FM under `accelerate launch` on 2 processes with DeepSpeed ZeRO-2
#   -> survey translation, super-resolution, conditional generation -> demo_out/report.md
# Sizes can be overridden: N=5000 FM_SET="steps=12000" bash launch/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_out}
N=${N:-2000}            # training objects
N_TEST=${N_TEST:-1200} # held-out objects (another sky seed): 256 for translation, 64 per other generation task,
                        # 400 + 400 for the redshift posterior
WORKERS=${WORKERS:-2}
FM_SET=${FM_SET:-}      # extra `--set key=value` for FM training, e.g. "steps=50"
TOK_SET=${TOK_SET:-}    # extra `--set key=value` for the image and spectrum tokenizers
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
t0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
sets() { for kv in $1; do printf -- '--set %s ' "$kv"; done; }

stage "1/6 simulate the sky: $N training + $N_TEST held-out objects -> raw shards"
omnisky-shards simulate --config launch/sky/tiny.yaml --n "$N" --seed 0 --out "$OUT/raw/train" --shard-size 250 --workers "$WORKERS"
omnisky-shards simulate --config launch/sky/tiny.yaml --n "$N_TEST" --seed 1 --out "$OUT/raw/test" --shard-size 100 --workers "$WORKERS"
omnisky-shards inspect "$OUT/raw/test" --png "$OUT/sky.png" --n 6

stage "2/6 train the tokenizers, each on its own (image and spectrum side by side, one core each)"
tokenizer() {
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --cpu \
    -m omnisky.train.tokenizer --config "launch/tokenizers/$1-tiny.yaml" \
    --data "$OUT/raw/train" --out "$OUT/tokenizers/$1" $(sets "$TOK_SET")
}
mkdir -p "$OUT/tokenizers"
echo "spectrum tokenizer: progress in $OUT/tokenizers/spectrum.log"
tokenizer spectrum > "$OUT/tokenizers/spectrum.log" 2>&1 &
spectrum_pid=$!
trap 'kill "$spectrum_pid" 2>/dev/null || true' EXIT    # the image tokenizer failed: stop the spectrum one too
tokenizer image
wait "$spectrum_pid" || { tail -n 20 "$OUT/tokenizers/spectrum.log"; exit 1; }
trap - EXIT
python -m omnisky.train.tokenizer --config launch/tokenizers/scalar.yaml --data "$OUT/raw/train" --out "$OUT/tokenizers/scalar"

stage "3/6 tokenize the raw shards into token shards"
omnisky-tokenize --raw "$OUT/raw/train" --tokenizers "$OUT/tokenizers" --out "$OUT/tokens/train" --workers "$WORKERS"
omnisky-tokenize --raw "$OUT/raw/test" --tokenizers "$OUT/tokenizers" --out "$OUT/tokens/test" --workers "$WORKERS"

stage "4/6 train the FM: accelerate launch, 2 CPU processes, DeepSpeed ZeRO-2"
accelerate launch --config_file launch/accelerate/zero2.yaml -m omnisky.train.fm \
  --config launch/fm/tiny.yaml --data "$OUT/tokens/train" --eval-data "$OUT/tokens/test" --out "$OUT/fm" $(sets "$FM_SET")

stage "5/6 generate: survey translation, super-resolution, conditional generation"
GEN=(--fm "$OUT/fm/model" --tokenizers "$OUT/tokenizers" --data "$OUT/raw/test")
omnisky-generate translate "${GEN[@]}" --n 4 --samples 2 --estimate --out "$OUT/translate"
omnisky-generate translate "${GEN[@]}" --n 4 --samples 8 --consistency "$OUT/raw/train" \
  --out "$OUT/translate_consistent"      # the samples pulled to the DES-like pixels (generate/consistency.py)
omnisky-generate superres "${GEN[@]}" --n 4 --estimate --out "$OUT/superres"   # + each point estimate
omnisky-generate superres "${GEN[@]}" --n 4 --consistency "$OUT/raw/train" \
  --out "$OUT/superres_consistent"       # pulled to the SDSS-like spectrum, lines fitted (generate/spectrum_consistency.py)
omnisky-generate sample "${GEN[@]}" --n 4 --given scalar.redshift scalar.flux_g scalar.flux_r scalar.flux_i scalar.flux_z \
  --target image.hsc --out "$OUT/sample"
omnisky-generate sample "${GEN[@]}" --n 4 --given scalar.redshift scalar.flux_g scalar.flux_r scalar.flux_i scalar.flux_z \
  --target image.hsc --catalog-consistency "$OUT/raw/train" \
  --out "$OUT/sample_catalog"   # pulled to the given fluxes (generate/catalog_consistency.py)

stage "6/6 evaluate on held-out objects and write the report"
omnisky-generate report "${GEN[@]}" --train-data "$OUT/raw/train" --n-eval 64 --n-translate 256 --out "$OUT"
stage "done: $OUT/report.md"
