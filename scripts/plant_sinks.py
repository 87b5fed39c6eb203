"""Give sharp-small attention sinks the way real LLMs carry them: a massive activation on one early
token and a constant query component that every head at layers >= FROM_LAYER aligns with it.

Why planted: in every run so far (docs/eval.md, "sharp-small") no sink emerged from language
training, from 14M tokens on the CPU to 55.6M at full size on a GPU, while published sinks need
billions. Real models implement a sink with (Sun et al., "Massive activations"; Gu et al., "When
attention sink emerges") a few hidden dimensions that hold values hundreds of times the rest at the
first token from an early layer on, so that after RMSNorm that token is a fixed vector whose key
every query meets with a large logit, and whose value is near zero (attention parked there is a
no-op). This script builds that circuit into a trained checkpoint; training then keeps, reshapes or
removes it (the weights stay free).

The circuit, in Qwen2.5-VL's own weights (hidden d, head dim h, rotary pair p = h/2 - 1, the slowest
frequency, which turns by under 0.01 rad over the longest sequence at theta 1e6):
  - one hidden dimension j (the least used by the token embeddings) is M at the sink token (the
    `system` of the system turn, position 1 of every prompt) and 0 at every other token; no layer
    writes it (o_proj and down_proj row j, and the vision merger's output row j, are zeroed), so it
    stays M at the sink and 0 elsewhere at every layer. After RMSNorm the sink is sqrt(d) e_j.
  - at layers >= FROM_LAYER: key dim p reads only j (weight M_k, bias 0), key dim p + h/2 is 0, so
    only the sink has a key in that pair; query dim p is a constant c_head (weight 0, bias), so each
    head's logit on the sink is c_head * k_p * scaling, calibrated so that the head gives the sink
    TARGET of the last prompt token's attention on sharp-small's progress-check rows.
  - no projection but that key reads j (q, k, v, gate and up columns j are 0), so the sink's own
    layers leave its state alone and its key is the bias every key has outside pair p;
  - v_proj column j is 0, so the sink's value is the bias every value has: attention parked there
    only scales the rest down by (1 - share); o_proj's columns of each head are scaled by
    1 / (1 - TARGET) so the planted model starts close to the function it had.

Usage: python -m scripts.plant_sinks IN_FOLDER OUT_FOLDER [--target 0.75] [--from-layer 2]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from scripts.small_checks import language_check_rows
from scripts.small_data import CHECK_SEED, TASKS, Items, build_processor
from scripts.train_sharp_small import history_of

SINK_TOKEN = "system"
MASSIVE = 16384.0


def text_parts(model):
    return model.model.language_model, model.config.text_config


@torch.no_grad()
def plant(model, token_id: int, target: float, from_layer: int, key_scale: float = 8.0) -> dict:
    """Build the circuit (module docstring) into `model` in place with a first guess at each head's
    logit; returns what was chosen. Heads' logits are set by `calibrate`."""
    lm, tc = text_parts(model)
    d, heads, kv = tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads
    hd = d // heads
    p = hd // 2 - 1
    emb = lm.embed_tokens.weight  # (V, d)
    j = int(emb.float().abs().mean(0).argmin())
    # The residual stream of a trained sharp-small reaches norms of ~200-1,200 (every token); 16,384
    # keeps the sink's state >99% e_j at every layer and leaves fp16 (max 65,504) room; RMSNorm
    # squares in fp32.
    massive = MASSIVE
    emb[:, j] = 0
    emb[token_id, j] = massive
    merger_out = model.model.visual.merger.mlp[-1]
    merger_out.weight[j] = 0
    if merger_out.bias is not None:
        merger_out.bias[j] = 0
    normed = math.sqrt(d)  # RMSNorm of a state that is all e_j: sqrt(d) e_j (times the norm's weight)
    for n, layer in enumerate(lm.layers):
        layer.self_attn.o_proj.weight[j] = 0
        layer.mlp.down_proj.weight[j] = 0
        layer.input_layernorm.weight[j] = 1.0
        layer.post_attention_layernorm.weight[j] = 1.0
        # nothing but the planted key reads j: the sink's own MLP and attention see only its other,
        # normalised-away dimensions, so its state stays e_j (and layers < from_layer see no sink)
        layer.mlp.gate_proj.weight[:, j] = 0
        layer.mlp.up_proj.weight[:, j] = 0
        att = layer.self_attn
        for proj in (att.q_proj, att.k_proj, att.v_proj):
            proj.weight[:, j] = 0
        if n < from_layer:
            continue
        for g in range(kv):
            for dim in (g * hd + p, g * hd + p + hd // 2):
                att.k_proj.weight[dim] = 0
                att.k_proj.bias[dim] = 0
            att.k_proj.weight[g * hd + p, j] = key_scale / normed
        for h in range(heads):
            for dim in (h * hd + p, h * hd + p + hd // 2):
                att.q_proj.weight[dim] = 0
                att.q_proj.bias[dim] = 0
            att.o_proj.weight[:, h * hd:(h + 1) * hd] /= 1 - target
    return {"token": SINK_TOKEN, "token_id": token_id, "dimension": j, "massive": massive,
            "target": target, "from_layer": from_layer, "rotary_pair": p, "key": key_scale}


def sink_shares(model, rows, sink_id: int) -> torch.Tensor:
    """(layers, heads): the mean share of the last prompt token's attention on the sink token."""
    from scripts.small_checks import inputs_of, to_device
    from scripts.small_data import Batcher, pack, unpack
    from sharp_cli.evaluate import diagnose

    lm, tc = text_parts(model)
    layers = list(range(tc.num_hidden_layers))
    batcher = Batcher(model.config, answers=False, device=torch.device("cpu"))
    total = torch.zeros(len(layers), tc.num_attention_heads)
    model.eval()
    for row in rows:
        batch = to_device(batcher(unpack(pack([row]), "cpu")), "cpu")
        at = (batch["input_ids"][0] == sink_id).nonzero()[0, 0]
        with torch.no_grad(), diagnose.capture(lm.config, layers) as rec:
            model(**inputs_of(batch), logits_to_keep=1)
        total += torch.stack([rec.probs[n][0, :, at] for n in layers])
    return total / len(rows)


@torch.no_grad()
def calibrate(model, rows, info: dict, rounds: int = 3) -> list[list[float]]:
    """Move each planted head's sink logit until its share of the last token's attention on `rows`
    averages the target (a logit step per round: the share is a logistic function of it)."""
    lm, tc = text_parts(model)
    hd = tc.hidden_size // tc.num_attention_heads
    p, target = info["rotary_pair"], info["target"]
    scaling = hd ** -0.5
    logit = torch.full((tc.num_hidden_layers, tc.num_attention_heads), 8.0)
    for _ in range(rounds + 1):
        for n in range(info["from_layer"], tc.num_hidden_layers):
            for h in range(tc.num_attention_heads):
                lm.layers[n].self_attn.q_proj.bias[h * hd + p] = float(logit[n, h]) / (info["key"] * scaling)
        share = sink_shares(model, rows, info["token_id"]).clamp(1e-4, 1 - 1e-4)
        logit += math.log(target / (1 - target)) - (share / (1 - share)).log()
    return [[round(float(s), 3) for s in row] for row in share]


def main(argv=None):
    from transformers import AutoModelForImageTextToText

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--target", type=float, default=0.75, help="Each planted head's share of the last token's "
                    "attention on the sink, on the progress-check rows (seed 999).")
    ap.add_argument("--from-layer", type=int, default=2)
    ap.add_argument("--rows", type=int, default=6, help="Calibration rows of each kind (video, language).")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(a.source, dtype=torch.float32, attn_implementation="sdpa",
                                                        use_kernels=False)
    token_id = build_processor(model.config).tokenizer.convert_tokens_to_ids(SINK_TOKEN)
    info = plant(model, token_id, a.target, a.from_layer)
    video = Items(CHECK_SEED, TASKS, 0.0, 0.0, per_seed=10**9, frames=64, answers=False)
    rows = [video[n] for n in range(a.rows)] + language_check_rows(a.rows)
    shares = calibrate(model, rows, info)
    info["calibrated_shares"] = shares
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out, state_dict={k: v.to(torch.float16) for k, v in model.state_dict().items()})
    config = json.loads((a.out / "config.json").read_text())
    config["dtype"] = "float16"
    (a.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in a.source.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "training.json"):
            shutil.copy(f, a.out / f.name)
    source = a.source / "training.json"
    previous = json.loads(source.read_text()) if source.exists() else {}
    record = {"script": "scripts.plant_sinks", "args": {k: str(v) for k, v in vars(a).items()},
              "planted_sinks": info, "history": history_of(previous)}
    (a.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "calibrated_shares"}))
    for n, row in enumerate(shares):
        print(f"layer {n:>2}: sink share per head {row}")


if __name__ == "__main__":
    main()
