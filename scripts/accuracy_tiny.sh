#!/usr/bin/env bash
# Reproduces docs/accuracy.md: the synthetic benchmark, the tiny random-weight CLIP of
# sowa-tiny, CPU only. Train on family a, evaluate on the held-out family b.
#   scripts/accuracy_tiny.sh [WORK_DIR] [TINY_CONFIG]
set -euo pipefail
WORK=${1:-accuracy-run}
CONFIG=${2:-sowa-tiny}
DOCS=docs/accuracy
mkdir -p "$WORK" "$DOCS"

sowa synth --out "$WORK/synth" --seed 0 --test-good-per-class 32 --test-defect-per-class 96 --force --no-progress

# the untrained baseline: the same random backbone (seed 2025 draws the CLIP weights first, as training does)
sowa init --arch "$CONFIG" --pretrained none --seed 2025 --out "$WORK/untrained" --force
# the reference recipe (batch 8, AdamW 1e-3, wd 0.2, seed 2025) for EPOCHS epochs, capped at 10 minutes
sowa train --data "$WORK/synth/a" --out "$WORK/trained" --arch "$CONFIG" --pretrained none \
    --epochs "${EPOCHS:-20}" --max-minutes 10 --force --no-progress

for b in untrained trained; do
    sowa eval --bundle "$WORK/$b" --data "$WORK/synth/b" --k 0,1,2,4 --seeds 0,1,2 --no-progress \
        --out "$DOCS/$b-b.json" --markdown "$DOCS/$b-b.md"
done
sowa eval --bundle "$WORK/trained" --data "$WORK/synth/a" --k 0,4 --seeds 0,1,2 --no-progress \
    --out "$DOCS/trained-a.json" --markdown "$DOCS/trained-a.md"
# overlay strips of the trained bundle at K = 4 (two were copied to docs/accuracy/visuals/)
sowa eval --bundle "$WORK/trained" --data "$WORK/synth/b" --k 4 --seeds 0 --no-progress \
    --out "$WORK/visuals.json" --visuals "$WORK/visuals" --visuals-per-class 2
sowa plot "$DOCS/trained-b.json" "$DOCS/untrained-b.json" --label "trained on a" --label "untrained" \
    --metric pixel_auroc --title "pixel AUROC on held-out family b (tiny CLIP, random weights)" \
    --out "$DOCS/pixel_auroc_vs_k.png"
sowa info "$WORK/trained" > "$DOCS/trained-bundle.json"
