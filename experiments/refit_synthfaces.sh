#!/usr/bin/env bash
# Refit the SynthFaces hand-offs of stages 1-2 (and the smile direction) on a new stage-0 generator, through the
# +exp=dhr chain, then score the stage-1 encoder on the validation images (the refit's model choices look at no
# test image). Re-running the same command continues where it stopped: finished files are kept, a killed chain or
# stage-2 run resumes from its last checkpoint.
#
#   bash experiments/refit_synthfaces.sh GENERATOR.pt OUT_DIR [synthfaces|random] [extra run.py overrides...]
#
#   GENERATOR.pt  the new generator (rosinality layout, e.g. outputs/stylegan_continue/generator.pt)
#   OUT_DIR       everything goes here: smile.pt (+ .json), chain/ (stage_encoder/encoder.pt,
#                 stage_align_mask/align_mask.pt, stage 3's metrics), unsupervised/align_mask.pt, stage1_val.md
#   perceptual    the perceptual loss of stages 1-3: synthfaces (lpips-synthfaces, default) or random (lpips-random)
#   extra         appended to the chain's run.py call (stage 3 and what the stages inherit), e.g.
#                 trainer.limit_test_batches=1
# Environment: E4E_ARGS / STAGE2_ARGS add overrides to the stage-1 / stage-2 trainings (e.g. trainer.max_steps=3).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
GEN=$(realpath "$1"); OUT=$(realpath -m "$2"); PERCEPTUAL=${3:-synthfaces}; shift $(( $# >= 3 ? 3 : 2 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -f $GEN ]] || { echo "refit_synthfaces: generator file $GEN does not exist" >&2; exit 2; }
case $PERCEPTUAL in
    synthfaces) LPIPS=("model.lpips.net=synthfaces"
                       "model.lpips.backbone_weights=$ROOT/experiments/weights/synthfaces/attribute_classifier.pt") ;;
    random) LPIPS=("model.lpips.net=alex" "model.lpips.backbone_weights=null" "model.lpips.allow_random_backbone=true") ;;
    *) echo "refit_synthfaces: perceptual must be synthfaces or random, got '$PERCEPTUAL'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
cd "$ROOT"
quoted() { local out="" item; for item in "$@"; do out+="'$item',"; done; echo "[${out%,}]"; }

# 1. the smile direction of the new generator (InterFaceGAN on the attribute classifier's smile score)
[[ -f $OUT/smile.pt ]] || "$PY" experiments/fit_direction.py "$GEN" --attribute smile --out "$OUT/smile.pt"
EDIT=("model.edit.direction=$OUT/smile.pt"
      "model.edits=[{name:smile,kind:interfacegan,path:'$OUT/smile.pt',strengths:[-3.0,3.0]}]")

# 2. the chain: e4e on the generator, stage 2 (patch-supervised, +exp=ood_blend) on the encoder, stage 3 (DHR)
read -r -a E4E_EXTRA <<< "${E4E_ARGS:-}"; read -r -a S2_EXTRA <<< "${STAGE2_ARGS:-}"
"$PY" experiments/run.py +exp=dhr paths.run_dir="$OUT/chain" resume=true \
    chain.generator.checkpoint="$GEN" chain.encoder.checkpoint=null chain.align_mask.checkpoint=null \
    "chain.encoder.overrides=$(quoted evaluate=false "${LPIPS[@]}" "${E4E_EXTRA[@]}")" \
    "chain.align_mask.overrides=$(quoted evaluate=false "${LPIPS[@]}" "model.edit.direction=$OUT/smile.pt" \
                                  "${S2_EXTRA[@]}")" \
    "${LPIPS[@]}" "${EDIT[@]}" "$@"

# 3. stage 2 without mask labels on the same encoder
ENCODER=$OUT/chain/stage_encoder/encoder.pt
[[ -f $OUT/unsupervised/align_mask.pt ]] || "$PY" experiments/run.py +exp=ood_blend_unsupervised \
    paths.run_dir="$OUT/unsupervised" resume=true model.encoder_checkpoint="$ENCODER" \
    "${LPIPS[@]}" "model.edit.direction=$OUT/smile.pt" "${S2_EXTRA[@]}"

# 4. the encoder on the clean validation images (the stage-1 choice between perceptual losses reads this)
"$PY" experiments/evaluate_stage1.py --encoder "$ENCODER" --split val --n 500 --projection-n 0 \
    --direction "$OUT/smile.pt" \
    --out "$OUT/stage1_val.md"
echo "refit_synthfaces: done; hand-offs in $OUT (chain/stage_encoder/encoder.pt, chain/stage_align_mask/align_mask.pt,"
echo "unsupervised/align_mask.pt, smile.pt); stage-3 metrics in $OUT/chain/metrics/"
