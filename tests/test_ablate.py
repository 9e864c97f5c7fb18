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
    assert "0.76" in rf_row and "0.600 ± 0.100" in rf_row and "10.0 min" in rf_row   # paper, mean ± half range
    assert "RF − pixel-only, strict overall, per seed: +0.400, +0.400 (mean +0.400)" in md
    assert all(k in md for k in GEN_KEYS + UND_KEYS)
