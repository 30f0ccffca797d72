#!/usr/bin/env bash
# The GPU check (issue 19): on a machine with a GPU and a Vulkan driver, but no network and no
# Rust, runs prism's prebuilt binaries (tools/gpu_bundle.sh) and writes one markdown file of
# results, in under 8 minutes:
#   - the adapter (`prism info`);
#   - the whole test suite on the GPU adapter, per test binary: passed, failed, seconds;
#   - the kernel benches with matmuls up to 4096^3 (masked vs dense f32 in the same run);
#   - the pipeline benches (generation and the training step);
#   - the paper's configuration (resnet32, batch 64, 10 clients, 2 rounds of 100 local
#     steps), timed per round;
#   - the same local step in tools/replica.py (PyTorch eager on CUDA), where torch is there.
#
#   tools/gpu_check.sh BUNDLE.tar.xz|BUNDLE_DIR [RESULTS.md]
#
# Run from a checkout of the bundle's commit. PRISM_CHECK_QUICK=1 shortens every part (for
# trying the script on a software adapter). Each part has a time limit; a part that fails or
# runs out of time is reported as such and the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
bundle="${1:?usage: tools/gpu_check.sh BUNDLE.tar.xz|BUNDLE_DIR [RESULTS.md]}"
results="${2:-gpu-check.md}"
quick="${PRISM_CHECK_QUICK:-0}"
start_all=$(date +%s)

if [ -f "$bundle" ]; then
    mkdir -p target
    tar -C target -xJf "$bundle" || { echo "cannot unpack $bundle"; exit 2; }
    bundle="target/gpu-bundle"
fi
bundle="$(cd "$bundle" && pwd)"

# The tests look for the tree where they were built: point that path at this checkout.
built="$(cat "$bundle/manifest_dir.txt")"
if [ "$built" != "$root" ] && [ ! -e "$built" ]; then
    mkdir -p "$(dirname "$built")" && ln -s "$root" "$built" \
        || echo "note: cannot link $built to $root; tests that read the tree's files will fail"
fi

# The CLI tests run the prism binary where it was built (target/release/prism of the tree).
if [ ! -x "$root/target/release/prism" ]; then
    mkdir -p "$root/target/release" && cp "$bundle/bin/prism" "$root/target/release/prism"
fi

# The Vulkan loader from the bundle's .deb files when the machine lacks it; NVIDIA's ICD
# manifest when the driver installed its library but no manifest (containers often do).
if ! ldconfig -p 2>/dev/null | grep 'libvulkan.so.1' >/dev/null; then
    mkdir -p "$bundle/vulkan-root"
    for deb in "$bundle"/debs/*.deb; do
        [ -f "$deb" ] && dpkg-deb -x "$deb" "$bundle/vulkan-root"
    done
    lib="$(dirname "$(find "$bundle/vulkan-root" -name 'libvulkan.so.1' | head -1)")"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    nv="$(ldconfig -p 2>/dev/null | grep -o '/[^ ]*libGLX_nvidia.so.0' | head -1)"
    if [ -n "$nv" ]; then
        printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.3"}}\n' \
            "$nv" > "$bundle/nvidia_icd.json"
        export VK_ICD_FILENAMES="$bundle/nvidia_icd.json"
    fi
fi

export PRISM_DATA="${PRISM_DATA:-$bundle/data}"
prism="$bundle/bin/prism"
log="$bundle/logs"
mkdir -p "$log"

# limit SECONDS NAME CMD...: runs CMD with a time limit, output to logs/NAME.txt; prints the
# exit code (124 when out of time).
limit() {
    local s=$1 name=$2
    shift 2
    timeout --kill-after=5 "$s" "$@" > "$log/$name.txt" 2>&1
    echo $?
}

{
    echo "# GPU check, $(date -u +%Y-%m-%d) (commit $(cat "$bundle/commit.txt" 2>/dev/null))"
    echo
    echo '```'
    "$prism" info 2>&1 | sed -n '/^selected:/,$p'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader
    echo '```'
    echo

    echo "## Tests on the GPU adapter"
    echo
    echo "| test binary | result | seconds |"
    echo "|---|---|---|"
    # The parts share the 8 minutes: tests 170 s in all, kernel benches 80, pipeline benches
    # 50, the paper's configuration 110, the replica 40 (450 s, and the set-up).
    tests_end=$(( $(date +%s) + 170 ))
    for t in "$bundle"/tests/*; do
        name="$(basename "$t")"
        # Tests that need no adapter are not in a bundle (gpu_bundle.sh); older bundles had them.
        case "$name" in prism | fuzz_decoders | shaders_validate | data_loaders | docs) continue ;; esac
        s=$(date +%s)
        left=$(( tests_end - s ))
        if [ "$left" -le 5 ]; then
            echo "| $name | not run: the tests' 170 s were spent | 0 |"
            continue
        fi
        rc=$(cd "$root" && limit "$left" "test-$name" "$t" --test-threads=4)
        summary="$(grep -E '^test result' "$log/test-$name.txt" | tail -1 \
            | sed -E 's/.*\. ([0-9]+ passed; [0-9]+ failed).*/\1/')"
        [ "$rc" = 124 ] && summary="out of time (the tests' 170 s)"
        [ "$rc" != 0 ] && [ "$rc" != 124 ] && summary="FAILED: $summary: $(grep -E '^test .* FAILED$' "$log/test-$name.txt" | head -3 | sed -E 's/^test (.*) \.\.\. FAILED/\1/' | xargs)"
        echo "| $name | $summary | $(( $(date +%s) - s )) |"
    done
    echo

    echo "## Kernel benches (matmuls up to 4096^3)"
    echo
    max=$([ "$quick" = 1 ] && echo 512 || echo 4096)
    rc=$(PRISM_BENCH_MAX=$max limit 80 kernels "$bundle/benches/kernels" --bench matmul \
        --warm-up-time 0.3 --measurement-time 1 --sample-size 10)
    [ "$rc" != 0 ] && echo "kernel benches: exit $rc (see logs/kernels.txt)"
    sed -n '/^Summary on/,$p' "$log/kernels.txt"
    echo

    echo "## Pipeline benches"
    echo
    rc=$(PRISM_BENCH_QUICK=$quick limit 50 pipeline "$bundle/benches/pipeline" --bench \
        --warm-up-time 0.3 --measurement-time 1 --sample-size 10)
    [ "$rc" != 0 ] && echo "pipeline benches: exit $rc (see logs/pipeline.txt)"
    echo '```'
    # Each benchmark's name line, then its first "time:" line (criterion's estimate).
    awk '/^[a-z][^ ]*\// { name = $0; next }
         /^ +time:/ && name != "" { sub(/^ +/, ""); print name ": " $0; name = "" }' \
        "$log/pipeline.txt" | head -40
    echo '```'
    echo

    echo "## The paper's configuration"
    echo
    steps=$([ "$quick" = 1 ] && echo 2 || echo 100)
    clients=$([ "$quick" = 1 ] && echo 2 || echo 10)
    out="$bundle/paper-run"
    rm -rf "$out"
    rc=$(limit 110 paper "$prism" train --arch resnet32 --batch 64 --clients "$clients" \
        --rounds 2 --local-steps "$steps" --data "$PRISM_DATA" --no-fetch --quiet \
        --sample-every 0 --eval-every 0 --out "$out")
    echo "\`prism train --arch resnet32 --batch 64 --clients $clients --rounds 2 --local-steps $steps\`: exit $rc"
    echo
    if [ -f "$out/metrics.jsonl" ]; then
        python3 - "$out/metrics.jsonl" "$clients" "$steps" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
clients, steps = int(sys.argv[2]), int(sys.argv[3])
print("| round | seconds | ms a client step |")
print("|---|---|---|")
for m in lines:
    t = m.get("timing", {})
    wall = m.get("wall_s", 0.0)
    n = t.get("local_steps") or clients * steps
    dev = t.get("local_device_s", 0.0) + t.get("local_record_s", 0.0) + t.get("local_readback_s", 0.0)
    print(f"| {m['round']} | {wall:.2f} | {1000 * dev / max(n, 1):.1f} |")
EOF
    fi
    grep -E '^time:' "$log/paper.txt"
    echo

    echo "## PyTorch replica, the same local step (CUDA eager)"
    echo
    if python3 -c 'import torch, numpy, PIL; assert torch.cuda.is_available()' 2>/dev/null; then
        rc=$(limit 40 replica python3 tools/replica.py --arch resnet32 --batch 64 \
            --steps "$steps" --device cuda --data "$PRISM_DATA/mnist" --out "$bundle/replica")
        echo "exit $rc: $(grep -E '^training loop' "$log/replica.txt")"
    else
        echo "no PyTorch with CUDA in this python3: not run"
    fi
    echo
    echo "Whole check: $(( $(date +%s) - start_all )) s. Logs: $log"
} > "$results" 2>&1
cat "$results"
