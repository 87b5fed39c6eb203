"""sharp-small's training data (scripts/small_data.py): batches equal to what the processor makes,
labels that point at what the pixels show, a language stage that is the same every run."""

import pytest
import torch

from scripts import small_data as data


@pytest.fixture(scope="module")
def config():
    return data.small_config(layers=2)


@pytest.fixture(scope="module")
def rows():
    items = data.Items(data.TRAIN_SEEDS_FROM, data.TASKS, language=0.4, bare=0.3, frames=32)
    return [items[n] for n in range(6)]


def test_fast_batch_equals_the_processor_call(config, rows):
    """The training path skips the processor's Python (128 ms a batch on the H200); it must build
    the very tensors `sharp ask`'s processor call builds."""
    fast = data.Batcher(config)
    reference = data.Batcher(config)
    reference.fast_inputs = reference.processor_inputs  # the processor call, whatever the frame size
    a, b = fast(rows), reference(rows)
    assert {r["kind"] for r in rows} == {"video", "language"}
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.is_floating_point:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
        else:
            assert torch.equal(a[key], b[key]), key


def test_loss_mask_covers_the_answer_and_its_end(config, rows):
    batch = data.Batcher(config)(rows)
    tokenizer = data.build_processor(config).tokenizer
    for i, row in enumerate(rows):
        supervised = tokenizer.decode(batch["input_ids"][i][batch["loss_mask"][i]])
        assert supervised.split() == (row["target"] + " <|im_end|>").split()


def test_token_labels_name_the_flash_colour_where_it_is():
    from sharp_cli.evaluate import synth

    frames, item = synth.make_item(3, 4, synth.TASKS, frames=32, size=data.SIZE)  # a `flash` item
    assert item["category"] == "flash"
    words, shows = data.token_words(frames, item)
    colour = data.answer_text(item).split()[0]
    cells = data.SIZE // 28
    named = [n for n, w in enumerate(words) if w != data.NONE]
    assert named and all(words[n] == colour for n in named)
    for n in named:  # every labelled token's cell holds the flash in one of its two frames
        t, rest = divmod(n, cells * cells)
        row, col = divmod(rest, cells)
        assert any(f // 2 == t and x0 < 28 * col + 28 and x1 > 28 * col and y0 < 28 * row + 28 and y1 > 28 * row
                   for f, x0, y0, x1, y1 in item["needle_boxes"])
    assert sum(shows) >= len(named)


def test_language_items_are_a_function_of_their_number():
    grammar = data.Grammar()
    assert data.language_item(grammar, 7) == data.language_item(data.Grammar(), 7)
    user, target = data.language_item(grammar, 3)  # a count question: the answer is the count
    word = user.split()[-6]
    assert target == str(user.split(" . how many")[0].split().count(word))
    user, target = data.language_item(grammar, 1)  # copy
    assert user.split(" : ", 1)[1] == target


def test_rotary_bands_and_time_step_reach_the_model_config():
    config = data.small_config(layers=2, rope_theta=1e6, tokens_per_second=4, mrope_section=(8, 4, 4))
    assert config.text_config.rope_parameters["mrope_section"] == [8, 4, 4]
    assert config.text_config.rope_parameters["rope_theta"] == 1e6
    assert config.vision_config.tokens_per_second == 4
    with pytest.raises(ValueError, match="head dim"):
        data.small_config(layers=2, mrope_section=(4, 4, 4))
