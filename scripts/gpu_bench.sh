#!/usr/bin/env bash
# The GPU benchmarks of this tree, one after another (never two on the card at once), each
# under its own time limit; outputs (logs, JSON, CSV) go to $OUT (default ./gpu-out).
#   scripts/gpu_bench.sh [STEP ...]   steps: decode train quant epilogue ab tma int4split forward tune
#   (default: decode train quant epilogue ab)
# OLD_TREE: a source tree to A/B against (step ab; skipped when unset; AB_ROUNDS, AB_REPS: its
# rounds and reps, default 2 and 10; 4 rounds resolve about 1 % where a cell is steady).
# Step tma: this tree's bf16 layers with the weights by pointers (JAXMOE_TMA=0) against TMA (=1), alternated
# (bench/ab.py, AB_ROUNDS / AB_REPS), on TMA_MODELS at TMA_MS: what a card's table should say of the tma flag.
# Step int4split: the int4 layers (SPLIT_QUANTS) with JAXMOE_INT4_SPLIT=0 against =1, alternated, on SPLIT_MODELS at
# SPLIT_MS (SPLIT_S seconds each).
# Time limits in seconds: DECODE_S, TRAIN_S, TRAIN_PEER_S, QUANT_S (each scheme of QUANTS), EPILOGUE_S, AB_S, TMA_S, FORWARD_S,
# TUNE_S. Step tune: one `python -m jaxmoe tune` per model of TUNE_MODELS side by side, timing one at a
# time under a lock, over the M values of TUNE_MS in that order, into $out/configs/<arch>-<device>.json
# (winners are written as they come, so a run cut by TUNE_S keeps them); logs in $out/tune-logs.tar.gz.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # a step cut by its time limit keeps its log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/*.py import this tree's jaxmoe
py="${PYTHON:-python3}"
steps=("$@"); [[ ${#steps[@]} == 0 ]] && steps=(decode train quant epilogue ab)
status=0

step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$out/$name.log" 2>&1; local rc=$?
    echo "== $name rc=$rc ($((SECONDS - t0)) s)"; tail -n "${TAIL:-30}" "$out/$name.log"
    [[ $rc == 0 ]] || status=1
}

for s in "${steps[@]}"; do
    case $s in
    decode) step decode "${DECODE_S:-110}" "$py" bench/decode_bench.py --model qwen3-30b-a3b --model mixtral-8x7b \
                --m 1 --m 2 --m 4 --m 8 --m 16 --m 32 --m 64 --reps 20 ;;
    # jaxmoe at both sizes first; lax.ragged_dot's autodiff (minutes at M = 16384) at M = 4096 only
    train) step train "${TRAIN_S:-150}" "$py" -m jaxmoe bench --mode train --model mixtral-8x7b --model qwen3-30b-a3b \
                --m 4096 --m 16384 --impl jaxmoe --reps 5 --out "$out/train"
           step train-ragged_dot "${TRAIN_PEER_S:-120}" "$py" -m jaxmoe bench --mode train --model mixtral-8x7b \
                --model qwen3-30b-a3b --m 4096 --impl ragged_dot --reps 5 --out "$out/train-ragged_dot" ;;
    # QUANTS: weight schemes, each optionally with :ACT_QUANT (w8a8) and :fast (JAXMOE_FP8_FAST_ACCUM=1),
    # e.g. "int8 fp8:fp8 fp8:fp8:fast fp8_block:fp8"
    quant) for q in ${QUANTS:-fp8 int8 int4 mxfp4 fp8:fp8 int8:int8}; do
               IFS=: read -r w a fast <<<"$q"
               act=(); [[ -n $a ]] && act=(--act-quant "$a")
               models=(--model mixtral-8x7b --model qwen3-30b-a3b)
               [[ $w == fp8_block ]] && models=(--model deepseek-v3)
               name="quant-$w${a:+-a$a}${fast:+-$fast}"
               impl=jaxmoe  # with torch's fp8 peer where it has a kernel (row-wise fp8 w8a8)
               [[ ($w == fp8 || $w == fp8_tensor) && $a == fp8 ]] && impl=jaxmoe,torch
               JAXMOE_FP8_FAST_ACCUM=$([[ $fast == fast ]] && echo 1 || echo 0) \
               step "$name" "${QUANT_S:-170}" "$py" -m jaxmoe bench --quant "$w" "${act[@]}" "${models[@]}" \
                   --m 1 --m 16 --m 128 --m 1024 --m 4096 --impl "$impl" --reps 10 --out "$out/$name"
           done ;;
    epilogue) step epilogue "${EPILOGUE_S:-100}" "$py" bench/epilogue_cost.py --model gpt-oss-120b --m 1 --m 4096 \
                --reps 10 --rounds 2 --out "$out/epilogue_cost" ;;
    ab) if [[ -n ${OLD_TREE:-} ]]; then
            step ab "${AB_S:-150}" "$py" bench/ab.py --a "$OLD_TREE" --b . --model mixtral-8x7b --model qwen3-30b-a3b \
                --m 1 --m 128 --m 1024 --m 4096 --rounds "${AB_ROUNDS:-2}" --reps "${AB_REPS:-10}" --out "$out/ab.json"
        fi ;;
    tma) models=(); for m in ${TMA_MODELS:-mixtral-8x7b deepseek-v3 qwen3-30b-a3b}; do models+=(--model "$m"); done
         ms=(); for m in ${TMA_MS:-1024 4096}; do ms+=(--m "$m"); done
         step tma "${TMA_S:-400}" "$py" bench/ab.py --a . --b . --a-env JAXMOE_TMA=0 --b-env JAXMOE_TMA=1 \
             "${models[@]}" "${ms[@]}" --rounds "${AB_ROUNDS:-2}" --reps "${AB_REPS:-10}" --out "$out/tma.json" ;;
    # int4 / int4_zp layers with the activations' K tiles split (JAXMOE_INT4_SPLIT) against as stored, alternated
    int4split) models=(); for m in ${SPLIT_MODELS:-mixtral-8x7b qwen3-30b-a3b}; do models+=(--model "$m"); done
               ms=(); for m in ${SPLIT_MS:-1 16 1024}; do ms+=(--m "$m"); done
               for q in ${SPLIT_QUANTS:-int4 int4_zp}; do
                   step "int4split-$q" "${SPLIT_S:-300}" "$py" bench/ab.py --a . --b . --a-env JAXMOE_INT4_SPLIT=0 \
                       --b-env JAXMOE_INT4_SPLIT=1 --quant "$q" "${models[@]}" "${ms[@]}" \
                       --rounds "${AB_ROUNDS:-2}" --reps "${AB_REPS:-10}" --out "$out/int4split-$q.json"
               done ;;
    forward) step forward "${FORWARD_S:-150}" "$py" -m jaxmoe bench --model mixtral-8x7b --model qwen3-30b-a3b \
                --model deepseek-v3 --m 1 --m 16 --m 128 --m 1024 --m 4096 --reps 10 --out "$out/forward" ;;
    tune) mkdir -p "$out/configs"; logs=$(mktemp -d); t0=$SECONDS; pids=()
          ms=(); for m in ${TUNE_MS:-1024 4096 2048 8192 512 256 128 64 16 1}; do ms+=(--m "$m"); done
          for mdl in ${TUNE_MODELS:-mixtral-8x7b qwen3-30b-a3b deepseek-v3 mixtral-8x22b qwen3-235b-a22b gpt-oss-120b}; do
              timeout "${TUNE_S:-540}" "$py" -m jaxmoe tune --model "$mdl" "${ms[@]}" --reps "${TUNE_REPS:-5}" \
                  --lock "$logs/card.lock" --out "$out/configs" >"$logs/tune-$mdl.log" 2>"$logs/tune-$mdl.err" &
              pids+=($!)
          done
          for pid in "${pids[@]}"; do wait "$pid" || status=1; done; echo "== tune ($((SECONDS - t0)) s)"; cat "$logs"/tune-*.log | tee "$out/tune.log"
          tail -n 3 "$logs"/tune-*.err; tar -czf "$out/tune-logs.tar.gz" -C "$logs" . ;;
    *) echo "unknown step $s"; status=1 ;;
    esac
done
exit $status
