"""Recipes and overrides: YAML's number quirks, unknown keys and bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_adapter.recipe import load_recipe

LAVIN_CPU = Path(__file__).resolve().parents[1] / "recipes" / "lavin_smollm2_synth_cpu.yaml"


def test_exponent_numbers_without_a_dot_become_numbers():
    # YAML 1.1 reads `3e-3` as the string "3e-3"; the trainer would then fail on `lr * scale`.
    recipe = load_recipe(LAVIN_CPU, ["train.lr=3e-3", "train.max_steps=1e3", "method.temperature=1e1",
                                     "data.1.max_len=64"])
    assert recipe.train.lr == pytest.approx(0.003) and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 1000 and isinstance(recipe.train.max_steps, int)
    assert recipe.method_config().temperature == 10.0
    assert recipe.data[1].max_len == 64
    whole = load_recipe(LAVIN_CPU, ["train.max_steps=700.0"])  # a YAML float for an integer field
    assert whole.train.max_steps == 700 and isinstance(whole.train.max_steps, int)


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "section 'train': lr must be a number, got 'fast'"),
    ("train.max_steps=many", "section 'train': max_steps must be an integer, got 'many'"),
    ("train.max_steps=2.5e0", "section 'train': max_steps must be an integer, got '2.5e0'"),
    ("train.max_steps=700.5", "section 'train': max_steps must be an integer, got 700.5"),
    ("method.rank=8.5", "the options of method 'lavin': rank must be an integer, got 8.5"),
    ("train.nope=1", "unknown key(s) ['nope'] in section 'train'"),
    ("method.nope=1", "unknown key(s) ['nope'] in the options of method 'lavin'"),
    ("data.0.nope=1", "unknown key(s) ['nope'] in section 'data'"),
])
def test_bad_values_and_keys_are_named(override, message):
    with pytest.raises(ValueError) as err:
        load_recipe(LAVIN_CPU, [override]).method_config()
    assert message in str(err.value) and str(LAVIN_CPU) in str(err.value)
