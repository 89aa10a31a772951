"""Plot one prompt: a per-token trace of one channel, or a channels x tokens heatmap, to PNG.

    python -m interlatent.vis.plot latents.db --layer latent:llm.layer.8 --channel 0 --prompt-index 0
    python -m interlatent.vis.plot latents.db --layer llm.layer.1 --channel 0 4 9 --prompt-index 3 --out p.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from interlatent.errors import OutputError
from interlatent.vis import queries
from interlatent.vis._cli import add_db, existing_parent, main_for, open_db


def image_formats() -> list[str]:
    """The file extensions matplotlib can write (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def image_path(text: str) -> Path:
    """``--out``: a path whose extension picks the format (none: ``.png`` is added); an existing
    directory gets the default file name inside it."""
    path = Path(text)
    if path.is_dir():
        return path
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"there is no directory {text!r}; create it first, or give a file name")
    existing_parent(path, text, "--out")
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        return path.with_name(path.name + ".png")
    formats = image_formats()
    if suffix not in formats:
        raise argparse.ArgumentTypeError(f"unknown image format {path.suffix!r} in {text!r}; supported: "
                                         f"{', '.join(formats)} (or no extension for .png)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    parser.add_argument("--layer", required=True, help="the layer to plot")
    parser.add_argument("--channel", type=int, nargs="+", required=True, help="one channel (trace) or several (heatmap)")
    parser.add_argument("--prompt-index", type=int, required=True, help="the prompt to plot")
    parser.add_argument("--out", type=image_path, help="image path; its extension picks the format (png, pdf, svg, "
                        "...; none: .png); a directory gets the default name plot_<layer>_p<prompt>.png inside it")


def _nonfinite_text(value: float) -> str:
    return "NaN" if value != value else ("+∞" if value > 0 else "−∞")


def token_label(token: str | None) -> str:
    """A token as a tick label: leading and trailing spaces shown as ``␣`` (a label's edges are
    otherwise invisible), newlines and tabs as ``\\n`` / ``\\t``, an empty token as ``∅``."""
    if not token:
        return "∅"
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    core = text.strip(" ")
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - len(text.rstrip(" ")) if core else 0
    return "␣" * lead + core + "␣" * trail


def colour_map(values) -> tuple[str, float, float]:
    """(cmap, vmin, vmax) for finite ``values``: sequential from 0 for non-negative data, diverging
    and symmetric about 0 for signed data."""
    import numpy as np

    finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0:
        lim = float(np.abs(finite).max()) or 1.0
        return "RdBu_r", -lim, lim
    top = float(finite.max()) if finite.size else 0.0
    return "viridis", 0.0, top or 1.0


def figure(df, layer: str, prompt_index: int):
    """A matplotlib figure of a :func:`queries.trace` frame (constrained layout: nothing clipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chans = [c for c in df.columns if c.startswith("ch")]
    labels = [token_label(t) for t in df["token"].fillna("")]
    width = max(6.0, 0.32 * len(labels) + 2)
    if len(chans) == 1:
        fig, ax = plt.subplots(figsize=(width, 3.4), layout="constrained")
        values = df[chans[0]].to_numpy()
        ax.plot(np.arange(len(df)), values, marker="o", lw=1.5)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylabel(f"channel {chans[0][2:]}")
        for i in np.flatnonzero(~np.isfinite(values)):  # not drawable as a point: mark the position
            ax.axvline(i, color="C3", ls=":", lw=1)
            ax.text(i, 0.97, _nonfinite_text(values[i]), transform=ax.get_xaxis_transform(), ha="center",
                    va="top", color="C3", bbox={"fc": "white", "ec": "none", "pad": 1})
    else:
        fig, ax = plt.subplots(figsize=(width, 1.6 + 0.35 * len(chans)), layout="constrained")
        data = df[chans].to_numpy().T
        finite = np.isfinite(data)
        cmap, vmin, vmax = colour_map(data)
        im = ax.imshow(np.where(finite, data, np.nan), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        for r, c in zip(*np.nonzero(~finite)):  # the colour scale spans the finite values; say what the rest are
            ax.text(c, r, _nonfinite_text(data[r, c]), ha="center", va="center", fontsize=8)
        ax.set_yticks(range(len(chans)), [f"channel {c[2:]}" for c in chans])
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="activation")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8, rotation_mode="anchor")
    ax.set_xlabel("token (␣ = space)")
    ax.set_title(f"{layer} — prompt {prompt_index}", fontsize=10)
    return fig


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        layer = db.resolve_layer(args.layer)
        df = queries.trace(db, layer, args.prompt_index, args.channel)
    default = f"plot_{layer.replace(':', '_').replace('/', '_')}_p{args.prompt_index}.png"
    out = args.out or Path(default)
    if out.is_dir():
        out = out / default
    fig = figure(df, layer, args.prompt_index)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise OutputError(f"cannot write the plot to {str(out)!r}: {exc.strerror or exc}; choose another --out") from exc
    finally:
        plt.close(fig)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.plot")


if __name__ == "__main__":
    sys.exit(main())
