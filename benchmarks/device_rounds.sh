#!/usr/bin/env bash
# Every row of the speed issue's table on one GPU, in parts that each fit a 10-minute device call.
#
# usage: benchmarks/device_rounds.sh PART OUT_DIR
#   PART compile  the compiled LoRA row (grafting, two rounds, profiled; a round compiles the bound and the
#                 variant; cut at 330 s, the rounds measured are kept); the 1.1B LoRA inference forward
#                 profiled (one round); 8B LoRA and DoRA profiled (one round)
#   PART eager    1.1B: LoRA (training and inference profiled), bf16 adapters, dropout, DoRA (grafting and PEFT);
#                 then dropout and DoRA again with the Triton kernels on; then the MoE row beside PEFT, profiled
#   PART kernels  the GPU cases of the Triton kernels (GRAFTING_TRITON_KERNELS=1), whole reports kept, and
#                 their per-layer node scripts; then where the MoE and LoRA steps synchronise (sync_probe.py)
# Each step has its own time limit and the whole part stops starting steps past 560 s, so a part's files
# come back whole. Run from the checkout's root with grafting's sources on PYTHONPATH (or installed); on
# PYTHONPATH, the plugins' entry points are written to a temporary folder put in front of it.
set -u
part=$1 out=$2
mkdir -p "$out"
start=$SECONDS
# plugins on PYTHONPATH but not installed: their entry points from the checkout's pyproject files, so that
# get_peft_model finds them (benchmarks/source_entry_points.py)
if ! python -c "import importlib.metadata as m, sys; sys.exit(not list(m.entry_points(group='grafting')))"; then
  points=$(mktemp -d)
  python benchmarks/source_entry_points.py "$points" > /dev/null
  export PYTHONPATH="$points${PYTHONPATH:+:$PYTHONPATH}"
fi
step() {  # step SECONDS NAME COMMAND...: COMMAND's output to OUT/NAME.txt, cut at SECONDS or the part's end
  local limit=$1 name=$2 left=$((560 - (SECONDS - start)))
  shift 2
  if [ "$left" -lt 30 ]; then echo "== $name skipped: the part's time is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name rc=$? after $((SECONDS - start)) s"
  grep -E "^\| |^--- profile|host wall|^  (GEMM|elementwise|casts|other|total) " "$out/$name.txt" || tail -5 "$out/$name.txt"
}
bound=(python benchmarks/bound.py --rounds 3)
case $part in
  compile)
    step 330 compile "${bound[@]}" --rounds 2 --preset 1b --part compile --methods lora --libs grafting \
      --profile lora:grafting --json "$out/compile.jsonl"
    step 90 1b-inference "${bound[@]}" --rounds 1 --preset 1b --methods lora --libs grafting \
      --profile lora:grafting:inference --json "$out/1b-inference.jsonl"
    step 130 8b "${bound[@]}" --rounds 1 --preset 8b --methods lora,dora --libs grafting \
      --profile lora:grafting,dora:grafting --json "$out/8b.jsonl" ;;
  eager)
    step 230 1b "${bound[@]}" --preset 1b --methods lora,lora-bf16,lora-dropout,dora --libs grafting,peft \
      --profile lora:grafting,lora:grafting:inference,dora:grafting,lora-dropout:grafting --json "$out/1b.jsonl"
    step 120 1b-triton env GRAFTING_TRITON_KERNELS=1 "${bound[@]}" --preset 1b --methods lora-dropout,dora \
      --libs grafting --profile dora:grafting,lora-dropout:grafting --json "$out/1b-triton.jsonl"
    step 150 moe "${bound[@]}" --preset moe --methods lora-moe --libs grafting,peft --profile lora-moe:grafting,bound \
      --json "$out/moe.jsonl" ;;
  kernels)
    export TRITON_INTERPRET=0 GRAFTING_TRITON_KERNELS=1
    step 200 kernel-cases python -m pytest -q -p no:cacheprovider -p no:xdist --tb=long \
      plugins/lora/tests/dropout_kernel_cases.py plugins/lora/tests/test_lora_dora_kernels.py \
      plugins/lora/tests/test_lora_fused_kernels.py plugins/lora/tests/test_lora_dora_node.py
    step 60 dora-node python benchmarks/dora_node.py
    step 60 dropout-node python benchmarks/dropout_node.py
    step 120 sync-probe python benchmarks/sync_probe.py --preset moe --methods lora-moe,lora --layers 2 ;;
  *) echo "unknown part $part (compile, eager, kernels)" >&2; exit 2 ;;
esac
