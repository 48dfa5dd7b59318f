# Source on a lent GPU machine: install the wheels carried in .whl*/ (FA4, CuTe DSL, diffusers) to
# /tmp/site once and put them and src/ on PYTHONPATH. The GPU image has no network and no diffusers.
#
# The cutlass-dsl CUDA 13 library wheel (~92 MB) is over what one call carries beside the tree, so it
# travels in parts (cu13.part.aa, .ab, ...; CU13_PARTS of them, default 3) in calls made back to back
# while the machine is warm; each call sourcing this copies what it carries to /tmp/wheels and
# installs the wheels that are new there, so the calls before the last part can run work too.
mkdir -p /tmp/wheels
for d in .whl*; do
    [ -d "$d" ] && cp -n "$d"/* /tmp/wheels/ 2>/dev/null
done
parts=$(ls /tmp/wheels/cu13.part.* 2>/dev/null | wc -l)
if [ "$parts" -gt 0 ]; then
    if [ "$parts" -eq "${CU13_PARTS:-3}" ]; then
        cat /tmp/wheels/cu13.part.* \
            >/tmp/wheels/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
        rm -f /tmp/wheels/cu13.part.*
    else
        echo "only $parts of ${CU13_PARTS:-3} parts of the cu13 wheel are here" >&2
    fi
fi
# Install the wheels not installed by an earlier call (/tmp/site/.installed lists those that were).
# The cutlass-dsl wheels share one top-level folder, which `pip --target --upgrade` would replace
# wholesale, so they (and what needs them) wait until the cu13 wheel is whole and go in together.
mkdir -p /tmp/site
touch /tmp/site/.installed
new=$(ls /tmp/wheels/*.whl 2>/dev/null | sort | comm -23 - <(sort /tmp/site/.installed))
if ls /tmp/wheels/cu13.part.* >/dev/null 2>&1; then
    new=$(printf '%s\n' $new | grep -v -E '/(nvidia_cutlass_dsl|flash_attn|quack_kernels)[^/]*$')
fi
if [ -n "$new" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $new && printf '%s\n' $new >> /tmp/site/.installed || echo "wheel install failed" >&2
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# A newer Triton (3.9.0, what newer torch releases install; the image has 3.6.0), for timing the same kernels
# under its compiler: its package trimmed (no AMD backend, no CUPTI, no proton, only the ptxas it runs for
# sm90+, `ptxas-blackwell`, CUDA 13.4) as triton39.tar.xz,
# carried in TRITON39_PARTS parts (default 2: .tri1/, .tri2/ beside their SHA256) in calls made back to back,
# unpacked to /tmp/triton39 when whole; TRITON39=1 puts it before the image's Triton.
for d in .tri*; do
    [ -d "$d" ] && mkdir -p /tmp/tri && cp -n "$d"/* /tmp/tri/ 2>/dev/null
done
if [ ! -d /tmp/triton39/triton ] && ls /tmp/tri/triton39.part.* >/dev/null 2>&1; then
    if [ "$(ls /tmp/tri/triton39.part.* | wc -l)" -eq "${TRITON39_PARTS:-2}" ]; then
        cat /tmp/tri/triton39.part.* > /tmp/tri/triton39.tar.xz
        if (cd /tmp/tri && sha256sum --quiet -c SHA256); then
            mkdir -p /tmp/triton39 && tar xJf /tmp/tri/triton39.tar.xz -C /tmp/triton39 && rm -f /tmp/tri/triton39.*
        else
            echo "triton39.tar.xz: checksum mismatch" >&2
        fi
    else
        echo "only $(ls /tmp/tri/triton39.part.* | wc -l) of ${TRITON39_PARTS:-2} parts of triton39.tar.xz are here" >&2
    fi
fi
if [ "${TRITON39:-0}" = 1 ]; then
    if [ -d /tmp/triton39/triton ]; then
        # its backends found in its own tree: by entry points it would take the image's (3.6's dist-info,
        # which names an AMD backend the trimmed package does not hold)
        export PYTHONPATH=/tmp/triton39:$PYTHONPATH TRITON_BACKENDS_IN_TREE=1
    else
        echo "TRITON39=1 but /tmp/triton39 is not unpacked: the image's Triton runs" >&2
    fi
fi
