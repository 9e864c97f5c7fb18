"""nanorf/eval.py: the pixel scorer reads clean renders right and catches every kind of error,
GenEval's strict and lenient rules per kind, the model-facing scores, and the CLI."""

import json
import random
from collections import deque

import numpy as np
import pytest
import torch

import nanorf.eval as ev
from nanorf.data import (COLORS, KINDS, PALETTE, POSITIONS, Obj, Prompt, Scene, ShapesWorld, draw_scene,
                         parse_caption, render)
from nanorf.eval import Detection, _components, detect, judge, score_images
from nanorf.patches import images_to_tensor, tensor_to_images

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = [Obj(c, s) for c in COLORS for s in ("circle", "square", "triangle")]


def items(size, n_per_kind, seed=11, kinds=KINDS):
    world = ShapesWorld(size, seed=seed)
    return [world.item(i, k) for i in range(n_per_kind) for k in kinds]


def verdicts(image, prompt):
    v = judge(prompt, detect(image))
    return v.strict, v.lenient, v.extras


# --- connected components -----------------------------------------------------------------------

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


# --- the scorer on renders ----------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_of_every_kind_score_one(size):
    its = items(size, 100)
    for it in its:
        found = detect(it["image"])
        assert sorted((d.color, d.shape, d.position) for d in found) == \
            sorted((o.color, o.shape, o.position) for o in it["scene"].objects), it["caption"]
    s = score_images([it["image"] for it in its], [it["prompt"] for it in its])
    for k in KINDS:
        assert s[k] == 1.0 and s[f"lenient_{k}"] == 1.0, k
    assert s["overall"] == s["lenient_overall"] == 1.0 and s["extras"] == 0.0 and s["n"] == 500


@pytest.mark.parametrize("size", [32, 64])
def test_a_scene_missing_an_object_scores_zero(size):
    its = items(size, 20, seed=12)
    images = []
    for i, it in enumerate(its):
        k = i % len(it["scene"].objects)
        image = it["image"].copy()
        image[it["object_map"] == k + 1] = 0  # erase one object
        assert verdicts(image, it["prompt"])[:2] == (False, False), it["caption"]
        images.append(image)
    s = score_images(images, [it["prompt"] for it in its])
    assert all(s[k] == 0.0 and s[f"lenient_{k}"] == 0.0 for k in KINDS)


def test_an_extra_object_fails_strict_but_passes_lenient():
    rng = random.Random(0)
    for it in items(32, 20, seed=13):
        scene, prompt = it["scene"], it["prompt"]
        if len(scene.objects) == 4:
            continue
        named = {(o.color, o.shape) for o in prompt.objects}
        extra = rng.choice([c for c in CLASSES if (c.color, c.shape) not in named])
        free = rng.choice([p for p in POSITIONS if p not in {o.position for o in scene.objects}])
        image = render(Scene(scene.objects + (Obj(extra.color, extra.shape, free),)), 32, rng)
        assert verdicts(image, prompt) == (False, True, 1), (it["caption"], extra, free)
        # one more of the counted object breaks GenEval's counting rule too
        if prompt.kind == "counting":
            more = Scene(scene.objects + (Obj(prompt.objects[0].color, prompt.objects[0].shape, free),))
            assert verdicts(render(more, 32, rng), prompt)[:2] == (False, False)
    # a one-pixel fragment is an object too: strict as written (MIN_PIXELS = 1)
    it = ShapesWorld(32, seed=0).item(0, "single")
    image = it["image"].copy()
    ys, xs = np.nonzero(it["object_map"] == 0)
    far = np.argmax((ys - 16.0) ** 2 + (xs - 16.0) ** 2 - 1e3 * (it["object_map"][ys, xs] > 0))
    other = next(c for c in COLORS if c != it["scene"].objects[0].color)
    image[ys[far], xs[far]] = PALETTE[other]
    assert ev.MIN_PIXELS == 1 and verdicts(image, it["prompt"]) == (False, True, 1)
    assert judge(it["prompt"], detect(image, min_pixels=2)).strict


def test_wrong_pictures_fail_both_rules():
    rng = random.Random(1)
    swap = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
    for i in range(40):
        a, b = rng.sample(CLASSES, 2)
        rel = rng.choice(list(swap))
        right = Prompt("position", (a, b), rel)
        scene = draw_scene(Prompt("position", (a, b), swap[rel]), rng)  # the relation reversed
        assert verdicts(render(scene, 32, rng), right) == (False, False, 0)
        cells = rng.sample(POSITIONS, 2)
        loc = Prompt("located", (Obj(a.color, a.shape, cells[0]), Obj(b.color, b.shape, cells[1])))
        moved = Scene((Obj(a.color, a.shape, cells[1]), Obj(b.color, b.shape, cells[0])))
        strict, lenient, _ = verdicts(render(moved, 32, rng), loc)
        assert not strict and not lenient
        recolour = next(c for c in COLORS if c not in (a.color, b.color))
        two = Prompt("two", (a, b))
        wrong = Scene((Obj(recolour, a.shape, cells[0]), Obj(b.color, b.shape, cells[1])))
        assert verdicts(render(wrong, 32, rng), two)[:2] == (False, False)
        count = Prompt("counting", (a,) * 3)
        short = Scene(tuple(Obj(a.color, a.shape, c) for c in rng.sample(POSITIONS, 2)))
        assert verdicts(render(short, 32, rng), count)[:2] == (False, False)
        shape = next(s for s in ("circle", "square", "triangle") if s != a.shape)
        single = render(Scene((Obj(a.color, shape, cells[0]),)), 32, rng)
        assert verdicts(single, Prompt("single", (a,)))[:2] == (False, False)


def test_scorer_on_a_hand_built_image():
    image = np.zeros((48, 48, 3), np.uint8)
    image[3:13, 2:12] = PALETTE["red"]  # a 10x10 square in the top-left cell
    for k in range(9):  # an upright triangle, apex at (34, 38), in the bottom-right cell
        image[34 + k, 38 - k:39 + k] = PALETTE["green"]
    yy, xx = np.mgrid[0:48, 0:48]
    image[(yy - 24) ** 2 + (xx - 24) ** 2 <= 4.5 ** 2] = PALETTE["cyan"]  # a circle in the centre
    assert sorted(detect(image), key=lambda d: d.color) == [
        Detection("cyan", "circle", "center", 69),
        Detection("green", "triangle", "bottom right", 81),
        Detection("red", "square", "top left", 100),
    ]
    p = parse_caption
    assert verdicts(image, p("a red square to the left of a green triangle")) == (False, True, 1)
    assert verdicts(image, p("a red square above a cyan circle")) == (False, True, 1)
    assert verdicts(image, p("a red square below a cyan circle")) == (False, False, 1)
    assert verdicts(image, p("a red square at the top left and a cyan circle at the center")) == (False, True, 1)
    image[(yy - 24) ** 2 + (xx - 24) ** 2 <= 4.5 ** 2] = 0
    assert verdicts(image, p("a green triangle and a red square")) == (True, True, 0)
    assert verdicts(image, p("a green triangle to the right of a red square")) == (True, True, 0)
    assert verdicts(image, p("a green triangle at the bottom right and a red square at the top left")) == \
        (True, True, 0)
    assert verdicts(image, p("a green triangle at the bottom and a red square at the top left")) == \
        (False, False, 1)
    assert verdicts(image, p("a red square")) == (False, True, 1)
    assert verdicts(image, p("two red squares")) == (False, False, 1)
    image[30:36, 5:11] = PALETTE["red"]  # a second red square, bottom left
    assert verdicts(image, p("two red squares")) == (False, True, 1)
    image[37:43, 38:47] = 0  # the triangle's base: what is left is no triangle
    assert verdicts(image, p("two red squares")) == (False, True, 1)
    image[image[:, :, 1] == PALETTE["green"][1]] = 0
    assert verdicts(image, p("two red squares")) == (True, True, 0)


def test_score_images_aggregates_and_checks_its_input():
    world = ShapesWorld(32, seed=3)
    a, b, c = world.item(0, "single"), world.item(1, "single"), world.item(2, "two")
    blank = np.zeros_like(a["image"])
    s = score_images([a["image"], blank, b["image"], c["image"]], [a["caption"], b["caption"], b["prompt"],
                                                                    c["caption"]])
    assert set(s) == {"single", "lenient_single", "two", "lenient_two", "overall", "lenient_overall", "extras", "n"}
    assert s["single"] == pytest.approx(2 / 3) and s["two"] == 1.0 and s["n"] == 4
    assert s["overall"] == pytest.approx((2 / 3 + 1) / 2) and s["extras"] == 0.0
    with pytest.raises(ValueError):
        score_images([blank], [a["caption"], b["caption"]])
    with pytest.raises(ValueError):
        score_images([blank], ["a purple circle"])
    with pytest.raises(ValueError, match="uint8"):
        detect(a["image"] / 255.0)


def test_scorer_tolerates_mild_noise():
    its, rng = items(32, 20, seed=12), np.random.default_rng(0)
    noisy = [np.clip(it["image"] + rng.normal(0, 10, it["image"].shape), 0, 255).astype(np.uint8) for it in its]
    assert score_images(noisy, [it["prompt"] for it in its])["overall"] == 1.0


# --- the model-facing scores --------------------------------------------------------------------

def _painter(transform=lambda s: s):
    """A fake text_to_image that renders a scene fitting each prompt, after `transform`."""
    def fake(model, prompts, generator=None, **kw):
        rng = random.Random(len(prompts))
        imgs = [render(transform(draw_scene(parse_caption(p), rng)), model.cfg.image_size, rng) for p in prompts]
        return images_to_tensor(imgs), None
    return fake


def test_generation_score_oracle_and_wrong(monkeypatch, tiny_model):
    m = tiny_model("model.image_size=32", "model.vit.patch_size=8")
    monkeypatch.setattr(ev, "text_to_image", _painter())
    s = ev.generation_score(m, n_per_kind=6, batch_size=8)
    for k in (*KINDS, "overall", "lenient_overall"):
        assert s[k] == 1.0, k
    assert len(s["images"]) == len(s["prompts"]) == s["n"] == 30 and s["extras"] == 0.0
    assert all(isinstance(p, str) for p in s["prompts"]) and s["images"][0].shape == (32, 32, 3)
    # drop the last object of every scene: one-object kinds draw nothing, all others miss one
    monkeypatch.setattr(ev, "text_to_image", _painter(
        lambda s: Scene(s.objects[:-1]) if len(s.objects) > 1 else Scene((Obj("red", "circle", "top"),))))
    s = ev.generation_score(m, n_per_kind=6)
    assert s["two"] == s["counting"] == s["position"] == 0.0 and s["overall"] < 0.5


def test_understanding_score_oracle_and_wrong(monkeypatch, tiny_model):
    m = tiny_model("model.image_size=32", "model.vit.patch_size=8")
    world = ShapesWorld(32, seed=4321, split="test")
    truth = {(it["image"].tobytes(), q): a for it in map(world.__getitem__, range(6)) for q, a in it["qa"]}

    def oracle(model, images, questions, max_new_tokens=72, **kw):
        outs = [truth[(im.tobytes(), q)] for im, q in zip(tensor_to_images(images), questions)]
        assert all(len(o.encode()) < max_new_tokens for o in outs)
        return outs
    monkeypatch.setattr(ev, "answer", oracle)
    u = ev.understanding_score(m, n_images=6, batch_size=16)
    assert all(u[k] == 1.0 for k in ("describe", "count", "where", "shape", "color"))
    assert u["n_images"] == 6 and u["n_questions"] == len(truth)
    monkeypatch.setattr(ev, "answer", lambda model, images, questions, **kw: ["circle"] * len(questions))
    u = ev.understanding_score(m, n_images=6)
    assert u["describe"] == u["count"] == u["where"] == u["color"] == 0.0 and 0.0 < u["shape"] < 1.0


# --- the CLI ------------------------------------------------------------------------------------

def test_eval_cli_bad_input(tmp_path, capsys):
    for argv in (["--ckpt", str(tmp_path / "missing.pt")], ["--ckpt", str(tmp_path / "x.pt"), "--n-per-kind", "0"]):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("nanorf.eval: error:")


def test_eval_cli_json(tmp_path, capsys, tiny_config):
    from nanorf.checkpoint import save_checkpoint
    from nanorf.model import RFModel
    cfg = tiny_config("model.image_size=32", "model.patch_size=8", "model.vit.patch_size=8",
                      "model.max_text_len=80", "model.sample.steps=2")
    torch.manual_seed(0)
    model = RFModel(cfg.model)
    save_checkpoint(tmp_path / "ckpt.pt", cfg, 7, model, model, torch.optim.SGD(model.parameters(), lr=0.0))
    ev.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--n-per-kind", "1", "--n-images", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 7 and out["generation"]["n"] == 5
    assert set(out["generation"]) >= {*KINDS, "overall", "lenient_overall", "extras"}
    assert all(0.0 <= out["generation"][k] <= 1.0 for k in (*KINDS, "overall"))
    assert set(out["understanding"]) >= {"describe", "count", "shape", "n_questions"}
    ev.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--n-per-kind", "1", "--n-images", "1", "--json",
             str(tmp_path / "eval.json")])
    tables = capsys.readouterr().out
    assert "| strict |" in tables and "| lenient (GenEval) |" in tables and "| exact match |" in tables
    assert json.loads((tmp_path / "eval.json").read_text()) == out  # same seeds, same scores
