# How gpu_check.sh splits its time budget among its stages; sourced by it (and by tests/test_benchmarks.py, which
# checks the arithmetic without a GPU). The caller sets BUDGET (seconds for the whole run), START (its start, epoch
# seconds) and STAGES (the selected stages).

# Each timed stage's cap in seconds, which is also its weight when the budget is split (see allowance).
declare -A CAP=([build]=240 [tests]=${GPU_TESTS_CAP_S:-180} [kernels]=120 [e2e]=150 [bench]=150 [sanitize]=90)
STAGE_ORDER=(build tests kernels e2e bench sanitize)  # the order gpu_check.sh runs them in
# Kept back from the stages: a capped stage may run 15 s past its SIGINT (see capped), then the summary and packing.
RESERVE=30

elapsed() { echo $(( $(date +%s) - START )); }
wants() { [[ " $STAGES " == *" $1 "* ]]; }

# Seconds stage $1 may run: the budget left (less the reserve) split among it and the selected stages still to come
# in proportion to their caps, and never more than its own cap. Even if every stage ran to its allowance, they would
# not add up to more than the budget; time a stage leaves unused goes to the ones after it.
allowance() {
  local left=$(( BUDGET - $(elapsed) - RESERVE )) weights=0 stage later=
  for stage in "${STAGE_ORDER[@]}"; do
    [[ $stage == "$1" ]] && later=1
    [[ -n $later ]] && wants "$stage" && (( weights += CAP[$stage] ))
  done
  local share=$(( left * CAP[$1] / weights ))
  (( share < CAP[$1] )) && echo "$share" || echo "${CAP[$1]}"
}
