#!/usr/bin/env bash
# Keep the records of a table's finished runs in the repository, or put them back to continue the table:
#
#   bash scripts/runs.sh keep <table>      multirun/tables/<table>  ->  docs/experiments/runs/<table>
#   bash scripts/runs.sh restore <table>   docs/experiments/runs/<table>  ->  multirun/tables/<table>
#
# A record is what `report` reads and the sweep's resume checks, per finished job (a folder with results.json):
# results.json, config.yaml, versions.json and a detector's per-input scores.csv (for the ROC figures and any
# other operating point; ~70 kB at 3,000 test inputs); no weights, plots or logs. Unfinished and failed jobs are
# not kept. From the records alone, `python -m backdoorbench report docs/experiments/runs/<table>` prints
# the table again; after `restore`, `bash scripts/tables.sh <table> ...` (same overrides) skips the recorded
# jobs and runs only the rest, so a table measured over several machines or sessions grows in one place.
# Neither direction overwrites a results.json that is already there.
set -euo pipefail
usage="usage: bash scripts/runs.sh keep|restore <table>"
action=${1:?$usage}
table=${2:?$usage}
runs=multirun/tables/$table
kept=docs/experiments/runs/$table
case $action in
    keep) src=$runs dst=$kept ;;
    restore) src=$kept dst=$runs ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
if [ ! -d "$src" ]; then
    echo "no folder $src: nothing to $action for table '$table' (run from the repository root)" >&2
    exit 2
fi
copied=0 skipped=0
while IFS= read -r -d '' res; do
    job=$(dirname "${res#"$src"/}")
    if [ -e "$dst/$job/results.json" ]; then
        skipped=$((skipped + 1))
        continue
    fi
    mkdir -p "$dst/$job"
    for f in config.yaml versions.json scores.csv results.json; do  # results.json last: a job is done only when it is there
        if [ -e "$src/$job/$f" ]; then cp "$src/$job/$f" "$dst/$job/$f"; fi
    done
    copied=$((copied + 1))
done < <(find "$src" -name results.json -print0 | sort -z)
echo "$action $table: $copied run(s) copied to $dst, $skipped already there"
