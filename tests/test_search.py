"""The candidate grid of `minitron search` (the search itself runs in tests/test_pipeline.py)."""

import itertools

import pytest

from nemo_minitron.config import SearchConfig
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.search import candidates

TEACHER = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                    vocab_size=49152, kv_channels=64)


@pytest.mark.parametrize("tp_size", [1, 3])
def test_candidates_are_every_grid_point_within_the_budget(tp_size):
    search = SearchConfig(params=70e6, tolerance=0.1, fractions=[0.55, 0.7, 0.85, 1.0])
    found = candidates(TEACHER, search, tp_size)
    # the fractions of each size, rounded to multiples of 64 (hidden, ffn) and of the 3 KV groups (heads)
    grid = itertools.product([320, 384, 512, 576], [832, 1088, 1280, 1536], [6, 9], [16, 21, 26, 30])
    expected = set()
    for hidden, ffn, heads, layers in grid:
        arch = TEACHER.replace(hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads, num_layers=layers)
        if 63e6 <= arch.num_parameters() <= 70e6 and ffn % tp_size == 0:
            expected.add((hidden, ffn, heads, layers))
    got = {(t.hidden_size, t.ffn_hidden_size, t.num_attention_heads, t.num_layers) for t in found}
    assert got == expected and len(got) >= 4
    params = [t.new_arch(TEACHER).num_parameters() for t in found]
    assert params == sorted(params, reverse=True)


def test_bad_search_settings_name_the_field():
    from nemo_minitron.cli import DEMO_RECIPE
    from nemo_minitron.config import load_recipe

    for override, field in (("search.params=-1", "search.params"), ("search.tolerance=1.5", "search.tolerance"),
                            ("search.fractions=[0, 0.5]", "search.fractions"), ("search.top_k=0", "search.top_k")):
        with pytest.raises(ValueError, match=field):
            load_recipe(DEMO_RECIPE, [override])
