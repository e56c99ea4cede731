#!/usr/bin/env bash
# Find or build a llama-server binary for swapproxy's tests and demos.
#
# Usage:
#   scripts/build_llama_server.sh [CACHE_DIR]              print the path of a working llama-server
#   scripts/build_llama_server.sh --vocab-dir [CACHE_DIR]  print the directory of vocab-only GGUFs
#
# The answer is always the LAST line on stdout; everything else goes to stderr.
#
# llama-server is looked up in this order:
#   1. $LLAMA_SERVER, if it names an executable file;
#   2. llama-server on $PATH;
#   3. CACHE_DIR/llama-server/bin/llama-server, if it runs `--version` and was built from the
#      pinned llama-cpp-python version (first line of CACHE_DIR/llama-server/VERSION);
#   4. otherwise it is built from the llama.cpp sources vendored in the llama-cpp-python sdist
#      (downloaded with pip from PyPI; no other network access) and installed into the cache.
#
# --vocab-dir never builds: it only needs the sdist, from which it unpacks
# vendor/llama.cpp/models/ggml-vocab-*.gguf into CACHE_DIR/llama-server/vocab/ (once).
#
# CACHE_DIR defaults to $SWAPPROXY_CACHE, then ~/.cache/swapproxy.
#
# Environment:
#   PYTHON                     interpreter whose pip downloads the sdist (default: python3)
#   LLAMA_CPP_PYTHON_VERSION   sdist version to build from (default: the pin below)
#   LLAMA_BUILD_JOBS           parallel compile jobs (default: nproc)
#   LLAMA_CMAKE_ARGS           extra arguments for the cmake configure step
#   LLAMA_BUILD_VERBOSE=1      stream cmake/compiler output to stderr (default: only into
#                              CACHE_DIR/llama-server/build.log, whose tail is shown on failure)
#
# Building needs cmake, a C++ compiler and make (Debian: apt-get install -y build-essential cmake).
# It takes about 5 minutes on 2 cores (306 s measured, 273 s of it compiling; the server's own
# sources dominate).

set -euo pipefail

# Verified to build and serve with scripts/make_tiny_gguf.py models. Bump deliberately: the
# cache is rebuilt when this changes.
PINNED_VERSION=0.3.36

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-$PINNED_VERSION}"
PYTHON="${PYTHON:-python3}"

log() { printf 'build_llama_server: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
}

mode=server
cache_arg=""
while [ $# -gt 0 ]; do
    case "$1" in
        --vocab-dir) mode=vocab ;;
        -h|--help) usage; exit 0 ;;
        -*) usage; die "unknown option: $1" ;;
        *)
            [ -z "$cache_arg" ] || die "only one CACHE_DIR may be given (got '$cache_arg' and '$1')"
            cache_arg="$1"
            ;;
    esac
    shift
done

cache_root="${cache_arg:-${SWAPPROXY_CACHE:-$HOME/.cache/swapproxy}}"
case "$cache_root" in
    /*) ;;
    *) cache_root="$PWD/$cache_root" ;;
esac
prefix="$cache_root/llama-server"
cached_bin="$prefix/bin/llama-server"
vocab_dir="$prefix/vocab"
version_file="$prefix/VERSION"
build_log="$prefix/build.log"

work=""
cleanup() { if [ -n "$work" ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

absolute() {
    # Absolute path of an existing file, without resolving the final symlink.
    printf '%s/%s\n' "$(cd "$(dirname "$1")" && pwd -P)" "$(basename "$1")"
}

# Serialise builds and downloads between concurrent callers (e.g. parallel CI jobs).
lock_cache() {
    mkdir -p "$prefix" || die "cannot create cache directory $prefix"
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$prefix/.lock"
        if ! flock -n 9; then
            log "waiting for another build_llama_server.sh using $prefix"
            flock 9
        fi
    fi
}

cached_bin_ok() {
    [ -x "$cached_bin" ] && [ -f "$version_file" ] || return 1
    [ "$(head -n 1 "$version_file")" = "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" ] || return 1
    "$cached_bin" --version >/dev/null 2>&1
}

have_vocab() {
    compgen -G "$vocab_dir/ggml-vocab-*.gguf" >/dev/null
}

new_workdir() {
    if [ -z "$work" ]; then
        work="$(mktemp -d "${TMPDIR:-/tmp}/swapproxy-llama.XXXXXX")"
    fi
}

# Download the llama-cpp-python sdist into $work (call new_workdir first) and print its path.
fetch_sdist() {
    "$PYTHON" -m pip --version >/dev/null 2>&1 \
        || die "$PYTHON has no pip; set PYTHON to a venv's python, or apt-get install -y python3-pip"
    log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI (~77 MB)"
    local started=$SECONDS
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work/sdist" >&2 \
        || die "pip download of llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed"
    local tarball
    tarball="$(compgen -G "$work/sdist/llama_cpp_python-*.tar.gz" | head -n 1)" \
        || die "pip download left no llama_cpp_python-*.tar.gz in $work/sdist"
    log "downloaded $(basename "$tarball") in $((SECONDS - started))s"
    printf '%s\n' "$tarball"
}

# Copy ggml-vocab-*.gguf from an unpacked llama.cpp models/ directory into the cache, atomically.
install_vocab() {
    local models="$1"
    have_vocab && return 0
    local staging
    staging="$(mktemp -d "$prefix/.vocab.XXXXXX")"
    chmod 755 "$staging"
    cp "$models"/ggml-vocab-*.gguf "$staging/"
    chmod 644 "$staging"/*.gguf
    rm -rf "$vocab_dir"
    mv -T "$staging" "$vocab_dir"
    log "installed $(ls "$vocab_dir" | wc -l) vocab files into $vocab_dir"
}

ensure_vocab() {
    have_vocab && return 0
    lock_cache
    have_vocab && return 0
    local tarball
    new_workdir
    tarball="$(fetch_sdist)"
    mkdir -p "$work/src"
    tar -xzf "$tarball" -C "$work/src" --wildcards --no-anchored \
        'vendor/llama.cpp/models/ggml-vocab-*.gguf'
    install_vocab "$(compgen -G "$work/src/*/vendor/llama.cpp/models" | head -n 1)"
}

check_build_tools() {
    local missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 || missing+=(make)
    command -v "${CXX:-c++}" >/dev/null 2>&1 || missing+=("${CXX:-c++}")
    command -v "${CC:-cc}" >/dev/null 2>&1 || missing+=("${CC:-cc}")
    if [ ${#missing[@]} -gt 0 ]; then
        log "missing build tools: ${missing[*]}"
        log "install them with:  sudo apt-get install -y build-essential cmake"
        log "or point LLAMA_SERVER at an existing llama-server binary"
        exit 1
    fi
}

# Run a build step with its output in $build_log (and on stderr if LLAMA_BUILD_VERBOSE=1).
run_step() {
    local name="$1"
    shift
    local started=$SECONDS status=0
    log "$name ..."
    printf '\n$ %s\n' "$*" >>"$build_log"
    if [ "${LLAMA_BUILD_VERBOSE:-0}" = 1 ]; then
        "$@" 2>&1 | tee -a "$build_log" >&2 || status=$?
    else
        "$@" >>"$build_log" 2>&1 || status=$?
    fi
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$build_log" >&2
        die "$name failed (exit $status); full log: $build_log"
    fi
    log "$name done in $((SECONDS - started))s"
}

build_server() {
    check_build_tools
    local total_started=$SECONDS
    local tarball src llama jobs
    new_workdir
    tarball="$(fetch_sdist)"
    mkdir -p "$work/src"
    tar -xzf "$tarball" -C "$work/src"
    src="$(compgen -G "$work/src/llama_cpp_python-*" | head -n 1)"
    llama="$src/vendor/llama.cpp"
    [ -f "$llama/CMakeLists.txt" ] || die "$(basename "$tarball") has no vendor/llama.cpp/CMakeLists.txt"
    jobs="${LLAMA_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    : >"$build_log"

    local generator=()
    if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi

    # Portable rather than -march=native: GGML_NATIVE=OFF still enables SSE4.2/AVX/AVX2/FMA/F16C/
    # BMI2 on x86-64 (any Haswell/Zen or newer), so the cache can move between similar machines.
    # Everything of llama.cpp is linked statically; no OpenMP/OpenSSL runtime is needed, and the
    # web UI is neither built (npm) nor downloaded (Hugging Face) - the API works without it.
    # shellcheck disable=SC2086  # LLAMA_CMAKE_ARGS is a word list on purpose
    run_step "cmake configure" cmake -S "$llama" -B "$work/build" "${generator[@]}" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF \
        -DGGML_OPENMP=OFF \
        -DGGML_CCACHE=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_COMMON=ON \
        -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        ${LLAMA_CMAKE_ARGS:-}
    run_step "compile llama-server with $jobs jobs (about 5 minutes on 2 cores)" \
        cmake --build "$work/build" --target llama-server -j "$jobs"

    local built="$work/build/bin/llama-server"
    [ -x "$built" ] || die "build finished but $built is missing; see $build_log"
    local version_out
    version_out="$("$built" --version 2>&1)" || die "freshly built llama-server --version failed: $version_out"

    # Install: copy next to the destination, then rename over it, so a reader never sees half a file.
    mkdir -p "$prefix/bin"
    cp "$built" "$prefix/bin/.llama-server.tmp.$$"
    chmod 755 "$prefix/bin/.llama-server.tmp.$$"
    mv -f "$prefix/bin/.llama-server.tmp.$$" "$cached_bin"
    install_vocab "$llama/models"
    {
        printf 'llama-cpp-python==%s\n' "$LLAMA_CPP_PYTHON_VERSION"
        printf '%s\n' "$version_out"
    } >"$version_file.tmp.$$"
    mv -f "$version_file.tmp.$$" "$version_file"
    log "built llama-server in $((SECONDS - total_started))s: $cached_bin"
}

find_server() {
    if [ -n "${LLAMA_SERVER:-}" ]; then
        [ -f "$LLAMA_SERVER" ] && [ -x "$LLAMA_SERVER" ] \
            || die "LLAMA_SERVER=$LLAMA_SERVER is not an executable file; unset it to build one"
        absolute "$LLAMA_SERVER"
        return
    fi
    local on_path
    if on_path="$(command -v llama-server 2>/dev/null)" && [ -n "$on_path" ]; then
        absolute "$on_path"
        return
    fi
    if cached_bin_ok; then
        printf '%s\n' "$cached_bin"
        return
    fi
    lock_cache
    if ! cached_bin_ok; then
        log "no usable llama-server in \$LLAMA_SERVER, \$PATH or $prefix; building one"
        build_server
    fi
    printf '%s\n' "$cached_bin"
}

case "$mode" in
    server) find_server ;;
    vocab)
        ensure_vocab
        printf '%s\n' "$vocab_dir"
        ;;
esac
