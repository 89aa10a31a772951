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


def figure(df, layer: str, prompt_index: int):
    """A matplotlib figure of a :func:`queries.trace` frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chans = [c for c in df.columns if c.startswith("ch")]
    labels = [t.replace("\n", "\\n") if t else "·" for t in df["token"].fillna("")]
    width = max(6.0, 0.32 * len(labels) + 2)
    if len(chans) == 1:
        fig, ax = plt.subplots(figsize=(width, 3.2))
        values = df[chans[0]].to_numpy()
        ax.plot(np.arange(len(df)), values, marker="o", lw=1.5)
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylabel(f"{layer} {chans[0]}")
        for i in np.flatnonzero(~np.isfinite(values)):  # not drawable as a point: mark the position
            ax.axvline(i, color="C3", ls=":", lw=1)
            ax.text(i, 0.97, _nonfinite_text(values[i]), transform=ax.get_xaxis_transform(), ha="center",
                    va="top", color="C3", bbox={"fc": "white", "ec": "none", "pad": 1})
    else:
        fig, ax = plt.subplots(figsize=(width, 1.0 + 0.35 * len(chans)))
        data = df[chans].to_numpy().T
        finite = np.isfinite(data)
        lim = float(np.abs(data[finite]).max()) if finite.any() else 0.0
        im = ax.imshow(np.where(finite, data, np.nan), aspect="auto", cmap="RdBu_r", vmin=-(lim or 1.0),
                       vmax=lim or 1.0)
        for r, c in zip(*np.nonzero(~finite)):  # the colour scale spans the finite values; say what the rest are
            ax.text(c, r, _nonfinite_text(data[r, c]), ha="center", va="center", fontsize=8)
        ax.set_yticks(range(len(chans)), chans)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_title(f"{layer} — prompt {prompt_index}")
    fig.tight_layout()
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
        fig.savefig(out, dpi=120)
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
