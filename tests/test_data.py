"""Tests for nanorf/data.py: the shapes world to spec (DESIGN.md §3), the splits, the
image-caption folder, the pixel scorer, and the dump CLI."""

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanorf.data import (COLORS, PALETTE, POSITIONS, SHAPES, DataError, Detection,
                         ImageCaptionFolder, Obj, Scene, ShapesWorld, _components, caption,
                         detect, held_out_prompts, is_held_out, main, parse_caption, questions,
                         render, sample_scene, score_batch, score_image)

REPO = Path(__file__).resolve().parents[1]


def object_pixels(image, color):
    return np.all(image == np.array(PALETTE[color], np.uint8), axis=-1)  # (H, W) bool


def one(color, shape, position):
    return Scene((Obj(color, shape, position),))


# --- the world, to spec ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_matches_the_spec(size):
    cell = size / 3
    allowed = {(0, 0, 0), *PALETTE.values()}
    world = ShapesWorld(size, seed=3)
    seen_shapes, seen_two = set(), False
    for i in range(80):
        item = world[i]
        image, scene = item["image"], item["scene"]
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert {tuple(c) for c in image.reshape(-1, 3)} <= allowed  # no antialiasing
        if len(scene.objects) == 2:
            seen_two = True
            a, b = scene.objects
            assert a.position != b.position and a.color != b.color
        covered = np.zeros((size, size), bool)
        for obj in scene.objects:
            mask = object_pixels(image, obj.color)
            covered |= mask
            ys, xs = np.nonzero(mask)
            assert len(ys) > 0, item["caption"]
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
        assert not image[~covered].any(), "background must be black"
    assert seen_shapes == set(SHAPES) and seen_two


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


@pytest.mark.parametrize("size", [0, 8, 40, 33, -16])
def test_sizes_that_are_not_multiples_of_16_raise(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        render(one("red", "circle", "top"), size, random.Random(0))
    with pytest.raises(ValueError):
        ShapesWorld(size=size)


def test_world_rejects_bad_arguments():
    for kwargs in ({"split": "val"}, {"p_two": 1.5}, {"held_out_fraction": 0.0},
                   {"held_out_fraction": 1.0}):
        with pytest.raises(ValueError):
            ShapesWorld(**kwargs)


def test_items_are_deterministic_and_distinct():
    a, b = ShapesWorld(32, seed=7), ShapesWorld(32, seed=7)
    b[11]  # access order must not matter
    x, y = a[5], b[5]
    assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert x["scene"] == y["scene"] and x["qa"] == y["qa"]
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


def test_caption_format_and_round_trip():
    scene = Scene((Obj("red", "circle", "top left"), Obj("blue", "triangle", "bottom")))
    assert caption(scene) == "a red circle at the top left and a blue triangle at the bottom"
    assert caption(one("cyan", "square", "center")) == "a cyan square at the center"
    rng = random.Random(0)
    for _ in range(500):
        s = sample_scene(rng)
        assert parse_caption(caption(s)) == s
    assert parse_caption("  A Red circle at  the top ") == one("red", "circle", "top")


@pytest.mark.parametrize("junk", [
    "", "a red circle", "a purple circle at the top", "a red circle at the middle",
    "a red circle at the top and", "a red hexagon at the top", "red circle at the top",
    "a red circle at the top and a red square at the left",    # same colour
    "a red circle at the top and a blue square at the top",    # same cell
    "a red circle at the top and a blue square at the left and a green circle at the right",
    None, 42,
])
def test_parse_caption_rejects_junk(junk):
    assert parse_caption(junk) is None


def test_scenes_validate_themselves():
    with pytest.raises(ValueError):
        Obj("purple", "circle", "top")
    with pytest.raises(ValueError):
        Scene((Obj("red", "circle", "top"), Obj("red", "square", "left")))
    with pytest.raises(ValueError):
        Scene(())


def test_sample_scene_covers_the_world():
    rng = random.Random(1)
    scenes = [sample_scene(rng, p_two=0.5) for _ in range(2000)]
    twos = sum(len(s.objects) == 2 for s in scenes)
    assert 850 < twos < 1150
    objs = [o for s in scenes for o in s.objects]
    assert {o.color for o in objs} == set(COLORS)
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.position for o in objs} == set(POSITIONS)
    assert all(len(sample_scene(rng, p_two=0.0).objects) == 1 for _ in range(50))
    assert all(len(sample_scene(rng, p_two=1.0).objects) == 2 for _ in range(50))


def test_questions():
    s = Scene((Obj("red", "circle", "top left"), Obj("blue", "circle", "right")))
    assert questions(s) == [
        ("describe the image.", "a red circle at the top left and a blue circle at the right"),
        ("where is the red circle?", "top left"),
        ("what shape is at the top left?", "circle"),
        ("where is the blue circle?", "right"),
        ("what shape is at the right?", "circle"),
    ]
    assert questions(one("green", "triangle", "bottom")) == [
        ("describe the image.", "a green triangle at the bottom"),
        ("what color is the triangle?", "green"),
        ("where is the green triangle?", "bottom"),
        ("what shape is at the bottom?", "triangle"),
    ]


# --- held-out split ---------------------------------------------------------------------------

def all_captions():
    for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS):
        yield f"a {c} {s} at the {p}"
    for (c1, c2), (p1, p2), s1, s2 in itertools.product(
            itertools.permutations(COLORS, 2), itertools.permutations(POSITIONS, 2), SHAPES, SHAPES):
        yield f"a {c1} {s1} at the {p1} and a {c2} {s2} at the {p2}"


def test_held_out_split():
    caps = list(all_captions())
    held = [c for c in caps if is_held_out(c)]
    assert 0.05 < len(held) / len(caps) < 0.075
    assert any(len(parse_caption(c).objects) == 1 for c in held)
    for c in held[:200]:  # both orders of a scene fall on the same side
        parts = c.split(" and ")
        assert is_held_out(" and ".join(reversed(parts)))
    assert not any(is_held_out(c, fraction=0.0) for c in caps[:500])

    train, test = ShapesWorld(32, seed=4), ShapesWorld(32, seed=4, split="test")
    assert not any(is_held_out(train[i]["caption"]) for i in range(300))
    assert all(is_held_out(test[i]["caption"]) for i in range(100))
    assert all(is_held_out(ShapesWorld(32, seed=4, p_two=0.0, split="test")[i]["caption"])
               for i in range(20))

    prompts = held_out_prompts(30)
    assert prompts == held_out_prompts(30) and len(prompts) == 30
    assert all(is_held_out(c) and caption(s) == c for c, s in prompts)
    world = ShapesWorld(32, seed=1234, split="test")
    assert [c for c, _ in prompts] == [world[i]["caption"] for i in range(30)]
    assert held_out_prompts(30, seed=99) != prompts


# --- scorer -----------------------------------------------------------------------------------

def reference_components(cls):
    """Plain BFS labelling, the slow obvious version of _components."""
    h, w = cls.shape
    lab = -np.ones((h, w), int)
    for y, x in zip(*np.nonzero(cls)):
        if lab[y, x] >= 0:
            continue
        lab[y, x] = y * w + x
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and lab[ny, nx] < 0 and cls[ny, nx] == cls[y, x]:
                    lab[ny, nx] = y * w + x
                    queue.append((ny, nx))
    return lab


def test_components_agree_with_bfs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cls = rng.integers(0, 3, (17, 23)) * (rng.random((17, 23)) < 0.7)
        assert np.array_equal(_components(cls), reference_components(cls))
    spiral = np.zeros((15, 15), int)  # one long winding component: many propagation steps
    spiral[1, 1:14] = spiral[1:14, 13] = spiral[13, 1:14] = spiral[3:14, 1] = 1
    spiral[3, 1:12] = spiral[3:12, 11] = spiral[11, 3:12] = spiral[5:12, 3] = 1
    labels = _components(spiral)
    assert np.array_equal(labels, reference_components(spiral))
    assert len(np.unique(labels[labels >= 0])) == 1
    diagonal = np.eye(4, dtype=int)  # 4-connectivity: diagonal neighbours are separate
    assert len(np.unique(_components(diagonal)[diagonal > 0])) == 4


@pytest.mark.parametrize("size,n", [(32, 300), (64, 100)])
def test_scorer_is_right_on_clean_renders(size, n):
    world = ShapesWorld(size, seed=11)
    items = [world[i] for i in range(n)]
    scores = [score_image(it["image"], it["scene"]) for it in items]
    assert np.mean([s["object"] == 1.0 for s in scores]) >= 0.98
    assert np.mean([s["exact"] for s in scores]) >= 0.98
    batch = score_batch([it["image"] for it in items], [it["scene"] for it in items])
    assert batch["exact"] == pytest.approx(np.mean([s["exact"] for s in scores]))
    assert batch["objects"] == pytest.approx(np.mean([len(it["scene"].objects) for it in items]))


def test_scorer_catches_each_kind_of_error():
    for shape in SHAPES:
        scene = one("red", shape, "top left")
        image = render(scene, 48, random.Random(shape))
        assert score_image(image, scene) == {"objects": 1, "color": 1.0, "position": 1.0,
                                              "shape": 1.0, "object": 1.0, "exact": 1.0, "count": 1.0}
        recoloured = image.copy()
        recoloured[object_pixels(image, "red")] = PALETTE["blue"]
        s = score_image(recoloured, scene)
        assert s["color"] == s["position"] == s["shape"] == s["object"] == s["exact"] == 0.0
        assert s["count"] == 1.0
        moved = score_image(image, one("red", shape, "bottom right"))
        assert (moved["color"], moved["position"], moved["shape"], moved["object"]) == (1, 0, 1, 0)
        other = SHAPES[(SHAPES.index(shape) + 1) % 3]
        wrong = score_image(image, one("red", other, "top left"))
        assert (wrong["color"], wrong["position"], wrong["shape"], wrong["exact"]) == (1, 1, 0, 0)
    black = score_image(np.zeros((32, 32, 3), np.uint8), one("red", "circle", "center"))
    assert all(black[k] == 0.0 for k in ("color", "position", "shape", "object", "exact", "count"))


def test_scorer_on_a_hand_built_image():
    image = np.zeros((48, 48, 3), np.uint8)
    image[3:13, 2:12] = PALETTE["red"]  # a 10x10 square in the top-left cell
    for k in range(9):  # an upright triangle, apex at (34, 38), in the bottom-right cell
        image[34 + k, 38 - k:39 + k] = PALETTE["green"]
    yy, xx = np.mgrid[0:48, 0:48]
    image[(yy - 24) ** 2 + (xx - 24) ** 2 <= 4.5 ** 2] = PALETTE["cyan"]  # a circle in the centre
    image[0, 47] = PALETTE["blue"]  # a one-pixel speck: below the noise floor
    assert sorted(detect(image), key=lambda d: d.color) == [
        Detection("cyan", "circle", "center", 69),
        Detection("green", "triangle", "bottom right", 81),
        Detection("red", "square", "top left", 100),
    ]
    two = Scene((Obj("red", "square", "top left"), Obj("green", "circle", "bottom right")))
    assert score_image(image, two) == {"objects": 2, "color": 1.0, "position": 1.0, "shape": 0.5,
                                       "object": 0.5, "exact": 0.0, "count": 0.0}
    image[(yy - 24) ** 2 + (xx - 24) ** 2 <= 4.5 ** 2] = 0
    right = Scene((Obj("green", "triangle", "bottom right"), Obj("red", "square", "top left")))
    assert score_image(image, right)["exact"] == 1.0
    wrong_cell = Scene((Obj("green", "triangle", "bottom"), Obj("yellow", "square", "top left")))
    assert score_image(image, wrong_cell) == {"objects": 2, "color": 0.5, "position": 0.0,
                                              "shape": 0.5, "object": 0.0, "exact": 0.0, "count": 1.0}
    with pytest.raises(ValueError):
        score_batch([image], [right, right])
    with pytest.raises(ValueError, match="uint8"):
        score_image(image / 255.0, right)


def test_scorer_tolerates_mild_noise():
    world, rng = ShapesWorld(32, seed=12), np.random.default_rng(0)
    items = [world[i] for i in range(100)]
    noisy = [np.clip(it["image"] + rng.normal(0, 10, it["image"].shape), 0, 255).astype(np.uint8)
             for it in items]
    assert score_batch(noisy, [it["scene"] for it in items])["exact"] >= 0.98


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
    assert items[0]["scene"] is None and items[1]["scene"] == one("red", "circle", "top")


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


# --- the dump CLI -----------------------------------------------------------------------------

def test_dump_cli(tmp_path, capsys):
    out = tmp_path / "dump"
    main(["--dump", str(out), "--n", "5", "--seed", "3", "--size", "48"])
    assert sorted(p.name for p in out.iterdir()) == [f"000{i}.png" for i in range(5)] + ["prompts.txt"]
    prompts = (out / "prompts.txt").read_text().splitlines()
    world = ShapesWorld(48, seed=3)
    assert prompts == [world[i]["caption"] for i in range(5)]
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / f"000{i}.png")), world[i]["image"])

    main(["--dump", str(tmp_path / "test"), "--n", "3", "--split", "test"])
    assert all(is_held_out(c) for c in (tmp_path / "test" / "prompts.txt").read_text().splitlines())


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
