#!/usr/bin/env bash
# A/B of two source trees of grafting on one GPU, in alternating rounds (one process per tree per round).
#
# usage: benchmarks/ab_trees.sh OLD_TREE NEW_TREE ROUNDS OUT_PREFIX -- BOUND_ARGS...
#   OLD_TREE / NEW_TREE: folders holding core/, plugins/ (and contrib/) of each version, e.g. one made with
#   `git archive <commit> core plugins contrib | tar -x -C old/`; "." is this checkout.
#   Each round runs benchmarks/bound.py (this checkout's) once with OLD_TREE's sources and once with
#   NEW_TREE's (old first in odd rounds, new first in even ones), each measuring its own bound, so every ratio is against a bound of the same process;
#   rows go to OUT_PREFIX-old.jsonl and OUT_PREFIX-new.jsonl. Run it from the checkout's root.
set -euo pipefail
old=$1 new=$2 rounds=$3 prefix=$4
shift 4
[ "${1:-}" = "--" ] && shift
sources() { (cd "$1" && ls -d "$PWD"/core/src "$PWD"/plugins/*/src "$PWD"/contrib/*/src 2>/dev/null | tr '\n' ':'); }
old_path=$(sources "$old")
new_path=$(sources "$new")
for round in $(seq 1 "$rounds"); do
  order="old new"
  [ $((round % 2)) -eq 0 ] && order="new old"  # neither tree always first
  for side in $order; do
    path=$old_path
    [ "$side" = new ] && path=$new_path
    echo "### round $round, $side tree" >&2
    PYTHONPATH="$path" python benchmarks/bound.py --json "$prefix-$side.jsonl" "$@"
  done
done
