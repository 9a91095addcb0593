#!/usr/bin/env bash
# Fuzz smoke run for CI: builds every cargo-fuzz target once, then fuzzes each for a short
# time starting from a temporary copy of its committed seed corpus (fuzz/corpus/<target>),
# so the repository stays clean. Exits non-zero if any target crashed, hung, ran out of
# memory or failed to build.
#
# Environment:
#   FUZZ_SECONDS  fuzzing time per target (default 15)
#   FUZZ_TIMEOUT  seconds one input may take before it counts as a hang (default 10)
#   FUZZ_TARGETS  space-separated subset of targets (default: every target)
#   CARGO_BUILD_JOBS is honoured by the build as usual.
#
# Crashing inputs are kept in fuzz/artifacts/<target>/ (git-ignored); reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
set -uo pipefail

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-15}
timeout=${FUZZ_TIMEOUT:-10}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
start=$SECONDS

# cargo-fuzz passes -Zsanitizer=address; the toolchain is pinned to stable.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    # Outside the repository, so the install does not depend on (or touch) its workspace.
    (cd "${TMPDIR:-/tmp}" && cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked) || {
        echo "cargo-fuzz installation failed" >&2
        exit 2
    }
fi

if [[ -n ${FUZZ_TARGETS:-} ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi
if ((${#targets[@]} == 0)); then
    echo "no fuzz targets found" >&2
    exit 2
fi

echo "== building ${#targets[@]} targets: ${targets[*]}"
if ! cargo fuzz build; then
    echo "build failed"
    echo "0 passed, ${#targets[@]} failed"
    exit 1
fi
echo "== built in $((SECONDS - start)) s"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sluice-fuzz-smoke.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Last value of a libFuzzer final statistic, e.g. stat 'average_exec_per_sec' log.
stat() { sed -n "s/^stat::$1: *\([0-9]*\).*/\1/p" "$2" | tail -n 1; }

passed=0
failed=0
summary=()
for t in "${targets[@]}"; do
    corpus="$tmp/corpus/$t"
    mkdir -p "$corpus"
    if [[ -d fuzz/corpus/$t ]]; then
        cp -R "fuzz/corpus/$t/." "$corpus/"
    fi
    seeds=$(find "$corpus" -type f | wc -l)
    fuzzer_args=(-max_total_time="$seconds" -rss_limit_mb=2048 -timeout="$timeout" -print_final_stats=1)
    [[ -f fuzz/dicts/$t.dict ]] && fuzzer_args+=(-dict="fuzz/dicts/$t.dict")
    log="$tmp/$t.log"
    echo "== fuzzing $t for ${seconds} s from $seeds seeds"
    t0=$SECONDS
    cargo fuzz run "$t" "$corpus" -- "${fuzzer_args[@]}" >"$log" 2>&1
    rc=$?
    took=$((SECONDS - t0))

    execs=$(stat number_of_executed_units "$log")
    if [[ -z $execs ]]; then
        # No final statistics (crash): use the last "#<runs>" status line.
        execs=$(grep -aoE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
    fi
    per_sec=$(stat average_exec_per_sec "$log")
    fuzzed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
    units=$(find "$corpus" -type f | wc -l)
    # Wall time includes any rebuild `cargo fuzz run` had to do (sources changed since the build).
    stats="${execs:-?} execs (${per_sec:-?}/s), fuzzed ${fuzzed:-?} s, wall ${took} s, corpus $seeds -> $units"

    if ((rc == 0)); then
        passed=$((passed + 1))
        line="$t: ok, $stats"
    else
        failed=$((failed + 1))
        what=$(grep -aoE 'ERROR: libFuzzer: [a-z -]+|ERROR: AddressSanitizer: [a-zA-Z-]+|panicked at [^ ]+' "$log" | head -n 1)
        artifact=$(grep -aoE '(Test unit|input) written to [^ ]+' "$log" | head -n 1 | sed 's/.* written to //')
        line="$t: FAILED (exit $rc${what:+: $what}${artifact:+; input: $artifact}), $stats"
        echo "---- last lines of the $t log ----"
        tail -n 60 "$log"
        echo "----"
    fi
    echo "$line"
    summary+=("$line")
done

echo "== summary ($((SECONDS - start)) s)"
printf '%s\n' "${summary[@]}"
echo "$passed passed, $failed failed"
((failed == 0))
