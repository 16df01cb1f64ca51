"""Generated image conversations: each example a pure function of its index, held-out lines unseen
in training, the loss on the answer only, one image token per row, rows sliced with their images."""

import random

import pytest
import torch

from moegpt.data import image_gen
from moegpt.data.chat import chat_format
from moegpt.data.images import ImageProcessing
from moegpt.data.sft import IGNORE
from moegpt.data.tokenizer import Tokenizer
from moegpt.data.vision_data import ImageTextSource, VisionData, parse_vision_mixture
from moegpt.vision_config import TOWER_PRESETS

LINES = (("to be or not to be", "that is the question", "whether tis nobler"),
         ("in the mind to suffer", "the slings and arrows"))


@pytest.fixture(scope="module")
def data():
    tok = Tokenizer.train([" ".join(LINES[0] + LINES[1]) + " Transcribe the text. Describe the shapes. " * 20
                           + " ".join(image_gen.SHAPES + tuple(image_gen.COLOURS))], vocab_size=400)
    sources = (ImageTextSource(name="screenshots", kind="screenshots", epochs=1, train_size=50, val_size=6, lines=LINES),
               ImageTextSource(name="shapes", kind="shapes", epochs=2, train_size=40, val_size=6))
    return VisionData(sources, tok, chat_format(tok), ImageProcessing.for_tower(TOWER_PRESETS["demo"]), 64, 0)


def test_an_example_is_a_pure_function_of_its_index(data):
    pairs = torch.tensor([[0, 3], [1, 5], [0, 7]])
    a, b = data.gather(pairs), data.gather(pairs)
    for field in ("inputs", "targets", "locations", "pixels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    other = data.gather(torch.tensor([[0, 4], [1, 6], [0, 8]]))
    assert not torch.equal(a.pixels, other.pixels)
    assert a.pixels.shape == (3, 3, 96, 96) and a.inputs.shape == (3, 64)


def test_rows_have_one_image_token_and_learn_only_the_answer(data):
    batch = data.gather(torch.tensor([[0, 1], [1, 2]]))
    assert batch.locations.sum(1).tolist() == [1, 1]
    for r, (s, i) in enumerate([(0, 1), (1, 2)]):
        _, _, answer = data.sources[s].example("train", i, 0, 96)
        learned = batch.targets[r][batch.targets[r] != IGNORE].tolist()
        assert data.tokenizer.decode(learned, skip_special=True).strip() == answer
        assert data.tokenizer.decode(learned, skip_special=False).rstrip().endswith("<|im_end|>")


def test_rows_slice_with_their_images(data):
    batch = data.gather(torch.tensor([[0, 1], [1, 2], [0, 3]]))
    part = batch.rows(1, 3)
    assert torch.equal(part.pixels, batch.pixels[1:3]) and torch.equal(part.inputs, batch.inputs[1:3])


def test_held_out_screenshots_show_only_held_out_lines(data):
    for i in range(6):
        _, _, line = data.sources[0].example("val", i, 0, 96)
        assert line in LINES[1]


def test_corpus_lines_hold_out_each_corpus_end():
    train, val = parse_vision_mixture("screenshots:1")[0].lines
    assert not set(val) & set(train)
    assert all(image_gen.MIN_LINE_CHARS <= len(x) <= image_gen.MAX_LINE_CHARS for x in train[:1000] + val[:1000])


def test_mixture_errors_name_the_item():
    with pytest.raises(ValueError, match="unknown image source 'pictures'"):
        parse_vision_mixture("pictures:1")
    with pytest.raises(ValueError, match="epochs 'x' is not a number"):
        parse_vision_mixture("shapes:x")
    with pytest.raises(ValueError, match="repeats source name 'shapes'"):
        parse_vision_mixture("shapes:1,shapes:2")
    assert [s.name for s in parse_vision_mixture("more=shapes:2,shapes")] == ["more", "shapes"]


def test_scene_answers_parse_back_and_shapes_sit_in_their_cell():
    for seed in range(30):
        image, scene = image_gen.render_shapes(random.Random(seed), 96)
        assert image_gen.Scene.parse(scene.answer()) == scene
        background = image.getpixel((0, 0)) if "top left" != scene.position else image.getpixel((95, 95))
        px = torch.tensor(list(image.getdata())).view(96, 96, 3)
        drawn = (px - torch.tensor(background)).abs().sum(-1) > 60  # (H, W) the shapes' pixels
        rows, cols = drawn.nonzero().unbind(1)
        names = {0: "top", 1: "middle", 2: "bottom"}, {0: "left", 1: "center", 2: "right"}
        r, c = names[0][int(rows.float().mean()) // 32], names[1][int(cols.float().mean()) // 32]
        assert scene.position == ("center" if (r, c) == ("middle", "center") else f"{r} {c}")
    assert image_gen.Scene.parse("three red circles") is None


def test_wrapping_keeps_the_line_and_breaks_long_words():
    font = image_gen._font(11)
    lines = image_gen.wrap("the quick brown fox jumps over it", font, 60)
    assert " ".join(lines) == "the quick brown fox jumps over it" and len(lines) > 1
    broken = image_gen.wrap("supercalifragilistic", font, 40)
    assert "".join(broken) == "supercalifragilistic" and len(broken) > 1


def test_character_accuracy_counts_edits():
    assert image_gen.edit_distance("kitten", "sitting") == 3
    assert image_gen.character_accuracy(["abcd", "xy"], ["abcd", "xz"]) == pytest.approx(1 - 1 / 6)
    assert image_gen.character_accuracy(["", ""], ["ab", "c"]) == 0.0
