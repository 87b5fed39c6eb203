"""sharp-small's data: the model config and tokenizer, a language stage, and `sharp synth` items
rendered with what each visual token shows (scripts/train_sharp_small.py trains on them).

Why a language stage: a real video LLM's shallow layers spread attention, favour the end of the
sequence and park attention on the first tokens because the model was trained on a great deal of
text first (docs/eval.md, "sharp-small"). Here that text is synthetic but shaped like text: a
fixed Zipfian bigram language (documents whose every token is predicted), copying, key-value
recall and counting over 100-1,000 words, each behind the same system prompt. Video items are the
`sharp synth` tasks (basic and hard) at 64 frames of 168 x 168 (6 x 6 tokens per token frame,
1,152 visual tokens), asked as multiple choice or bare questions.

Seeds: training items come from synth seeds 1000 and up (TRAIN_SEEDS_FROM); the progress check uses
seed 999; the held-out sets are seeds 0 (tables) and 777777 (a second check): never trained on.
The language stage draws from its own seeds (LANGUAGE_SEED + item number).
"""

from __future__ import annotations

import numpy as np
import torch

from sharp_cli.evaluate.scenes import PALETTE, SHAPES
from sharp_cli.evaluate.synth import BASIC, DIRECTIONS, HARD, TASKS, make_item
from sharp_cli.letters import INSTRUCTION, build_prompt
from sharp_cli.models.qwen import QwenVLAdapter

FRAMES, SIZE, FPS = 64, 168, 8.0
MAX_PIXELS = SIZE * SIZE  # 168 x 168: 6 x 6 merged tokens of 28 pixels
HELD_OUT_SEEDS = (0, 777777)
CHECK_SEED = 999
TRAIN_SEEDS_FROM = 1000
PER_SEED = 10_000
LANGUAGE_SEED = 5_000_000
GRAMMAR_SEED = 12345  # the bigram language: fixed, so a continued run reads the same language
NONE = "none"
SYSTEM = "You are a helpful assistant."
LANGUAGE_WORDS = 640
_RGB = np.array(list(PALETTE.values()), dtype=np.int32)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def language_words() -> list[str]:
    rng = np.random.default_rng(GRAMMAR_SEED)
    words: list[str] = []
    while len(words) < LANGUAGE_WORDS:
        w = "".join(rng.choice(_SYLLABLES, int(rng.integers(2, 4))))
        if w not in words:
            words.append(w)
    return words


def vocabulary() -> list[str]:
    words = {NONE, *PALETTE, *SHAPES, *DIRECTIONS, *(str(n) for n in range(100)), *SYSTEM.split(),
             "repeat", "the", "words", "is", "what", "how", "many", "times", "does", "word", "appear", "in", "text"}
    for seed in (1, 2):
        for i in range(2 * len(TASKS)):
            _, item = make_item(seed, i, TASKS, frames=32, size=64)
            words.update(build_prompt(item["question"], item["options"]).replace("'", " ' ").split())
    words.update(INSTRUCTION.replace("'", " ' ").split())
    words = {w.strip(".,?!:;()") for w in words} - {""}
    return sorted(words) + language_words()


def small_config(vocab: int = 1024, hidden: int = 256, layers: int = 16, heads: int = 8, kv_heads: int = 2,
                 vision_depth: int = 4, vision_hidden: int = 128, rope_theta: float = 10000.0,
                 tokens_per_second: int = 8, mrope_section: tuple = (4, 6, 6)):
    """Qwen2.5-VL's own classes at ~17M parameters: 7B-like grouped-query attention (4 query heads
    per KV head), the M-RoPE split as the 7B's in proportion (head dim 32: 4/6/6). The 7B has
    theta 1e6 over head dim 128, so its temporal band's slowest frequency turns 0.04 rad a position;
    here (head dim 32) theta 1e4 gives 0.18 and 1e6 gives 0.075 (--rope-theta). mrope_section splits the 16
    frequencies, fastest first, into the temporal, height and width bands (--mrope-section 8,4,4 gives the
    temporal band 8, its slowest 0.024 rad a position at theta 1e6)."""
    from transformers import Qwen2_5_VLConfig

    if sum(mrope_section) != hidden // heads // 2:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head dim / 2 = {hidden // heads // 2}")
    special = {"bos": vocab - 12, "eos": vocab - 10, "vstart": vocab - 9, "vend": vocab - 8, "vpad": vocab - 7,
               "image": vocab - 6, "video": vocab - 5}
    text = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                 "mrope_section": list(mrope_section)},
                bos_token_id=special["bos"], eos_token_id=special["eos"], tie_word_embeddings=False)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=max(2, vision_hidden // 32), out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=list(range(1, vision_depth, 2)),
                  # 8: at 8 fps, 2 frames a token frame, temporal positions step by 2, as the 7B's at 2 fps
                  tokens_per_second=tokens_per_second)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=special["image"],
                            video_token_id=special["video"], vision_start_token_id=special["vstart"],
                            vision_end_token_id=special["vend"], vision_token_id=special["vpad"],
                            bos_token_id=special["bos"], eos_token_id=special["eos"])


# Qwen2.5-VL's own template behaviour: a default system prompt when the conversation has none.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_processor(config):
    from sharp_cli.models.random_init import synthetic_tokenizer

    adapter = QwenVLAdapter()
    tokenizer = synthetic_tokenizer(adapter.special_tokens(config), config.text_config.vocab_size, vocabulary())
    tokenizer.padding_side = "left"  # batches end with the supervised text
    processor = adapter.build_processor(tokenizer, config)
    processor.chat_template = CHAT_TEMPLATE
    processor.video_processor.size = adapter.video_size(processor.video_processor, FRAMES, MAX_PIXELS)
    return processor


# -- the language stage ----------------------------------------------------------------------------
class Grammar:
    """A fixed language over LANGUAGE_WORDS: Zipfian word frequencies; each word followed by one of 6
    likely successors half the time (the previous token matters); a third of the time a word of the
    current topic, which holds for 20-60 words (the recent stretch matters, less the further back:
    attention that decays with distance pays, as in real text); else any word."""

    TOPICS, TOPIC_WORDS = 16, 60

    def __init__(self):
        rng = np.random.default_rng(GRAMMAR_SEED + 1)
        self.words = language_words()
        n = len(self.words)
        self.unigram = 1.0 / np.arange(1, n + 1) ** 1.1
        self.unigram /= self.unigram.sum()
        self.next = np.stack([rng.choice(np.delete(np.arange(n), w), 6, replace=False,
                                         p=np.delete(self.unigram, w) / (1 - self.unigram[w])) for w in range(n)])
        self.next_p = rng.dirichlet(np.full(6, 0.7), n)
        self.topics = np.stack([rng.choice(n, self.TOPIC_WORDS, replace=False) for _ in range(self.TOPICS)])

    def text(self, rng, length: int) -> list[str]:
        out = [int(rng.choice(len(self.words), p=self.unigram))]
        kind = rng.choice(3, length, p=[0.5, 0.35, 0.15])  # successor, topic word, any word
        topic, left = int(rng.integers(self.TOPICS)), int(rng.integers(20, 61))
        for step in range(1, length):
            left -= 1
            if left <= 0:
                topic, left = int(rng.integers(self.TOPICS)), int(rng.integers(20, 61))
            w = out[-1]
            if kind[step] == 0:
                out.append(int(self.next[w, rng.choice(6, p=self.next_p[w])]))
            elif kind[step] == 1:
                out.append(int(self.topics[topic, rng.integers(self.TOPIC_WORDS)]))
            else:
                out.append(int(rng.choice(len(self.words), p=self.unigram)))
        return [self.words[i] for i in out]


def language_item(grammar: Grammar, n: int) -> tuple[str, str]:
    """Language item n as (user text, supervised text). A document's every word is supervised
    (returned as user text '' and the document as the target)."""
    rng = np.random.default_rng([LANGUAGE_SEED, n])
    kind = ("document", "copy", "recall", "count")[n % 4]
    if kind == "document":
        return "", " ".join(grammar.text(rng, int(rng.integers(150, 700))))
    if kind == "copy":
        words = grammar.text(rng, int(rng.integers(30, 300)))
        return "repeat the words : " + " ".join(words), " ".join(words)
    if kind == "recall":
        pairs = int(rng.integers(10, 120))
        keys = rng.choice(len(grammar.words), pairs, replace=False)
        values = rng.choice(len(grammar.words), pairs)
        facts = " . ".join(f"{grammar.words[k]} is {grammar.words[v]}" for k, v in zip(keys, values))
        j = int(rng.integers(pairs))
        return f"{facts} . what is {grammar.words[keys[j]]} ?", grammar.words[values[j]]
    words = grammar.text(rng, int(rng.integers(40, 400)))
    word = words[int(rng.integers(len(words)))]
    return " ".join(words) + f" . how many times does the word {word} appear in the text ?", str(words.count(word))


# -- video items -----------------------------------------------------------------------------------
def answer_text(item) -> str:
    return item["options"]["ABCD".index(item["answer"])]


def token_words(frames: np.ndarray, item) -> tuple[list[str], list[bool]]:
    """What each visual token shows, in Qwen2.5-VL's token order (token frame, row, column), from the
    item's needle boxes: a token whose cell (28 x 28 pixels over its two frames) a needle box covers
    for at least a sixteenth is taught the needle's colour (the palette colour most of the box's
    pixels are close to), or for direction and motion the way it moves; every other token `none`. The
    second list says which tokens show the answer."""
    t, size = frames.shape[0] // 2, frames.shape[1]
    cells = size // 28
    words = np.full((t, cells, cells), NONE, dtype=object)
    covered = np.zeros((t, cells, cells), np.int32)
    moving = item["category"] in ("direction", "motion")
    for f, x0, y0, x1, y1 in item["needle_boxes"]:
        if f // 2 >= t:
            continue
        word = answer_text(item) if moving else _box_colour(frames[f, y0:y1, x0:x1])
        for row in range(y0 // 28, min(cells, -(-y1 // 28))):
            for col in range(x0 // 28, min(cells, -(-x1 // 28))):
                overlap = (min(y1, 28 * row + 28) - max(y0, 28 * row)) * (min(x1, 28 * col + 28) - max(x0, 28 * col))
                covered[f // 2, row, col] += max(0, overlap)
                if word and words[f // 2, row, col] == NONE and overlap * 16 >= 28 * 28:
                    words[f // 2, row, col] = word
    shows = covered * 16 >= 28 * 28
    return words.reshape(-1).tolist(), shows.reshape(-1).tolist()


def _box_colour(pixels: np.ndarray) -> str | None:
    """The palette colour most of a needle box's object pixels are close to (its background corners
    and anything else overlapping it are the minority), or None if none is."""
    rgb = pixels.reshape(-1, 3).astype(np.int32)
    distance = np.abs(rgb[:, None, :] - _RGB[None]).sum(-1)  # (pixels, palette)
    close = distance.min(-1) < 40
    return list(PALETTE)[np.bincount(distance[close].argmin(-1)).argmax()] if close.any() else None


class Items(torch.utils.data.Dataset):
    """Row n: a language item with probability `language`, else video item n of the seed range.
    Which it is, and everything in it, is a function of n alone."""

    def __init__(self, seed_from: int, tasks, language: float, bare: float, count: int = 10**9, offset: int = 0,
                 per_seed: int = PER_SEED, frames: int = FRAMES, answers: bool = True):
        self.seed_from, self.tasks, self.language, self.bare = seed_from, tuple(tasks), language, bare
        self.count, self.offset, self.per_seed, self.frames, self.answers = count, offset, per_seed, frames, answers
        self.grammar = None

    def __len__(self):
        return self.count

    def __getitem__(self, n: int):
        n += self.offset
        if (n * 2654435761 % 2**32) / 2**32 < self.language:
            if self.grammar is None:
                self.grammar = Grammar()
            user, target = language_item(self.grammar, n)
            return {"kind": "language", "user": user, "target": target, "task": -1}
        seed, i = self.seed_from + n // self.per_seed, n % self.per_seed
        frames, item = make_item(seed, i, self.tasks, self.frames, SIZE)
        bare = (seed * 7919 + i * 104729) % 1000 < self.bare * 1000
        question = item["question"] if bare else build_prompt(item["question"], item["options"])
        words = token_words(frames, item) if self.answers else None
        return {"kind": "video", "frames": torch.from_numpy(frames), "question": question,
                "target": answer_text(item), "words": words, "task": TASKS.index(item["category"]),
                "letter": item["answer"], "bare": bare}


class Batcher:
    """Rows -> model inputs through the processor (video rows as `sharp ask` builds them), with a
    loss mask over the supervised tokens (the answer and its <|im_end|>; a document's every word)."""

    def __init__(self, config, answers: bool = True, device=None):
        self.config, self.answers, self.device, self.processor = config, answers, device, None

    def __call__(self, rows):
        if self.processor is None:
            self.processor = build_processor(self.config)
        proc = self.processor
        texts, targets = [], []
        for r in rows:
            if r["kind"] == "video":
                content = [{"type": "video"}, {"type": "text", "text": r["question"]}]
                prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
                target = r["target"] + "<|im_end|>"
            elif r["user"]:
                prompt = proc.apply_chat_template([{"role": "user", "content": r["user"]}], add_generation_prompt=True,
                                                  tokenize=False)
                target = r["target"] + "<|im_end|>"
            else:  # a document: the user turn itself is the supervised text
                prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
                target = r["target"] + "<|im_end|>"
            texts.append(prompt + target if self.answers else prompt)
            targets.append(len(proc.tokenizer(target, add_special_tokens=False)["input_ids"]) if self.answers else 0)
        videos = [r["frames"] for r in rows if r["kind"] == "video"]
        if videos and all(v.shape[1:3] == (SIZE, SIZE) and len(v) % 2 == 0 for v in videos):
            inputs = self.fast_inputs(texts, videos)
        else:
            inputs = self.processor_inputs(texts, videos)
        return self.labels(inputs, rows, targets)

    def processor_inputs(self, texts, videos) -> dict:
        """The processor call `sharp ask` makes (for any frame size)."""
        proc = self.processor
        kwargs = {"return_tensors": "pt", "padding": True}
        if videos:
            kwargs.update(videos=videos, do_sample_frames=False, size=proc.video_processor.size,
                          video_metadata=[{"total_num_frames": len(v), "fps": FPS,
                                           "frames_indices": list(range(len(v))), "duration": len(v) / FPS}
                                          for v in videos])
            if hasattr(type(proc.video_processor), "cap_pixels_per_frame"):
                kwargs["cap_pixels_per_frame"] = True
            if self.device is not None:  # the pixel work on the accelerator: uint8 frames travel, not float32
                kwargs["device"] = str(self.device)
        return dict(proc(text=texts, **kwargs))

    def fast_inputs(self, texts, videos) -> dict:
        """The processor's result for clips already at SIZE x SIZE (no resize), in a few tensor ops on
        the clips' device: its own patchify, normalisation and token expansion (tested equal to the
        processor call). On the H200 the processor spent 128 ms a batch of 32 in Python."""
        proc, vp = self.processor, self.processor.video_processor
        x = torch.stack(videos).permute(0, 1, 4, 2, 3).float() / 255.0  # (B, T, 3, H, W)
        mean = torch.tensor(vp.image_mean, device=x.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(vp.image_std, device=x.device).view(1, 1, 3, 1, 1)
        patches, t, h, w = vp.patchify((x - mean) / std, patch_size=vp.patch_size, merge_size=vp.merge_size,
                                       temporal_patch_size=vp.temporal_patch_size)
        per_video = t * h * w // vp.merge_size**2
        expanded = [text.replace("<|video_pad|>", "<|video_pad|>" * per_video) for text in texts]
        out = dict(proc.tokenizer(expanded, padding=True, return_tensors="pt"))
        video_id = self.config.video_token_id
        out["mm_token_type_ids"] = (out["input_ids"] == video_id).long() * 2
        out["pixel_values_videos"] = patches.reshape(-1, patches.shape[-1])
        out["video_grid_thw"] = torch.tensor([[t, h, w]] * len(videos))
        out["second_per_grid_ts"] = torch.tensor([vp.temporal_patch_size / FPS] * len(videos))
        return out

    def labels(self, inputs, rows, targets) -> dict:
        proc = self.processor
        videos = [r for r in rows if r["kind"] == "video"]
        length = inputs["input_ids"].shape[1]
        positions = torch.arange(length).unsqueeze(0)
        inputs["loss_mask"] = positions >= (length - torch.tensor(targets)).unsqueeze(1)
        inputs["task"] = torch.tensor([r["task"] for r in rows])
        first = [proc.tokenizer(r["target"], add_special_tokens=False)["input_ids"][0] for r in rows]
        inputs["target"] = torch.tensor(first)
        if videos and all(r.get("words") is not None for r in rows if r["kind"] == "video"):
            words = [w for r in rows if r["kind"] == "video" for w in r["words"][0]]
            shows = [s for r in rows if r["kind"] == "video" for s in r["words"][1]]
            inputs["token_labels"] = torch.tensor(proc.tokenizer.convert_tokens_to_ids(words))
            inputs["shows_answer"] = torch.tensor(shows)
        return inputs


def pack(rows) -> dict:
    """Worker side: the clips as one uint8 tensor (one copy to the device), the rest as it is."""
    videos = [r["frames"] for r in rows if r["kind"] == "video"]
    return {"frames": torch.stack(videos) if videos else None, "rows": [dict(r, frames=None) for r in rows]}


def unpack(packed, device) -> list[dict]:
    frames = packed["frames"].to(device, non_blocking=True) if packed["frames"] is not None else None
    videos = iter(range(len(frames))) if frames is not None else iter(())
    return [dict(r, frames=frames[next(videos)]) if r["kind"] == "video" else r for r in packed["rows"]]


def black_rows(rows):
    """The same video rows with every frame black (the positional prior's input)."""
    return [dict(r, frames=torch.zeros_like(r["frames"])) if r["kind"] == "video" else r for r in rows]


__all__ = ["BASIC", "HARD", "TASKS", "Items", "Batcher", "small_config", "build_processor", "black_rows"]
