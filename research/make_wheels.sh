#!/usr/bin/env bash
# Rebuild the git-ignored wheel folders a device call carries (research/gpu-notes.md), on a fresh
# checkout: .whl (prepare-wheels.sh: bitsandbytes, decord2, the server's packages), .whl-tf (the
# transformers this checkout is tested with, over the image's 5.17), .whl-test (pytest for the
# CUDA-only tests) and .whl-all/all.tar.xz (all of them plus PyAV, less hf_xet (downloads only), unpacked into one folder and
# xz-packed, ~57 MB: the carry holds 64 MiB). Needs PyPI; run from the repo root.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in /.whl-tf/ /.whl-test/ /.whl-all/ /ckpt/; do grep -qx "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
rm -rf .whl-tf && mkdir -p .whl-tf
dl .whl-tf transformers==5.25.0 huggingface_hub==2.4.0 tokenizers==0.23.3 click==8.5.1 hf_xet==1.8.0 \
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
# ONLY=tf: .whl-tf alone (~20 s), all a training call carries: start the first call with it and make
# the rest while it runs.
[ "${ONLY:-}" = tf ] && { du -sh .whl-tf; exit 0; }
EXTRA="fastapi uvicorn starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api annotated-doc" \
  bash ../shared/device/prepare-wheels.sh
rm -rf .whl-test .whl-all && mkdir -p .whl-test .whl-all
dl .whl-test pytest==9.2.0 pluggy iniconfig
dl .whl-all av==19.0.2
site=$(mktemp -d)
for w in .whl/*.whl .whl-tf/*.whl .whl-all/av-*.whl; do python3 -m zipfile -e "$w" "$site"; done
rm .whl-all/av-*.whl
(cd "$site" && tar -cf - --exclude='./hf_xet*' . | xz -9e -T2) > .whl-all/all.tar.xz
rm -rf "$site"
du -sh .whl .whl-tf .whl-test .whl-all
