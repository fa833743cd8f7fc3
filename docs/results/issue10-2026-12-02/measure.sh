#!/bin/sh
# Issue 10 side-by-side measurements (trainings paused while this runs).
set -u
cd /work/main
OUT=results/issue10
LB=/tmp/beacon-llamacpp/bin/llama-bench
B=target/release/beacon
M=/tmp/7b/qwen2-7b-q4_k_m.gguf
DEF=$HOME/.cache/beacon/SmolLM2-135M-Instruct.Q4_1.gguf
T="/usr/bin/time -v"
pkill -STOP -f 'beacon train'
sleep 2
echo "start $(date -u +%T)"
# 1. decode with one core busy, default model: beacon and llama.cpp, quiet then busy, two rounds
for round in 1 2; do
  for load in quiet busy; do
    YP=""
    if [ $load = busy ]; then yes > /dev/null & YP=$!; sleep 1; fi
    $B bench --lengths 128 --modes beacon:8 --decode 64 --repeats 3 --threads 2 \
      --json $OUT/busy-beacon-$load-$round.json --markdown $OUT/busy-beacon-$load-$round.md > /dev/null 2>&1
    $LB -m $DEF -t 2 --repack 0 -r 3 -p 0 -n 64 -d 128 -o json > $OUT/busy-llama-$load-$round.json 2> $OUT/busy-llama-$load-$round.err
    [ -n "$YP" ] && kill $YP
    echo "busy $round $load done $(date -u +%T)"
  done
done
# 2. the 7B-shaped Q4_K_M GGUF: load alone, then 4K prefill (full, beacon x8) and decode after it
$T $B run -m $M -p "Hi" -n 1 > $OUT/7b-beacon-load.log 2> $OUT/7b-beacon-load.time
$T $LB -m $M -t 2 --repack 0 -r 1 -p 8 -n 0 -o json > $OUT/7b-llama-load.json 2> $OUT/7b-llama-load.time
echo "loads done $(date -u +%T)"
$T $B bench -m $M --lengths 4096 --modes full,beacon:8 --decode 16 --repeats 1 --threads 2 \
  --json $OUT/7b-beacon.json --markdown $OUT/7b-beacon.md > $OUT/7b-beacon.log 2> $OUT/7b-beacon.time
echo "beacon 7b done $(date -u +%T)"
$T $LB -m $M -t 2 --repack 0 -r 1 -p 4096 -n 0 -fa 1 -o json > $OUT/7b-llama-prefill.json 2> $OUT/7b-llama-prefill.time
$T $LB -m $M -t 2 --repack 0 -r 1 -p 0 -n 16 -d 4096 -fa 1 -o json > $OUT/7b-llama-decode.json 2> $OUT/7b-llama-decode.time
echo "llama 7b done $(date -u +%T)"
pkill -CONT -f 'beacon train'
echo "end $(date -u +%T)"
