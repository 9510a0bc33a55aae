#!/usr/bin/env bash
# CI step: runs every fuzz target briefly (FUZZ_SECONDS each, default 60) and fails on any
# crash, hang (-timeout) or allocation beyond -rss_limit_mb. Works from a fresh clone:
# installs cargo-fuzz (and qemu-utils for the seed corpora) when missing, generates the
# git-ignored corpora with make-corpus.sh. Uses the nightly toolchain when there is one;
# without it (a new machine of this project's kind has only stable, and cannot fetch
# another) it builds with the default toolchain, which serves `-s none`: cargo-fuzz's
# coverage instrumentation uses stable -C flags, only the sanitizers need nightly.
#
#   bash fuzz/ci.sh                       # all targets, 60 s each, no sanitizer
#   FUZZ_SECONDS=300 FUZZ_SANITIZER=address bash fuzz/ci.sh qcow2_model
#
# Without a sanitizer the targets build and run several times faster and use far less
# memory; Rust code needs ASan only for `unsafe` bugs, and panics, hangs and model
# mismatches are caught either way.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-none}
start=$(date +%s)

if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=(+nightly)
elif [ "$sanitizer" = none ]; then
    echo "fuzz/ci.sh: no nightly toolchain ('cargo +nightly --version' fails): building with" \
        "$(cargo --version) and no sanitizer"
    toolchain=()
else
    echo "fuzz/ci.sh: FUZZ_SANITIZER=$sanitizer needs the nightly toolchain, and" \
        "'cargo +nightly --version' fails (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
fuzz() { cargo "${toolchain[@]}" fuzz "$@"; }
missing=0
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "fuzz/ci.sh: installing qemu-utils (seed corpora)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils
    else
        echo "fuzz/ci.sh: qemu-img/qemu-io missing (apt-get install qemu-utils)" >&2
        exit 1
    fi
fi

./make-corpus.sh

# Every [[bin]] of Cargo.toml, in file order.
mapfile -t targets < <(fuzz list)
if [ $# -gt 0 ]; then
    targets=("$@")
fi

echo "fuzz/ci.sh: building ${targets[*]} (sanitizer $sanitizer)"
fuzz build -s "$sanitizer"
built=$(date +%s)

# Per-target libFuzzer options: model inputs are op lists (4 KiB is 64 ops with room to
# spare); the image targets take their size limits from the seed corpora.
opts_for() {
    case "$1" in
        qcow2_model) echo "-max_len=4096" ;;
        nbd_server) echo "-max_len=65536" ;;
        *) echo "" ;;
    esac
}

failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "fuzz/ci.sh: $t for ${seconds}s"
    # shellcheck disable=SC2046
    if ! fuzz run -s "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 $(opts_for "$t") 2>"artifacts/$t/ci.log"; then
        failed+=("$t")
        echo "fuzz/ci.sh: $t FAILED; the last lines of its log:" >&2
        tail -n 60 "artifacts/$t/ci.log" >&2
    fi
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^Done ' "artifacts/$t/ci.log" \
        | sed "s/^/  $t: /" || true
done

end=$(date +%s)
echo "fuzz/ci.sh: build $((built - start)) s, total $((end - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/ci.sh: crashes in ${failed[*]}: inputs in fuzz/artifacts/<target>/ (see fuzz/README.md)" >&2
    exit 1
fi
echo "fuzz/ci.sh: ${#targets[@]} targets ran without a crash"
