"""sharp-tiny's data, for scripts.train_sharp_tiny: the model config and tokenizer, synth items
rendered with what each visual token shows, and batches made by the processor call `sharp ask`
makes. Items are rendered in DataLoader worker processes; the processor's pixel work runs there
(Batcher as the collate function) or on the accelerator (pack in the workers, unpack and Batcher on
the device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sharp_cli.evaluate.synth import DIRECTIONS, PALETTE, make_item
from sharp_cli.letters import INSTRUCTION, build_prompt
from sharp_cli.models.qwen import QwenVLAdapter

OUT = Path(__file__).resolve().parent.parent / "sharp_cli" / "models" / "sharp_tiny"
MAX_PIXELS = 112 * 112  # 128-pixel synth frames -> 112x112 -> 16 tokens per two frames
CELLS = 4  # merged tokens per side of a 112x112 frame (28 px each)
HELD_OUT_SEED = 0  # `sharp synth OUT --seed 0`
CHECK_SEED = 999  # progress check during training: neither trained on nor the held-out split
TRAIN_SEEDS_FROM = 1000
PER_SEED = 10_000  # training item n is item n % PER_SEED of seed TRAIN_SEEDS_FROM + n // PER_SEED
FPS = 8.0  # what `sharp synth` encodes at
NONE = "none"  # what a visual token without a needle is taught to say
_RGB = np.array(list(PALETTE.values()), dtype=np.int32)


def vocabulary() -> list[str]:
    words = {NONE}
    for seed in (1, 2):
        for i in range(64):
            _, item = make_item(seed, i, frames=8, size=64)
            words.update(build_prompt(item["question"], item["options"]).replace("'", " ' ").split())
    words.update(PALETTE, DIRECTIONS, INSTRUCTION.replace("'", " ' ").split())
    return sorted(w.strip(".,?!:;()") for w in words if w.strip(".,?!:;()"))


def tiny_config(vocab: int = 256, hidden: int = 256, layers: int = 6, vision_depth: int = 4, vision_hidden: int = 128):
    from transformers import Qwen2_5_VLConfig

    special = {"bos": vocab - 12, "eos": vocab - 10, "vstart": vocab - 9, "vend": vocab - 8, "vpad": vocab - 7,
               "image": vocab - 6, "video": vocab - 5}
    heads = max(2, hidden // 32)
    text = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), vocab_size=vocab, max_position_embeddings=4096,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [4, 6, 6]},
                bos_token_id=special["bos"], eos_token_id=special["eos"], tie_word_embeddings=False)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=max(2, vision_hidden // 32), out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=list(range(1, vision_depth, 2)), tokens_per_second=2)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=special["image"],
                            video_token_id=special["video"], vision_start_token_id=special["vstart"],
                            vision_end_token_id=special["vend"], vision_token_id=special["vpad"],
                            bos_token_id=special["bos"], eos_token_id=special["eos"])


def build_processor(config):
    from sharp_cli.models.random_init import synthetic_tokenizer

    adapter = QwenVLAdapter()
    tokenizer = synthetic_tokenizer(adapter.special_tokens(config), config.text_config.vocab_size, vocabulary())
    tokenizer.padding_side = "left"  # batches end with the answer (batch 1 at inference: no padding)
    processor = adapter.build_processor(tokenizer, config)
    # Saved with the processor, so `sharp ask/eval` see any video at the size sharp-tiny was trained at.
    processor.video_processor.size = adapter.video_size(processor.video_processor, 32, MAX_PIXELS)
    return processor


def answer_text(item) -> str:
    return item["options"]["ABCD".index(item["answer"])]


def token_words(frames: np.ndarray, item) -> tuple[list[str], list[bool]]:
    """What each visual token shows, in the token order of Qwen2.5-VL (token frame, row, column),
    and whether it shows the answer. A needle is what differs from both the first and the last
    frame, counted per cell of size/4 pixels over the two frames of a token. Needle tokens are
    taught the flash's colour (for `count`: which flash it is, 1, 2, ..., so the last one says how
    many), or the moving square's direction; the others `none`. The answer is shown by the flash
    (`colour`), the first flash (`order`), the last flash (`count`) or the moving square."""
    t, size = frames.shape[0], frames.shape[1]
    cell = size // CELLS
    first, last = frames != frames[0], frames != frames[-1]  # (T, H, W, 3); channels or-ed by hand (fast)
    needle = (first[..., 0] | first[..., 1] | first[..., 2]) & (last[..., 0] | last[..., 1] | last[..., 2])
    cells = needle[: t // 2 * 2].reshape(t // 2, 2, CELLS, cell, CELLS, cell)
    hit = cells.sum(axis=(1, 3, 5)) >= cell * cell // 64  # (T/2, rows, columns)
    words = np.full(hit.shape, NONE, dtype=object)
    shows = np.zeros(hit.shape, dtype=bool)
    task = item["category"]
    # A flash covers frames 4k+1 and 4k+2: token frames 2k and 2k+1, flash slot k.
    slots = sorted({int(step) // 2 for step in np.nonzero(hit.any(axis=(1, 2)))[0]})
    for step, row, col in zip(*np.nonzero(hit)):
        slot = int(step) // 2
        if task == "direction":
            words[step, row, col] = answer_text(item)
        elif task == "count":
            words[step, row, col] = str(slots.index(slot) + 1)
        else:
            area = (slice(2 * step, 2 * step + 2), slice(row * cell, (row + 1) * cell),
                    slice(col * cell, (col + 1) * cell))
            pixels = frames[area][needle[area]].astype(np.int32)
            nearest = np.abs(pixels[:, None, :] - _RGB[None]).sum(-1).argmin(-1)
            words[step, row, col] = list(PALETTE)[np.bincount(nearest).argmax()]
        shows[step, row, col] = {"order": slot == slots[0], "count": slot == slots[-1]}.get(task, True)
    return words.reshape(-1).tolist(), shows.reshape(-1).tolist()


class Items(torch.utils.data.Dataset):
    """Item n of a seed range, rendered: frames, prompt (+ answer), what each visual token shows."""

    def __init__(self, seed_from: int, tasks, frames: int, bare: float, answers: bool = True,
                 per_seed: int = PER_SEED, count: int = 10**9, offset: int = 0):
        self.seed_from, self.tasks, self.frames = seed_from, tuple(tasks), frames
        self.bare, self.answers, self.per_seed, self.count, self.offset = bare, answers, per_seed, count, offset

    def __len__(self):
        return self.count

    def __getitem__(self, n: int):
        n += self.offset
        seed, i = self.seed_from + n // self.per_seed, n % self.per_seed
        frames, item = make_item(seed, i, self.tasks, self.frames)
        # Which items get the bare question is a function of the item alone, like everything else.
        bare = (seed * 7919 + i * 104729) % 1000 < self.bare * 1000
        question = item["question"] if bare else build_prompt(item["question"], item["options"])
        # A tensor, so that worker processes hand it over in shared memory rather than through a pipe.
        return {"frames": torch.from_numpy(frames), "question": question, "answer": answer_text(item) + "<|im_end|>",
                "words": token_words(frames, item) if self.answers else None,  # (words, shows the answer)
                "task": self.tasks.index(item["category"])}


class Batcher:
    """Rows -> model inputs through the processor call `sharp ask` makes (several clips at once);
    in the worker processes (device None) or on the accelerator (device given)."""

    def __init__(self, config, answers: bool, device=None):
        self.config, self.answers, self.device, self.processor = config, answers, device, None

    def __call__(self, rows):
        if self.processor is None:  # built once per process
            self.processor = build_processor(self.config)
        adapter, proc = QwenVLAdapter(), self.processor
        texts = [adapter.prompt(proc, r["question"]) + (r["answer"] if self.answers else "") for r in rows]
        kwargs = {"do_sample_frames": False, "return_tensors": "pt", "padding": True,
                  "size": adapter.video_size(proc.video_processor, 32, MAX_PIXELS),
                  "video_metadata": [{"total_num_frames": len(r["frames"]), "fps": FPS,
                                      "frames_indices": list(range(len(r["frames"]))),
                                      "duration": len(r["frames"]) / FPS} for r in rows]}
        if hasattr(type(proc.video_processor), "cap_pixels_per_frame"):
            kwargs["cap_pixels_per_frame"] = True
        if self.device is not None:
            kwargs["device"] = str(self.device)
        inputs = dict(proc(text=texts, videos=[r["frames"] for r in rows], **kwargs))
        first = [proc.tokenizer(r["answer"], add_special_tokens=False)["input_ids"] for r in rows]
        inputs["answer_tokens"] = torch.tensor([len(f) for f in first])
        inputs["target"] = torch.tensor([f[0] for f in first])
        inputs["task"] = torch.tensor([r["task"] for r in rows])
        if rows[0]["words"] is not None:
            inputs["token_labels"] = torch.tensor([proc.tokenizer.convert_tokens_to_ids(r["words"][0]) for r in rows])
            inputs["answer_tokens_shown"] = torch.tensor([r["words"][1] for r in rows])
        return inputs


def pack(rows) -> dict:
    """Worker side of the device path: the clips as one uint8 tensor (one copy to the device)."""
    return {"frames": torch.stack([r["frames"] for r in rows]), "rows": [dict(r, frames=None) for r in rows]}


def unpack(packed, device) -> list[dict]:
    frames = as_tensors(packed)["frames"].to(device, non_blocking=True)
    return [dict(r, frames=frames[i]) for i, r in enumerate(packed["rows"])]


class Piped:
    """A collate function whose tensors leave the worker as numpy arrays, pickled through the pipe:
    for hosts whose /dev/shm is too small for the tensors DataLoader shares there."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows):
        return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in dict(self.collate(rows)).items()}


def as_tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def shm_is_small(workers: int, batch: int, frames: int) -> bool:
    """Whether the batches in flight (workers x prefetch, float pixels) could fill /dev/shm."""
    import shutil

    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return True
    return workers > 0 and free < 2 * workers * 4 * batch * frames * 128 * 128 * 3 * 4


# -- a batch for the model: the keys it takes, on its device ------------------------------------
MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
              "second_per_grid_ts")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
