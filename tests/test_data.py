"""Tests for the shapes world v2 (nanorf/shapes.py, re-exported by nanorf/data.py): rendering to
spec, prompts and captions of every kind, questions, the held-out split, the training stream,
the image-caption folder and the dump CLI. The pixel scorer's tests are in test_eval.py."""

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanorf.config import TrainConfig
from nanorf.data import (COLORS, DEFAULT_KINDS, KINDS, MAX_ANSWER_BYTES, PALETTE, POSITIONS, RELATIONS, SHAPES,
                         DataError, ImageCaptionFolder, Obj, Prompt, Scene, ShapesWorld, canonical, describe,
                         draw_prompt, draw_scene, held_out_prompts, holds, is_held_out, main, object_map,
                         palette_index, parse_caption, question_kind, questions, render)

REPO = Path(__file__).resolve().parents[1]
CLASSES = [Obj(c, s) for c in COLORS for s in SHAPES]


def one(color, shape, position):
    return Scene((Obj(color, shape, position),))


def neighbours4(mask):
    """The mask grown by its 4-neighbours."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def n_components4(mask):
    """Number of 4-connected components of a bool mask (flood fill)."""
    seen, n = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n, stack = n + 1, [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return n


# --- rendering, to spec -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_matches_the_spec(size):
    cell = size / 3
    allowed = {(0, 0, 0), *PALETTE.values()}
    world = ShapesWorld(size, seed=3)
    seen_shapes, seen_counts = set(), set()
    for i in range({32: 150, 48: 100, 64: 60}[size]):
        item = world.item(i, KINDS[i % 5])
        image, scene, objects = item["image"], item["scene"], item["object_map"]
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert {tuple(c) for c in image.reshape(-1, 3)} <= allowed  # no antialiasing
        assert not image[objects == 0].any(), "background must be black"
        seen_counts.add(len(scene.objects))
        for k, obj in enumerate(scene.objects):
            mask = objects == k + 1
            assert (image[mask] == PALETTE[obj.color]).all()
            assert n_components4(mask) == 1, item["caption"]
            # objects never touch: nothing of another object in this one's 4-neighbourhood
            assert not (neighbours4(mask) & (objects > 0) & ~mask).any(), item["caption"]
            ys, xs = np.nonzero(mask)
            y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
            h, w = y1 - y0 + 1, x1 - x0 + 1
            for side in (h, w):
                assert 0.6 * cell - 1 <= side <= 0.9 * cell + 1, (item["caption"], h, w)
            row, col = divmod(POSITIONS.index(obj.position), 3)
            cy, cx = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2  # box centre, pixel units
            assert abs(cx - (col + 0.5) * cell) <= 0.08 * cell + 1, item["caption"]
            assert abs(cy - (row + 0.5) * cell) <= 0.08 * cell + 1, item["caption"]
            box = mask[y0:y1 + 1, x0:x1 + 1]
            if obj.shape == "square":
                assert box.all()
            elif obj.shape == "circle":
                assert not box[[0, 0, -1, -1], [0, -1, 0, -1]].any()  # corners empty
                assert 0.6 < box.mean() < 0.95  # pi/4 of its box, give or take pixels
            else:  # upright: narrow apex, full-width base
                assert box[0].sum() <= 2 and box[-1].all()
            seen_shapes.add(obj.shape)
    assert seen_shapes == set(SHAPES) and seen_counts == {1, 2, 3, 4}


def test_crowded_scenes_keep_apart():
    # Four objects in a row of cells and a column, the closest layouts there are, at 32 px.
    for i in range(200):
        cells = ("top left", "top", "left", "center") if i % 2 else ("top", "center", "bottom", "right")
        scene = Scene(tuple(Obj(COLORS[0], SHAPES[(i + k) % 3], c) for k, c in enumerate(cells)))
        objects = object_map(scene, 32, random.Random(i))
        for k in range(4):
            mask = objects == k + 1
            assert mask.any() and not (neighbours4(mask) & (objects > 0) & ~mask).any()
        # all four share one colour, so touching would merge them into fewer components
        assert n_components4(objects > 0) == 4


def test_box_sizes_and_jitter_fill_their_ranges():
    # At 192 px a pixel is 1/64 of a cell, so the ranges can be checked tightly.
    size, cell = 192, 64
    sides, offsets = [], []
    for i in range(150):
        scene = one(COLORS[i % 6], SHAPES[i % 3], POSITIONS[i % 9])
        ys, xs = np.nonzero(render(scene, size, random.Random(i)).any(-1))
        row, col = divmod(i % 9, 3)
        sides += [(ys.max() - ys.min() + 1) / cell, (xs.max() - xs.min() + 1) / cell]
        offsets += [((ys.min() + ys.max() + 1) / 2 - (row + 0.5) * cell) / cell,
                    ((xs.min() + xs.max() + 1) / 2 - (col + 0.5) * cell) / cell]
    sides, offsets = np.array(sides), np.abs(offsets)
    assert sides.min() >= 0.6 - 1 / cell and sides.max() <= 0.9 + 1 / cell
    assert sides.min() < 0.62 and sides.max() > 0.88
    assert offsets.max() <= 0.08 + 0.5 / cell and offsets.max() > 0.07


def test_non_square_canvas():
    scene = Scene((Obj("red", "circle", "top left"), Obj("blue", "square", "bottom right")))
    image = render(scene, (32, 64), random.Random(0))
    assert image.shape == (32, 64, 3)
    ys, xs = np.nonzero((palette_index(image) == 1 + COLORS.index("blue")))
    assert ys.mean() > 2 * 32 / 3 and xs.mean() > 2 * 64 / 3
    assert ShapesWorld((48, 32), seed=0)[0]["image"].shape == (48, 32, 3)


@pytest.mark.parametrize("size", [0, 8, 40, 33, -16, (32, 40)])
def test_sizes_that_are_not_multiples_of_16_raise(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        render(one("red", "circle", "top"), size, random.Random(0))
    with pytest.raises(ValueError):
        ShapesWorld(size=size)


def test_palette_index():
    image = np.array([[PALETTE[c] for c in COLORS] + [(0, 0, 0), (20, 20, 20), (200, 30, 40)]], np.uint8)
    assert palette_index(image).tolist() == [[1, 2, 3, 4, 5, 6, 0, 0, 1]]


# --- prompts and captions -----------------------------------------------------------------------

def test_captions_of_every_kind():
    rc, bs = Obj("red", "circle"), Obj("blue", "square")
    assert Prompt("single", (rc,)).text == "a red circle"
    assert Prompt("two", (rc, bs)).text == "a red circle and a blue square"
    assert Prompt("counting", (rc,) * 2).text == "two red circles"
    assert Prompt("counting", (Obj("cyan", "triangle"),) * 3).text == "three cyan triangles"
    assert Prompt("counting", (bs,) * 4).text == "four blue squares"
    for rel in RELATIONS:
        assert Prompt("position", (rc, bs), rel).text == f"a red circle {rel} a blue square"
    assert Prompt("position", (rc, bs), "above").text == "a red circle above a blue square"
    loc = Prompt("located", (Obj("red", "circle", "top left"), Obj("blue", "square", "right")))
    assert loc.text == "a red circle at the top left and a blue square at the right"
    assert describe(Scene((Obj("blue", "square", "right"), Obj("red", "circle", "top left")))) == loc.text


@pytest.mark.parametrize("bad", [
    ("single", (Obj("red", "circle"),) * 2, None), ("two", (Obj("red", "circle"),) * 2, None),
    ("counting", (Obj("red", "circle"),), None), ("counting", (Obj("red", "circle"),) * 5, None),
    ("counting", (Obj("red", "circle"), Obj("red", "square")), None),
    ("position", (Obj("red", "circle"), Obj("blue", "square")), None),
    ("position", (Obj("red", "circle"), Obj("red", "circle")), "above"),
    ("position", (Obj("red", "circle"), Obj("blue", "square")), "near"),
    ("located", (Obj("red", "circle", "top"), Obj("blue", "square", "top")), None),
    ("located", (Obj("red", "circle"),), None), ("single", (Obj("red", "circle", "top"),), None),
    ("two", (Obj("red", "circle"), Obj("blue", "square")), "above"), ("triple", (Obj("red", "circle"),), None),
])
def test_prompts_validate_themselves(bad):
    with pytest.raises(ValueError):
        Prompt(*bad)


def test_scenes_and_objects_validate_themselves():
    with pytest.raises(ValueError):
        Obj("purple", "circle", "top")
    with pytest.raises(ValueError):
        Obj("red", "circle", "middle")
    with pytest.raises(ValueError):
        Scene((Obj("red", "circle", "top"), Obj("blue", "square", "top")))
    with pytest.raises(ValueError):
        Scene((Obj("red", "circle"),))
    with pytest.raises(ValueError):
        Scene(())
    with pytest.raises(ValueError):
        Scene(tuple(Obj("red", "circle", p) for p in POSITIONS[:5]))
    Scene((Obj("red", "circle", "top"), Obj("red", "circle", "left")))  # repeats are fine in v2


def test_every_drawn_prompt_round_trips():
    rng = random.Random(0)
    for kind in KINDS:
        texts = set()
        for _ in range(300):
            p = draw_prompt(kind, rng)
            assert p.kind == kind and parse_caption(p.text) == p
            assert parse_caption("  " + p.text.upper().replace(" ", "  ") + " ") == p
            texts.add(p.text)
        assert len(texts) >= {"single": 18, "counting": 50}.get(kind, 100), kind
    for n in (1, 2, 3, 4):  # describe answers: located captions of up to four objects parse
        s = draw_scene(draw_prompt("counting", rng), rng) if n > 1 else draw_scene(draw_prompt("single", rng), rng)
        s = Scene(s.objects[:n])
        assert parse_caption(describe(s)) == Prompt("located", tuple(sorted(
            s.objects, key=lambda o: POSITIONS.index(o.position))))


def test_v1_captions_still_parse_and_render():
    v1 = ["a red circle at the top left and a blue square at the right", "a cyan square at the center",
          "a magenta triangle at the bottom right and a green circle at the top"]
    for text in v1:
        p = parse_caption(text)
        assert p.kind == "located" and p.text == text
        scene = draw_scene(p, random.Random(0))
        assert scene.objects == p.objects
        image = render(scene, 32, random.Random(1))
        for o in p.objects:
            ys, xs = np.nonzero(palette_index(image) == 1 + COLORS.index(o.color))
            row, col = divmod(POSITIONS.index(o.position), 3)
            assert int(ys.mean() * 3 / 32) == row and int(xs.mean() * 3 / 32) == col


@pytest.mark.parametrize("junk", [
    "", "a red", "a purple circle", "a red circle at the middle", "a red circle at the top and",
    "a red hexagon", "red circle", "one red circle", "five red circles", "two red circle",
    "a red circle and a red circle", "a red circle above a red circle", "a red circle near a blue square",
    "a red circle at the top and a blue square at the top", "a red circle and a blue square at the top",
    "a red circle and a blue square and a green circle",
    "a red circle at the top and a blue square at the left and a green circle at the right and "
    "a cyan circle at the center and a red square at the bottom",
    None, 42,
])
def test_parse_caption_rejects_junk(junk):
    assert parse_caption(junk) is None


def test_scenes_fit_their_prompts():
    rng = random.Random(2)
    cells = Counter()
    for kind in KINDS:
        for _ in range(300):
            p = draw_prompt(kind, rng)
            s = draw_scene(p, rng)
            assert [(o.color, o.shape) for o in s.objects] == [(o.color, o.shape) for o in p.objects]
            if kind == "position":
                assert holds(p.relation, s.objects[0].position, s.objects[1].position)
            if kind == "located":
                assert s.objects == p.objects
            cells.update(o.position for o in s.objects)
    assert set(cells) == set(POSITIONS)
    assert holds("to the left of", "top left", "bottom") and not holds("to the left of", "top", "bottom")
    assert holds("above", "top right", "left") and holds("below", "bottom left", "center")
    assert holds("to the right of", "right", "center") and not holds("above", "left", "right")


# --- understanding --------------------------------------------------------------------------------

def test_questions_on_hand_built_scenes():
    s = Scene((Obj("blue", "circle", "right"), Obj("red", "circle", "top left"), Obj("red", "circle", "bottom")))
    assert questions(s) == [
        ("describe the image.", "a red circle at the top left and a blue circle at the right "
                                "and a red circle at the bottom"),
        ("how many red circles are there?", "two"),
        ("how many blue circles are there?", "one"),
        ("how many red squares are there?", "zero"),   # the first absent colour+shape
        ("where is the blue circle?", "right"),        # not the red circle: there are two
        ("what shape is at the top left?", "circle"),
        ("what shape is at the right?", "circle"),
        ("what shape is at the bottom?", "circle"),
        ("what shape is at the top?", "nothing"),      # the first empty cell
    ]                                                  # no color question: three circles
    s = Scene((Obj("green", "triangle", "bottom"), Obj("green", "square", "center")))
    qa = questions(s)
    assert qa[0] == ("describe the image.", "a green square at the center and a green triangle at the bottom")
    assert ("what color is the triangle?", "green") in qa and ("what color is the square?", "green") in qa
    assert ("where is the green triangle?", "bottom") in qa and ("how many green squares are there?", "one") in qa
    full = Scene(tuple(Obj("cyan", "square", p) for p in POSITIONS[:4]))
    qa = dict(questions(full, random.Random(0)))
    assert qa["how many cyan squares are there?"] == "four" and "where is the cyan square?" not in qa
    assert sum(a == "zero" for a in qa.values()) == 1 and sum(a == "nothing" for a in qa.values()) == 1
    assert [question_kind(q) for q, _ in questions(s)] == ["describe", "count", "count", "count", "where",
                                                           "where", "shape", "shape", "shape", "color", "color"]
    with pytest.raises(ValueError):
        question_kind("why?")


def test_answers_fit_the_stated_maximum():
    longest = Scene(tuple(Obj("magenta", "triangle", p) for p in ("top left", "top right", "bottom left",
                                                                 "bottom right")))
    assert len(describe(longest).encode()) == MAX_ANSWER_BYTES == 159
    world = ShapesWorld(32, seed=1)
    for i in range(200):
        it = world[i]
        assert len(it["caption"].encode()) <= 80  # every prompt fits the toy's max_text_len
        assert all(len(a.encode()) <= MAX_ANSWER_BYTES and len(q.encode()) < 80 for q, a in it["qa"])


# --- the world and its split ----------------------------------------------------------------------

def test_world_rejects_bad_arguments():
    for kwargs in ({"split": "val"}, {"held_out_fraction": 0.0}, {"held_out_fraction": 1.0},
                   {"kinds": (1, 1)}, {"kinds": (1, -1, 1, 1, 1)}, {"kinds": (0, 0, 0, 0, 0)},
                   {"kinds": (1, 0, 0, 0, 0), "split": "test"}):
        with pytest.raises(ValueError):
            ShapesWorld(**kwargs)


def test_items_are_deterministic_and_distinct():
    a, b = ShapesWorld(32, seed=7), ShapesWorld(32, seed=7)
    b[11]  # access order must not matter
    x, y = a[5], b[5]
    assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert x["scene"] == y["scene"] and x["qa"] == y["qa"] and x["kind"] == y["kind"]
    assert set(x) == {"image", "caption", "qa", "kind", "prompt", "scene", "object_map"}
    images = [a[i]["image"].tobytes() for i in range(20)]
    assert len(set(images)) == 20
    assert not np.array_equal(a[5]["image"], ShapesWorld(32, seed=8)[5]["image"])
    with pytest.raises(IndexError):
        a[-1]


def test_items_do_not_depend_on_python_hash_seed():
    code = ("import hashlib; from nanorf.data import ShapesWorld; w = ShapesWorld(32, seed=2);"
            "print(hashlib.sha256(b''.join(w[i]['image'].tobytes() + w[i]['caption'].encode()"
            " for i in range(10))).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    w = ShapesWorld(32, seed=2)
    here = hashlib.sha256(b"".join(w[i]["image"].tobytes() + w[i]["caption"].encode()
                                   for i in range(10))).hexdigest()
    assert out == here


def test_the_split_is_symmetric():
    pairs = list(itertools.permutations(CLASSES, 2))
    held_two = [p for p in (Prompt("two", ab) for ab in pairs) if is_held_out(p)]
    assert 0 < len(held_two) < len(pairs) / 4
    for a, b in pairs:
        assert is_held_out(f"a {a.name} and a {b.name}") == is_held_out(f"a {b.name} and a {a.name}")
        for r1, r2 in (("to the left of", "to the right of"), ("above", "below")):
            assert is_held_out(f"a {a.name} {r1} a {b.name}") == is_held_out(f"a {b.name} {r2} a {a.name}")
            assert canonical(Prompt("position", (a, b), r1)) == canonical(Prompt("position", (b, a), r2))
    held_pos = [(a, b) for a, b in pairs if is_held_out(Prompt("position", (a, b), "above"))]
    assert 0 < len(held_pos) < len(pairs) / 4
    # left/right and above/below are separate captions: they need not fall together
    assert any(is_held_out(Prompt("position", (a, b), "above")) != is_held_out(Prompt("position", (a, b),
                                                                                      "to the left of"))
               for a, b in pairs)
    rng = random.Random(0)
    for _ in range(500):
        p = draw_prompt("located", rng)
        assert is_held_out(p) == is_held_out(Prompt("located", p.objects[::-1]))
    assert not any(is_held_out(Prompt("single", (c,))) for c in CLASSES)  # too few to hold any out
    assert sum(is_held_out(Prompt("counting", (c,) * n)) for c in CLASSES for n in (2, 3, 4)) == 5
    assert not is_held_out("a red circle", fraction=0.99) and is_held_out("two red circles", fraction=0.9999)


def test_training_never_sees_a_held_out_caption_and_draws_kinds_in_proportion():
    assert DEFAULT_KINDS == TrainConfig().kinds
    train = ShapesWorld(32, seed=4)
    kinds = Counter()
    for i in range(2000):
        d = train.draw(i)
        kinds[d[0].kind] += 1
        assert not is_held_out(d[0]) and not is_held_out(describe(d[1]))
    for k, w in zip(KINDS, DEFAULT_KINDS):  # binomial sd <= 0.0097 at n = 2000: within 3 sd
        assert abs(kinds[k] / 2000 - w) < 0.03, (k, kinds)
    skewed = Counter(ShapesWorld(32, seed=4, kinds=(0, 0, 3, 1, 0)).draw(i)[0].kind for i in range(400))
    assert set(skewed) == {"counting", "position"} and 0.65 < skewed["counting"] / 400 < 0.85
    test = ShapesWorld(32, seed=4, split="test")
    for i in range(200):
        p = test.draw(i)[0]
        assert p.kind != "single" and is_held_out(p)


def test_held_out_prompts():
    prompts = held_out_prompts(50)
    assert prompts[:10] == held_out_prompts(2) and held_out_prompts(2, seed=9) != prompts[:10]
    assert [p.kind for p in prompts[:10]] == list(KINDS) * 2  # round-robin
    by_kind = {k: [p for p in prompts if p.kind == k] for k in KINDS}
    assert all(len(v) == 50 for v in by_kind.values())
    singles = Counter(p.text for p in by_kind["single"])  # all 18, evenly: 50 = 18 + 18 + 14
    assert set(singles) == {f"a {c.name}" for c in CLASSES} and set(singles.values()) == {2, 3}
    assert set(Counter(p.text for p in by_kind["counting"]).values()) == {10}  # 5 held out, 10 rounds
    for k in KINDS[1:]:
        assert all(is_held_out(p) for p in by_kind[k])
    distinct = {k: len({p.text for p in v}) for k, v in by_kind.items()}
    assert distinct == {"single": 18, "two": 38, "counting": 5, "position": 50, "located": 50}, distinct


# --- the dump CLI -------------------------------------------------------------------------------

def test_dump_cli(tmp_path, capsys):
    out = tmp_path / "dump"
    main(["--dump", str(out), "--n", "7", "--seed", "3", "--size", "48"])
    assert sorted(p.name for p in out.iterdir()) == [f"000{i}.png" for i in range(7)] + ["prompts.txt"]
    prompts = (out / "prompts.txt").read_text().splitlines()
    world = ShapesWorld(48, seed=3)
    items = [world.item(i, KINDS[i % 5]) for i in range(7)]
    assert prompts == [it["caption"] for it in items]
    assert {parse_caption(p).kind for p in prompts} == set(KINDS)
    for i in range(7):
        assert np.array_equal(np.asarray(Image.open(out / f"000{i}.png")), items[i]["image"])

    main(["--dump", str(tmp_path / "test"), "--n", "4", "--split", "test"])
    held = (tmp_path / "test" / "prompts.txt").read_text().splitlines()
    assert all(is_held_out(c) for c in held) and len({parse_caption(c).kind for c in held}) == 4


def test_dump_cli_writes_nothing_when_it_fails(tmp_path, monkeypatch):
    real = ShapesWorld.item

    def failing(self, i, kind=None):
        if i == 3:
            raise RuntimeError("disk on fire")
        return real(self, i, kind)
    monkeypatch.setattr(ShapesWorld, "item", failing)
    out = tmp_path / "dump"
    with pytest.raises(RuntimeError):
        main(["--dump", str(out), "--n", "5"])
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args", [["--size", "40"], ["--n", "0"], ["--size", "0"]])
def test_dump_cli_rejects_bad_input(tmp_path, capsys, args):
    out = tmp_path / "dump"
    with pytest.raises(SystemExit) as e:
        main(["--dump", str(out), "--n", "4", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not out.exists()


def test_dump_cli_as_a_module(tmp_path):
    run = subprocess.run([sys.executable, "-m", "nanorf.data", "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "--dump" in run.stdout and "--split" in run.stdout


# --- image-caption folder ---------------------------------------------------------------------

def make_folder(root):
    root.mkdir()
    wide = np.zeros((32, 96, 3), np.uint8)  # red | green | blue thirds
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = PALETTE["red"], PALETTE["green"], PALETTE["blue"]
    Image.fromarray(wide).save(root / "wide.png")
    tall = np.zeros((60, 20), np.uint8)  # grey levels: 255 on top, 128 middle, 0 bottom
    tall[:20], tall[20:40] = 255, 128
    Image.fromarray(tall, mode="L").save(root / "tall.png")
    Image.new("RGBA", (16, 16), (10, 20, 30, 255)).save(root / "small.png")
    lines = [{"file": "wide.png", "text": "three stripes"},
             {"file": "tall.png", "text": "a red circle at the top"},
             {"file": "small.png", "text": "a dark square"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")


def test_image_caption_folder(tmp_path):
    make_folder(tmp_path / "d")
    ds = ImageCaptionFolder(tmp_path / "d", 16)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    for it in items:
        assert it["image"].shape == (16, 16, 3) and it["image"].dtype == np.uint8
        assert it["qa"] == [("describe the image.", it["caption"])]
    centre = items[0]["image"][:, 3:13].astype(int)  # the centre crop keeps the green stripe
    assert np.abs(centre - PALETTE["green"]).max() <= 12
    assert np.abs(items[1]["image"][4:12].astype(int) - 128).max() <= 12
    assert (items[2]["image"] == (10, 20, 30)).all()
    assert items[0]["prompt"] is None
    assert items[1]["prompt"] == Prompt("located", (Obj("red", "circle", "top"),))


def test_image_caption_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageCaptionFolder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="captions.jsonl"):
        ImageCaptionFolder(tmp_path / "empty", 16)

    make_folder(tmp_path / "d")
    index = tmp_path / "d" / "captions.jsonl"
    good = index.read_text()
    index.write_text(good.replace('"tall.png"', '"tall.png', 1))
    with pytest.raises(DataError, match="captions.jsonl line 2: bad JSON") as e:
        ImageCaptionFolder(tmp_path / "d", 16)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    index.write_text(good.replace("small.png", "gone.png"))
    with pytest.raises(DataError, match="gone.png"):
        ImageCaptionFolder(tmp_path / "d", 16)
    index.write_text('{"file": "wide.png"}\n')
    with pytest.raises(DataError, match="line 1"):
        ImageCaptionFolder(tmp_path / "d", 16)

    (tmp_path / "d" / "small.png").write_bytes(b"not a png at all")
    index.write_text(good)
    ds = ImageCaptionFolder(tmp_path / "d", 16)
    with pytest.raises(DataError, match="small.png") as e:
        ds[2]
    assert "\n" not in str(e.value)




def test_understanding_examples_ask_und_turns_distinct_questions_of_their_image(tiny_config, tiny_model):
    """train.und_turns = 3: every example's turns are three different (question, answer) pairs of
    its own scene; und_turns = 1 keeps the single-question draw (no follow-ups), and both see the
    same images."""
    from nanorf.stream import Stream
    cfg, model = tiny_config(), tiny_model()
    cfg.train.und_batch_size = 4
    one = Stream(cfg, model).und_batch(5, range(4), "cpu")
    cfg.train.und_turns = 3
    stream = Stream(cfg, model)
    three = stream.und_batch(5, range(4), "cpu")
    assert one.follow_ups is None and [len(f) for f in three.follow_ups] == [2] * 4
    assert (one.images == three.images).all()
    dec = model.tok.decode
    for k in range(4):
        qa = stream.und[5 * 4 + k]["qa"]
        turns = [(three.questions[k], three.answers[k]), *three.follow_ups[k]]
        got = [(dec(q)[:-1], dec(a)) for q, a in turns]                      # question_ids adds one space
        assert len(set(got)) == 3 and all(pair in qa for pair in got)
        assert (dec(one.questions[k])[:-1], dec(one.answers[k])) in qa
