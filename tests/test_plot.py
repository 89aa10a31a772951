"""`plot`: colour maps that fit the data, token labels whose spaces show, nothing clipped."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from interlatent.vis.plot import figure, token_label

LONG_LAYER = "latent_sae:llm.layer.10.resid_mid"


def _trace(values: np.ndarray, tokens: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({"position": range(len(tokens)), "token": tokens})
    for j in range(values.shape[1]):
        df[f"ch{j}"] = values[:, j]
    return df


def _inside(fig) -> list[str]:
    """The texts of ``fig`` that reach outside the figure once drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    w, h = fig.canvas.get_width_height()
    out = []
    for text in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent")):
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > w + 0.5 or box.y1 > h + 0.5:
            out.append(text.get_text())
    return out


def test_non_negative_latents_get_a_sequential_map_from_zero_and_signed_a_diverging_one():
    tokens = [" the", " sky", " is", " blue"]
    latents = np.array([[0, 1.5], [0.2, 0], [3.0, 0], [0, 0.1]], dtype=np.float32)
    ax = figure(_trace(latents, tokens), "latent_sae:llm.layer.0", 0).axes[0]
    assert ax.images[0].get_cmap().name == "viridis"
    assert ax.images[0].get_clim() == pytest.approx((0.0, 3.0))
    signed = np.array([[-2.0, 1.0], [0.5, 0], [1.0, -0.5], [0, 0.1]], dtype=np.float32)
    ax = figure(_trace(signed, tokens), "llm.layer.0", 0).axes[0]
    assert ax.images[0].get_cmap().name == "RdBu_r"
    assert ax.images[0].get_clim() == pytest.approx((-2.0, 2.0))


def test_token_labels_keep_leading_spaces_visible():
    assert token_label(" sky") == "␣sky"
    assert token_label("  x ") == "␣␣x␣"
    assert token_label("\n") == "\\n" and token_label("") == "∅" and token_label("   ") == "␣␣␣"
    fig = figure(_trace(np.ones((3, 1), np.float32), [" sky", "is", "\n"]), "llm.layer.0", 0)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["␣sky", "is", "\\n"]


@pytest.mark.parametrize("n_channels", [1, 3])
def test_nothing_is_clipped_with_a_long_layer_name_and_long_tokens(n_channels):
    tokens = [" internationalisation", " of", " the", " counterrevolutionaries"] * 2
    values = np.random.default_rng(0).random((len(tokens), n_channels)).astype(np.float32) * 1e4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a glyph missing from the font warns
        fig = figure(_trace(values, tokens), LONG_LAYER, 12345)
        assert _inside(fig) == []
