"""sample.py command line (the README's contracts): text -> image, image -> text, and its error contract.

One tiny checkpoint is trained once for the module; most calls run sample.main() in-process,
and one success and one failure run as real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from nanorf.checkpoint import load_checkpoint
from nanorf.presets import get_config
from nanorf.patches import tensor_to_images, unpatchify
from nanorf.data import ShapesWorld

from conftest import ROOT, TINY_ARGS, subprocess_env

TINY = TINY_ARGS
PROMPT = "a red circle at the top left"
MAX_TEXT = get_config("toy").model.max_text_len  # bytes a prompt may hold

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.fromarray(ShapesWorld(32, seed=0)[0]["image"]).save(path)
    return path


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def files(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


# ---- text -> image ---------------------------------------------------------------------------

def test_prompt_cli_writes_native_size_png(ckpt, tmp_path):
    out = tmp_path / "red.png"
    r = run_cli("--ckpt", str(ckpt), "--prompt", PROMPT, "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "wrote 1 image" in r.stdout and "step 2" in r.stdout
    assert png(out).shape == (32, 32, 3)
    assert files(tmp_path) == ["red.png"]  # no temporary file left behind


def test_sampling_is_seeded(ckpt, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed in ((a, "0"), (b, "0"), (c, "1")):
        sample.main(["--ckpt", str(ckpt), "--prompt", PROMPT, "--out", str(path), "--seed", seed, "--rep-map"])
    assert np.array_equal(png(a), png(b))
    assert np.array_equal(png(tmp_path / "a.rep.png"), png(tmp_path / "b.rep.png"))
    # a barely trained model samples its 16 rep tokens from a near-uniform distribution over
    # 16 codes, so another seed gives another token map (its pixels may all still be ~0)
    assert not np.array_equal(png(tmp_path / "a.rep.png"), png(tmp_path / "c.rep.png"))


def test_prompts_file_out_dir_grid_and_rep_maps(ckpt, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a red circle at the top left\n\na green square at the center\na blue triangle at the bottom\n")
    out_dir, grid = tmp_path / "samples", tmp_path / "grid.png"
    sample.main(["--ckpt", str(ckpt), "--prompts-file", str(pf), "--out-dir", str(out_dir), "--grid", str(grid),
                 "--rep-map", "--batch-size", "2"])
    assert files(out_dir) == ["0000.png", "0000.rep.png", "0001.png", "0001.rep.png", "0002.png", "0002.rep.png"]
    imgs = [png(out_dir / f"{i:04d}.png") for i in range(3)]
    assert all(im.shape == (32, 32, 3) for im in imgs)
    # the grid holds exactly these images: 3 in one row, 2 px white pads, x4 nearest upscale (128 // 32)
    g = png(grid)
    assert g.shape == (36 * 4, (3 * 34 + 2) * 4, 3)
    for i, im in enumerate(imgs):
        x0 = (2 + i * 34) * 4
        assert np.array_equal(g[8:8 + 128:4, x0:x0 + 128:4], im), i
    # rep maps: 4x4 tokens (32 px / ViT patch 4 / pool 2), each 8x8 block the mean training
    # patch of a code that training saw, as the checkpoint keeps them
    targets = load_checkpoint(ckpt)["targets"]
    seen = targets["code_patches"][targets["code_seen"]]                          # (k, 8*8*3)
    tiles = {t.tobytes() for t in tensor_to_images(unpatchify(seen[:, None], 8, 1, 1))}
    assert len(tiles) >= 2
    for i in range(3):
        rm = png(out_dir / f"{i:04d}.rep.png")
        assert rm.shape == (32, 32, 3)
        blocks = rm.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, 8, 8, 3)
        assert all(np.ascontiguousarray(b).tobytes() in tiles for b in blocks), i


def test_grid_only_and_prompt_rep_map(ckpt, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("a red circle at the top left\na cyan square at the right\n")
    sample.main(["--ckpt", str(ckpt), "--prompts-file", str(pf), "--grid", str(tmp_path / "g.png")])
    assert png(tmp_path / "g.png").shape == (36 * 4, (2 * 34 + 2) * 4, 3)
    sample.main(["--ckpt", str(ckpt), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"), "--rep-map"])
    assert png(tmp_path / "x.rep.png").shape == (32, 32, 3)
    assert files(tmp_path) == ["g.png", "p.txt", "x.png", "x.rep.png"]


def test_prompt_of_exactly_max_text_len_is_accepted(ckpt, tmp_path):
    sample.main(["--ckpt", str(ckpt), "--prompt", "a" * MAX_TEXT, "--out", str(tmp_path / "x.png")])
    assert png(tmp_path / "x.png").shape == (32, 32, 3)


# ---- image -> text ---------------------------------------------------------------------------

def test_image_question_prints_one_line(ckpt, shape_png, capsys):
    capsys.readouterr()
    sample.main(["--ckpt", str(ckpt), "--image", str(shape_png), "--question", "what color is the circle?"])
    captured = capsys.readouterr()
    # the answer's text is whatever the tiny model says; it is printed as a line and nothing else
    assert captured.out.endswith("\n") and captured.err == ""


# ---- bad inputs: one line on stderr, non-zero exit, no output ---------------------------------

def test_not_a_checkpoint_cli_fails_with_one_line(ckpt, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint\n")
    r = run_cli("--ckpt", str(bogus), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error:") and "bogus.pt" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert files(tmp_path) == ["bogus.pt"]


def _bad_cases(ckpt: Path, tmp: Path, shape_png: Path):
    (tmp / "text.pt").write_text("hello")
    (tmp / "half.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, tmp / "foreign.pt")
    (tmp / "notimage.png").write_text("not a png")
    (tmp / "long.txt").write_text("a red circle at the top left\n" + "b" * (MAX_TEXT + 1) + "\n")
    c, out, od = str(ckpt), str(tmp / "o.png"), str(tmp / "od")
    return {
        "missing checkpoint": ["--ckpt", str(tmp / "nope.pt"), "--prompt", PROMPT, "--out", out],
        "text file as checkpoint": ["--ckpt", str(tmp / "text.pt"), "--prompt", PROMPT, "--out", out],
        "truncated checkpoint": ["--ckpt", str(tmp / "half.pt"), "--prompt", PROMPT, "--out", out],
        "foreign torch file": ["--ckpt", str(tmp / "foreign.pt"), "--prompt", PROMPT, "--out", out],
        "prompt longer than max_text_len": ["--ckpt", c, "--prompt", "a" * (MAX_TEXT + 1), "--out", out],
        "long line in prompts file": ["--ckpt", c, "--prompts-file", str(tmp / "long.txt"), "--out-dir", od],
        "missing prompts file": ["--ckpt", c, "--prompts-file", str(tmp / "nope.txt"), "--out-dir", od],
        "prompt without --out": ["--ckpt", c, "--prompt", PROMPT],
        "size not HxW": ["--ckpt", c, "--prompt", PROMPT, "--out", out, "--size", "big"],
        "size not a multiple": ["--ckpt", c, "--prompt", PROMPT, "--out", out, "--size", "30x32"],
        "not an image": ["--ckpt", c, "--image", str(tmp / "notimage.png")],
        "missing image": ["--ckpt", c, "--image", str(tmp / "nope.png")],
        "question too long": ["--ckpt", c, "--image", str(shape_png), "--question", "q" * 200],
    }


BAD_IDS = ["missing checkpoint", "text file as checkpoint", "truncated checkpoint", "foreign torch file",
           "prompt longer than max_text_len", "long line in prompts file", "missing prompts file",
           "prompt without --out", "size not HxW", "size not a multiple", "not an image",
           "missing image", "question too long"]


@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_input_fails_with_one_line(ckpt, shape_png, tmp_path, capsys, case):
    args = _bad_cases(ckpt, tmp_path, shape_png)[case]
    before = files(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    assert e.value.code not in (0, None)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error:"), captured.err
    assert captured.out == ""
    assert files(tmp_path) == before  # no output file, no output folder


def test_out_in_missing_folder_is_handled(ckpt, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "x.png"
    capsys.readouterr()
    try:
        sample.main(["--ckpt", str(ckpt), "--prompt", PROMPT, "--out", str(out)])
    except SystemExit as e:  # a clean refusal is fine too
        assert e.code not in (0, None)
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sample.py: error:")
        return
    except OSError as e:
        pytest.fail(f"uncaught {type(e).__name__}: {e}")
    assert png(out).shape == (32, 32, 3)
