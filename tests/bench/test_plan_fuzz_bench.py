"""bench/plan_fuzz.py: a seeded run of mutated plans gives only PlanErrors naming a field, or plans that run."""

import json


def test_fuzz_finds_no_other_error(load_script, tmp_path, capsys):
    fuzz = load_script("plan_fuzz")
    out = tmp_path / "fuzz.json"
    assert fuzz.main(["--mutations", "1000", "--seed", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    counts = result["counts"]
    assert counts["other"] == 0 and result["failures"] == []
    assert counts["plan_error"] > 500 and counts["ran"] > 100  # both outcomes exercised
    assert sum(counts.values()) == 1000
    assert "1000 mutations (seed 3)" in capsys.readouterr().out


def test_field_names_are_recognised(load_script):
    fuzz = load_script("plan_fuzz")
    assert fuzz.names_field("p.json: schedule[0].heads[1]: has 3 heads", "p.json")
    assert fuzz.names_field('p.json: "layout": missing key', "p.json")
    assert not fuzz.names_field("p.json: something went wrong", "p.json")
    assert not fuzz.names_field("other.json: model.family: bad", "p.json")
