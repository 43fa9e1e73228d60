#!/usr/bin/env bash
# Regenerate one table of docs/results.md with 3 seeds (0, 1, 2), then report it (mean ± std and n per cell, the
# FRR each detector reached):
#
#   bash scripts/tables.sh <table> [extra overrides ...]
#
# tables: text_detect, vision_detect, repair (vision), repair_sensitivity (seed 0), repair_text, dbd, inspect, anp_clp (the embedded scale), the
# model-inspection zoos zoo_vision and zoo_text (configs/experiment/zoo_*.yaml: seeds are the zoo's own, see
# there) and the presets cpu_nad, cpu_rnp, cpu_dan_text, cpu_text_repair, dan_adaptive, dan_task_agnostic
# (configs/experiment/). Each sweep writes to
# multirun/tables/<table>/<part>: running the same command again skips the jobs whose results are there (the
# sweep machinery's resume, docs/cluster.md), so an interrupted table continues where it stopped. Extra
# overrides go to every sweep (e.g. hydra/launcher=slurm, threads=1); to continue a table, give the same ones again:
# all but launcher settings are part of each job's folder name and config. PARTS=<part>[,<part>] runs only those
# parts of a table (the folder names under multirun/tables/<table>), e.g. to split one table over two lanes. The
# report lands in multirun/tables/<table>.
set -euo pipefail
table=${1:?"usage: bash scripts/tables.sh <table> [overrides ...]; see the comment at the top"}
shift
PY=${PYTHON:-python}
out=multirun/tables/$table
sweep() {
    local part=$1
    shift
    if [ -n "${PARTS:-}" ] && [[ ",$PARTS," != *",$part,"* ]]; then return 0; fi  # PARTS=a,b: only these parts
    "$PY" -m backdoorbench run --multirun "$@" "seed=${SEEDS:-0,1,2}" "hydra.sweep.dir=$out/$part" "${EXTRA[@]}"
}
EXTRA=("$@")
case $table in
    text_detect)
        sweep main attack=badnet_rw,addsent,ripples,lwp,ep,dfep defense=dan,strip,onion,rap ++defense.lm_dtype=bfloat16 ;;
    vision_detect)
        sweep clean attack=badnets attack.poison_rate=0 defense=none
        sweep main attack=badnets,blended,wanet,label_consistent,sig,trojan defense=dan,strip ++defense.num_copies=20 ;;
    repair)
        sweep vision attack=badnets,blended,wanet defense=finetune,nad,rnp ;;
    repair_sensitivity)  # seed 0: one knob each (the reserve, the papers' steps per epoch); 3 seeds: cpu_nad, cpu_rnp
        SEEDS=0 sweep reserve attack=badnets,blended,wanet defense=finetune,nad,rnp defense.clean_fraction=null \
            defense.clean_size=500
        SEEDS=0 sweep steps attack=badnets,blended,wanet defense=finetune,nad ++defense.steps_per_epoch=40
        SEEDS=0 sweep steps_rnp attack=badnets,blended,wanet defense=rnp ++defense.steps_per_epoch=4 ;;
    repair_text)
        sweep text attack=badnet_rw,ripples defense=finetune,nad,anp
        sweep text_rnp attack=badnet_rw,ripples defense=rnp defense.curve_step=0.1 ;;
    dbd)
        sweep main attack=blended,wanet,label_consistent,badnets defense=dbd threads=1 ;;
    inspect)  # issue 36: the data-inspection defenses; DBD for reference (the other four attacks' DBD rows: table dbd)
        sweep vision attack=badnets,blended,wanet,label_consistent,sig,trojan \
            defense=activation_clustering,spectral,spectre,cube,abl
        sweep vision_dbd attack=sig,trojan defense=dbd threads=1
        sweep text attack=badnet_rw,addsent defense=activation_clustering,spectral,spectre,cube,bki,abl ;;
    anp_clp)
        sweep vision attack=badnets,blended,wanet defense=anp,clp threads=1 ;;
    zoo_vision)  # 10 clean + 12 backdoored victims (4 attacks; target 0 on seeds 0, 1; target 5 on seed 2)
        SEEDS=0,1,2,3,4,5,6,7,8,9 sweep clean +experiment=zoo_vision attack=badnets attack.poison_rate=0
        SEEDS=0,1 sweep backdoored +experiment=zoo_vision attack=badnets,blended,wanet,trojan
        SEEDS=2 sweep retargeted +experiment=zoo_vision attack=badnets,blended,wanet,trojan attack.target=5 ;;
    zoo_text)  # 5 clean + 5 backdoored victims (2 attacks; target 1 on seeds 0, 1; target 0 on seed 2)
        SEEDS=0,1,2,3,4 sweep clean +experiment=zoo_text attack=badnet_rw attack.poison_rate=0
        SEEDS=0,1 sweep backdoored +experiment=zoo_text attack=badnet_rw,addsent
        SEEDS=2 sweep retargeted +experiment=zoo_text attack=badnet_rw attack.target=0 ;;
    cpu_nad | cpu_rnp | cpu_dan_text | cpu_text_repair | dan_adaptive | dan_task_agnostic)
        sweep main "+experiment=$table" ;;
    *)
        echo "unknown table '$table': text_detect, vision_detect, repair, repair_sensitivity, repair_text, dbd, inspect, anp_clp, zoo_vision, zoo_text," \
            "cpu_nad, cpu_rnp, cpu_dan_text," \
            "cpu_text_repair, dan_adaptive, dan_task_agnostic" >&2
        exit 2 ;;
esac
"$PY" -m backdoorbench report "$out"
