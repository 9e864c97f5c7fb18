"""The evaluation harness: an oracle scores 1, a wrong model scores 0, groups are right."""

import random

import pytest

import nanorf.eval as ev
from nanorf.data import Obj, Scene, parse_caption, render
from nanorf.model import images_to_tensor

pytestmark = pytest.mark.usefixtures("single_thread")


def _painter(transform):
    """A fake text_to_image that renders each prompt's scene after `transform`."""
    def fake(model, prompts, generator=None, **kw):
        imgs = [render(transform(parse_caption(p)), model.cfg.image_size, random.Random(i)) for i, p in enumerate(prompts)]
        return images_to_tensor(imgs), None
    return fake


def test_generation_score_oracle_and_wrong(monkeypatch, tiny_model):
    m = tiny_model("model.image_size=32", "model.vit.patch_size=8")
    monkeypatch.setattr(ev, "text_to_image", _painter(lambda s: s))
    s = ev.generation_score(m, n=24)
    for k in ("single", "two", "colors", "position", "color_attr", "overall", "object", "exact"):
        assert s[k] == 1.0, k
    assert len(s["images"]) == 24 and s["n"] == 24
    # move every object one cell: colours and shapes stay right, positions (and objects) go wrong
    moved = {"top left": "bottom right", "top": "bottom", "top right": "bottom left", "left": "right",
             "center": "top left", "right": "left", "bottom left": "top right", "bottom": "top", "bottom right": "top left"}
    monkeypatch.setattr(ev, "text_to_image", _painter(
        lambda s: Scene(tuple(Obj(o.color, o.shape, moved[o.position]) for o in s.objects))))
    s = ev.generation_score(m, n=24)
    assert s["colors"] == 1.0 and s["color_attr"] == 1.0
    assert s["position"] == 0.0 and s["object"] == 0.0 and s["single"] == 0.0 and s["two"] == 0.0
    assert s["overall"] == pytest.approx((0 + 0 + 1 + 0 + 1) / 5)


def test_understanding_score_oracle_and_wrong(monkeypatch, tiny_model):
    m = tiny_model("model.image_size=32", "model.vit.patch_size=8")
    world = ev.ShapesWorld(32, seed=4321, split="test")
    truth = {}
    for i in range(6):
        it = world[i]
        for q, a in it["qa"]:
            truth[(it["image"].tobytes(), q)] = a

    def oracle(model, images, questions, **kw):
        from nanorf.model import tensor_to_images
        return [truth[(im.tobytes(), q)] for im, q in zip(tensor_to_images(images), questions)]
    monkeypatch.setattr(ev, "answer", oracle)
    u = ev.understanding_score(m, n=6)
    assert all(u[k] == 1.0 for k in ("color", "shape", "position", "caption"))
    monkeypatch.setattr(ev, "answer", lambda model, images, questions, **kw: ["red"] * len(questions))
    u = ev.understanding_score(m, n=6)
    assert u["caption"] == 0.0 and u["shape"] == 0.0 and u["position"] == 0.0 and 0 <= u["color"] < 1


def test_eval_cli_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--ckpt", str(tmp_path / "missing.pt")])
    assert e.value.code == 2
    assert "nanorf.eval: error:" in capsys.readouterr().err
