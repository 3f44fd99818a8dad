#!/usr/bin/env bash
# The CUDA path and real-size speed on one GPU machine, in one short run (under 10 min on an H200 once started).
#   - the gpu-marked tests (every engine on CUDA, bf16 frozen weights, the protect-images CLI, SD-1.5 at 512 px);
#   - apdm bench speed on the real SD-1.5 architecture with random weights (no download needed): personalization
#     steps, one L2P outer step at the paper's N_per = 20, LDU / ASPL / AdvDM / PhotoGuard per image;
#   - the L2P outer step again with bf16 autocast + gradient checkpointing (the memory options).
# Usage on the GPU machine, from the repo root: bash docs/results/checks/gpu_check.sh OUT_DIR [more|lora]
# ("more": instead, SD-2.1-base image-method timings and LoRA-θ protection; "lora": LoRA-θ with a bf16 base;
# "trap": the encoder trap's step at 512 px with 16 and 36 photos, whole and micro-batched, and its GPU test;
# "purifiers": one IMPRESS step, one GrIDPure round and one DiffPure call at 512 px on 4 photos, fp32 and bf16)
# (where pip cannot reach an index, install diffusers first, e.g. from wheels: see docs/install.md).
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
run() {  # NAME TIMEOUT OPTIONS...: one bench speed run on random SD-1.5 weights, its own JSON and log
    local name=$1 limit=$2; shift 2
    timeout "$limit" python3 -m apdm bench speed --out "$out/speed_$name.json" model=random:sd15 quiet=true "$@" \
        > "$out/speed_$name.log" 2>&1; echo "speed $name rc=$?"
}
if [ -z "${2:-}" ]; then
timeout 170 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -25 | tee "$out/gpu_tests.log"
run sd15_protect_model 130 parts=protect-model repeats=2 inner_steps=20
run sd15_personalize_images 150 parts=personalize,protect-images repeats=3
run sd15_protect_model_bf16_ckpt 100 parts=protect-model repeats=1 inner_steps=20 mixed_precision=bf16 \
    gradient_checkpointing=true
for f in "$out"/speed_*.json; do [ -f "$f" ] && echo "$f" && cat "$f"; done
fi
# second call (same lease): the LDU paper's SD-2.1-base for the image methods, and LoRA-θ for protect-model
if [ "${2:-}" = "more" ]; then
    timeout 150 python3 -m apdm bench speed --out "$out/speed_sd21base_personalize_images.json" model=random:sd21base \
        quiet=true parts=personalize,protect-images repeats=3 > "$out/speed_sd21base.log" 2>&1; echo "sd21base rc=$?"
    run sd15_protect_model_lora_theta 100 parts=protect-model repeats=2 inner_steps=20 trainable=lora
    for f in "$out"/speed_*.json; do [ -f "$f" ] && echo "$f" && cat "$f"; done
fi
# third call: LoRA-θ with its frozen base in bf16 (no fp32 UNet copy for θ)
if [ "${2:-}" = "lora" ]; then
    timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -k l2p 2>&1 | tail -5 | tee "$out/gpu_tests_l2p.log"
    run sd15_protect_model_lora_theta_bf16base 100 parts=protect-model repeats=2 inner_steps=20 trainable=lora
    cat "$out"/speed_*.json
fi
# fourth call: the encoder trap (apdm's addition) at 512 px: the recommended 16 photos, and 12 photos + 24 pictures
if [ "${2:-}" = "trap" ]; then
    timeout 90 python3 -m pytest -q -m gpu tests/test_gpu.py -k trap 2>&1 | tail -5 | tee "$out/gpu_tests_trap.log"
    run sd15_trap16 100 parts=encoder-trap repeats=2 trap_images=16
    run sd15_trap16_mb4 100 parts=encoder-trap repeats=2 trap_images=16 micro_batch=4
    run sd15_trap36_mb4 150 parts=encoder-trap repeats=2 trap_images=36 micro_batch=4
    run sd15_trap36_mb4_ckpt 150 parts=encoder-trap repeats=2 trap_images=36 micro_batch=4 gradient_checkpointing=true
    cat "$out"/speed_*trap*.json
fi
# fifth call: the attacker's model purifiers at 512 px (IMPRESS 3000 steps, GrIDPure 20 rounds per photo, projected)
if [ "${2:-}" = "purifiers" ]; then
    run sd15_purifiers 150 parts=purifiers repeats=2 images=4
    run sd15_purifiers_bf16 150 parts=purifiers repeats=2 images=4 dtype=bf16
    cat "$out"/speed_*purifiers*.json
fi
