# Source at the start of every device command: installs the carried wheels (bitsandbytes, decord2,
# fastapi and what it imports: docs/gpu-notes.md)
# into /tmp/site and puts the repo on PYTHONPATH. Made by ../shared/device/prepare-wheels.sh.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=220 SHARP_CACHE_DIR=/tmp/sharpcache
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
set -o pipefail
