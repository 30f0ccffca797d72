#!/usr/bin/env bash
# Builds, on a machine with Rust and the package registries, everything tools/gpu_check.sh needs
# on a GPU machine that has neither: release binaries of prism, the test suite and the benches
# (built with --release, so the CPU references in the tests run fast), the Vulkan loader as
# .deb files (for a machine whose driver came without it), and MNIST. The result is one
# compressed archive, small enough to carry to the GPU machine:
#
#   tools/gpu_bundle.sh [OUT.tar.xz]          default target/gpu-bundle.tar.xz
#
# On the GPU machine, from a checkout of the same commit (the tests read files of the tree):
#
#   tools/gpu_check.sh target/gpu-bundle.tar.xz [RESULTS.md]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bundle.tar.xz}"
stage="target/gpu-bundle"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/tests" "$stage/benches" "$stage/debs" "$stage/data"

say() { echo "[bundle] $*"; }

# The test harnesses (not examples) that a cargo build reports, as "name path" lines.
executables() {
    cargo "$@" --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["profile"]["test"]):
        print(m["target"]["name"], m["executable"])'
}

say "release binary"
cargo build --release --bin prism
cp target/release/prism "$stage/bin/"
say "test binaries (cargo test --release --no-run)"
# Only the tests that open an adapter: the library's unit tests, the decoders' fuzzing, shader
# validation (naga), the data loaders and the documents' checks need no GPU and ran here.
executables test --release --no-run | while read -r name path; do
    case "$name" in prism | fuzz_decoders | shaders_validate | data_loaders | docs) continue ;; esac
    cp "$path" "$stage/tests/$name"
done
say "bench binaries (cargo bench --no-run)"
executables bench --no-run --bench kernels --bench pipeline | while read -r name path; do
    cp "$path" "$stage/benches/$name"
done
# The tests find the tree's files (README, tests/data, tools/) by the path they were built in;
# gpu_check.sh links that path to the checkout it runs in.
pwd > "$stage/manifest_dir.txt"
git rev-parse HEAD > "$stage/commit.txt" 2>/dev/null || true

say "Vulkan loader .deb files"
( cd "$stage/debs" && apt-get download libvulkan1 >/dev/null 2>&1 ) \
    || say "apt-get download libvulkan1 failed: the GPU machine must have the loader"

say "MNIST"
for d in ../shared/data/mnist data/mnist "$HOME/.cache/prism/data/mnist"; do
    if [ -f "$d/train-images-idx3-ubyte.gz" ]; then
        mkdir -p "$stage/data/mnist" && cp "$d"/*.gz "$stage/data/mnist/" && break
    fi
done
[ -d "$stage/data/mnist" ] || say "no MNIST found: run 'prism fetch mnist' first"

strip "$stage"/bin/* "$stage"/tests/* "$stage"/benches/* 2>/dev/null || true
# xz: the binaries shrink five-fold (about 32 MB in all), and xz-utils is on every Debian.
tar -C target -cf - gpu-bundle | xz -9 -T0 > "$out"
say "$out: $(du -h "$out" | cut -f1)"
