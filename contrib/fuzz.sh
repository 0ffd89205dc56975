#!/usr/bin/env bash
# Fuzz the header codec and the control-request parser with cargo-fuzz (libFuzzer).
#
#   contrib/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 600: the 10-minute quality bar; `contrib/fuzz.sh 30` for a
# quick run). TARGETs default to every target in fuzz/Cargo.toml (header, control).
# Installs cargo-fuzz if missing, builds, runs each target in turn, prints the executions
# per target, and exits non-zero if any target found a crash (naming the artifact).
#
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 unlocks the nightly flags cargo-fuzz uses.
# AddressSanitizer is used when it builds; otherwise (or with FUZZ_SANITIZER=none) the
# targets are built without a sanitizer, which still catches every Rust panic.
#   FUZZ_SANITIZER  address (default) | none | ...   (cargo fuzz --sanitizer)
#   FUZZ_ARGS       extra libFuzzer flags, e.g. "-jobs=2 -workers=2" or "-seed=1"
#
# Corpora grow in fuzz/corpus/TARGET (git-ignored) from the checked-in seeds in
# fuzz/seeds/TARGET; crashes land in fuzz/artifacts/TARGET (git-ignored); logs in
# fuzz/target/fuzz-logs. Reproduce a crash with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s SANITIZER TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-600}"
shift || true
case "$secs" in
  '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, not '$secs'" >&2; exit 2 ;;
esac

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

san="${FUZZ_SANITIZER:-address}"
echo "fuzz.sh: building the fuzz targets (sanitizer: $san)"
if ! cargo fuzz build -s "$san"; then
  if [ "$san" != none ] && [ -z "${FUZZ_SANITIZER:-}" ]; then
    echo "fuzz.sh: the $san sanitizer does not build here; falling back to --sanitizer none" >&2
    san=none
    cargo fuzz build -s "$san"
  else
    exit 1
  fi
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

# Longest input worth generating, per target (libFuzzer's default would be 4096).
max_len_for() {
  case "$1" in
    header) echo 8200 ;;   # two 4096-byte header copies, and a little more
    control) echo 5000 ;;  # past parse()'s 4096-byte request limit
    *) echo "" ;;
  esac
}

logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
failed=0
summary=()
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  dirs=("$corpus")
  [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
  flags=(-max_total_time="$secs" -print_final_stats=1 -timeout=10)
  [ -f "fuzz/dicts/$t.dict" ] && flags+=(-dict="fuzz/dicts/$t.dict")
  ml="$(max_len_for "$t")"
  [ -n "$ml" ] && flags+=(-max_len="$ml")
  # shellcheck disable=SC2206 # FUZZ_ARGS is a list of flags, split on purpose
  [ -n "${FUZZ_ARGS:-}" ] && flags+=(${FUZZ_ARGS})

  before="$(ls -1 "$artifacts" | sort)"
  log="$logs/$t.log"
  echo "fuzz.sh: running $t for ${secs}s (log: $log)"
  echo "  cargo fuzz run -s $san $t ${dirs[*]} -- ${flags[*]}"
  set +e
  cargo fuzz run -s "$san" "$t" "${dirs[@]}" -- "${flags[@]}" >"$log" 2>&1
  rc=$?
  set -e
  after="$(ls -1 "$artifacts" | sort)"
  new="$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed '/^$/d')"

  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  if [ -z "$execs" ]; then
    # Without final stats (a crash), take the last "#N" status line.
    execs="$(sed -n 's/^#\([0-9][0-9]*\).*/\1/p' "$log" | tail -1)"
  fi
  corpus_n="$(ls -1 "$corpus" | wc -l)"
  line="$t: ${execs:-?} executions in ${secs}s, corpus $corpus_n inputs"
  if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
    failed=1
    line="$line, FAILED (exit $rc)"
    echo "fuzz.sh: $t FAILED (exit $rc); end of its log:" >&2
    grep -v '# Uses:' "$log" | tail -40 >&2
    for a in $new; do
      echo "fuzz.sh: $t artifact: $artifacts/$a" >&2
      echo "  reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run -s $san $t $artifacts/$a" >&2
      line="$line, artifact $artifacts/$a"
    done
  fi
  echo "fuzz.sh: $line"
  summary+=("$line")
done

echo "fuzz.sh: summary"
for s in "${summary[@]}"; do echo "  $s"; done
if [ "$failed" -ne 0 ]; then
  echo "fuzz.sh: crashes found" >&2
  exit 1
fi
echo "fuzz.sh: no crashes"
