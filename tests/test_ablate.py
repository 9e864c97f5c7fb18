"""experiments.ablate: the results table from scores (the training runs themselves are the
ablation, too slow for a test; train.py and nanorf.eval have their own tests)."""

from argparse import Namespace

from experiments.ablate import GEN_KEYS, UND_KEYS, write_table


def _score(overall, und=0.5):
    gen = {k: overall for k in GEN_KEYS}
    gen["extras"] = 1.0 - overall
    return {"generation": gen, "understanding": {k: und for k in UND_KEYS}, "wall_s": 600.0}


def test_table_has_every_variant_the_spread_and_rfs_gain(tmp_path):
    results = {("rf", 0): _score(0.5), ("rf", 1): _score(0.7), ("no-rf", 0): _score(0.1), ("no-rf", 1): _score(0.3)}
    args = Namespace(config="toy", seeds=[0, 1], variants=["rf", "no-rf"], n_per_kind=50, vit_init=None)
    write_table(results, args, 780, tmp_path)
    md = (tmp_path / "results.md").read_text()
    rf_row = next(line for line in md.splitlines() if line.startswith("| rf |"))
    assert "0.76" in rf_row and "0.600 ± 0.100" in rf_row and "10.0 / 10.0 min" in rf_row  # paper, mean ± half range
    assert "RF − pixel-only, strict overall, per seed: +0.400, +0.400 (mean +0.400)" in md
    assert all(k in md for k in GEN_KEYS + UND_KEYS)


def test_wall_clock_is_per_seed_and_a_reused_run_has_none(tmp_path):
    """A run the call did not train has no wall time; the table says so instead of averaging the rest."""
    reused = {**_score(0.5), "wall_s": None}
    results = {("rf", 0): reused, ("rf", 1): {**_score(0.7), "wall_s": 1242.0},
               ("no-rf", 0): {**_score(0.1), "wall_s": None}, ("no-rf", 1): {**_score(0.3), "wall_s": None}}
    args = Namespace(config="toy", seeds=[0, 1], variants=["rf", "no-rf"], n_per_kind=50, vit_init=None)
    write_table(results, args, 1600, tmp_path)
    lines = (tmp_path / "results.md").read_text().splitlines()
    row = lambda v: next(line for line in lines if line.startswith(f"| {v} | "))  # the generation table's
    assert row("rf").endswith("| n/a / 20.7 min |")
    assert row("no-rf").endswith("| n/a / n/a |")


def test_a_saved_score_is_reused_only_for_the_same_checkpoint_prompts_and_sampler(tmp_path):
    import json
    import os
    from experiments.ablate import score_is_fresh
    ck, ev = tmp_path / "ckpt.pt", tmp_path / "eval.json"
    ck.write_text("x")
    assert not score_is_fresh(ev, ck, 50, {})                                        # no score yet
    ev.write_text(json.dumps({"n_per_kind": 50}))                                    # the checkpoint's own sampler
    assert score_is_fresh(ev, ck, 50, {})
    assert not score_is_fresh(ev, ck, 20, {})
    assert not score_is_fresh(ev, ck, 50, {"cfg_interval": (0.0, 0.5)})
    ev.write_text(json.dumps({"n_per_kind": 50, "sampling": {"cfg_interval": [0.0, 0.5]}}))
    assert score_is_fresh(ev, ck, 50, {"cfg_interval": (0.0, 0.5)})
    assert not score_is_fresh(ev, ck, 50, {})
    os.utime(ck, (ev.stat().st_mtime + 10,) * 2)                                     # retrained after scoring
    assert not score_is_fresh(ev, ck, 50, {"cfg_interval": (0.0, 0.5)})


def test_table_names_the_sampler_overrides(tmp_path):
    results = {("rf", 0): _score(0.5)}
    args = Namespace(config="toy", seeds=[0], variants=["rf"], n_per_kind=50, vit_init=None,
                     sampling={"cfg_interval": (0.0, 0.5)})
    write_table(results, args, 780, tmp_path)
    assert "every run sampled with {'cfg_interval': (0.0, 0.5)}" in (tmp_path / "results.md").read_text()


def test_sampler_flags_reach_every_score_and_the_grid(ckpt, tmp_path, monkeypatch):
    """`--cfg-interval 0 0.5` is handed to nanorf.eval for every run and to the grid's sampler; a
    run already scored with those flags is not scored again."""
    import json
    import shutil
    import experiments.ablate as ablate
    import nanorf.sampler as sampler
    for v in ("rf", "no-rf"):
        (tmp_path / f"{v}-s0").mkdir()
        shutil.copy(ckpt, tmp_path / f"{v}-s0" / "ckpt.pt")                      # trained already: reused
    cmds, grid = [], []

    def fake_run(cmd, log):
        cmds.append(cmd)
        ev = cmd[cmd.index("--json") + 1]
        gen = {k: 0.5 for k in GEN_KEYS}
        with open(ev, "w") as f:
            json.dump({"generation": gen, "understanding": {k: 0.5 for k in UND_KEYS},
                       "sampling": {"cfg_interval": [0.0, 0.5]}}, f)

    real = sampler.text_to_image

    def t2i(model, prompts, generator=None, **k):
        grid.append(k)
        return real(model, prompts, generator, **k)

    monkeypatch.setattr(ablate, "run", fake_run)
    monkeypatch.setattr(sampler, "text_to_image", t2i)
    argv = ["--variants", "rf", "no-rf", "--seeds", "0", "--max-steps", "1", "--out-dir", str(tmp_path),
            "--cfg-interval", "0", "0.5"]
    ablate.main(argv)
    assert len(cmds) == 2 and all(c[-3:] == ["--cfg-interval", "0.0", "0.5"] for c in cmds)
    assert grid == [{"cfg_interval": (0.0, 0.5)}] * 2
    cmds.clear()
    ablate.main(argv)
    assert cmds == []                                                              # both scores reused
    assert "every run sampled with {'cfg_interval': (0.0, 0.5)}" in (tmp_path / "results.md").read_text()
