# Source at the start of every device command: installs the carried wheels (bitsandbytes, decord2,
# fastapi and what it imports: research/gpu-notes.md)
# into /tmp/site and puts the repo on PYTHONPATH. Made by ../shared/device/prepare-wheels.sh.
# .whl-all/all.tar.xz (carried instead of both when the tree leaves no room): every wheel above plus PyAV,
# unpacked into one site folder and xz-packed (59 MB against 94 MB of wheels; research/gpu-notes.md).
[ -f .whl-all/all.tar.xz ] && mkdir -p /tmp/site && xz -dc .whl-all/all.tar.xz | tar -xf - -C /tmp/site
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# .whl-tf (carried when present): the transformers this checkout is tested with (and its huggingface_hub and
# tokenizers) over the image's 5.17, whose Qwen2.5-VL video time positions differ (docs/eval.md): training
# calls carry only this (the checkpoint they continue needs the room of the 64 MiB carry).
[ -d .whl-tf ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl-tf/*.whl
# .whl-test (pytest, pluggy, iniconfig): the suite's CUDA-only tests on the GPU (research/gpu-notes.md).
[ -d .whl-test ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-test/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=220 SHARP_CACHE_DIR=/tmp/sharpcache
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 SHARP_SETUP_DONE=1
set -o pipefail
