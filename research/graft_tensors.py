"""A checkpoint with some tensors taken from another one of the same architecture: e.g. sharp-small
p1c with the query/key projections of layers 0-2 as the planted, untrained r2 had them (broad
shallow attention), to continue with scripts.train_sharp_small --freeze-qk-layers 0,1,2.

    python -m research.graft_tensors BASE DONOR OUT --match 'layers\\.[012]\\.self_attn\\.[qk]_proj'
    python -m research.graft_tensors BASE DONOR.safetensors OUT   # every tensor of a file of tensors

DONOR is a model folder or a .safetensors file; with a folder, --match (a regular expression on the
tensor names) picks the tensors. OUT is BASE's folder with those tensors replaced (training.json
notes the graft)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("donor", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--match", default="", help="Regular expression on tensor names (a donor folder only).")
    p.add_argument("--save-donor", type=Path, help="Also write the picked tensors alone to this .safetensors file.")
    a = p.parse_args(argv)
    donor_file = a.donor if a.donor.suffix == ".safetensors" else a.donor / "model.safetensors"
    donor = load_file(donor_file)
    if a.match:
        donor = {k: v for k, v in donor.items() if re.search(a.match, k)}
    base = load_file(a.base / "model.safetensors")
    missing = [k for k in donor if k not in base or base[k].shape != donor[k].shape]
    if missing or not donor:
        raise SystemExit(f"nothing to graft or not in the base with the same shape: {missing[:4]}")
    if a.save_donor:
        save_file({k: v.contiguous() for k, v in donor.items()}, a.save_donor)
    shutil.copytree(a.base, a.out, dirs_exist_ok=True)
    base.update({k: v.to(base[k].dtype) for k, v in donor.items()})
    save_file(base, a.out / "model.safetensors", metadata={"format": "pt"})
    record_path = a.out / "training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("grafts", []).append({"from": str(a.donor), "tensors": sorted(donor)})
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{a.out}: {len(donor)} tensors from {a.donor}")


if __name__ == "__main__":
    main()
