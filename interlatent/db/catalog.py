"""The catalog: what the store records about its data besides the data itself.

Label classes (stable ids for string labels), text explanations of latents, trained artifacts (a
path, recorded relative to the store's folder when inside it, or bytes, with a JSON config and
metrics), and interventions (patching experiments with their measured effects).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from interlatent.db.columns import decode_json, decoded, dumps, now, pd
from interlatent.db.layers import LayerRegistry
from interlatent.errors import ArtifactNotFoundError, ConfigError, closest


class Catalog(LayerRegistry):
    """The part of :class:`~interlatent.db.store.LatentDB` that keeps labels, explanations,
    artifacts and interventions."""

    # ------------------------------------------------------------------ labels
    def register_label_classes(self, names: Iterable[str], key: str = "label") -> dict[str, int]:
        """Give string labels stable class ids. New names take the next ids; known names keep theirs."""
        with self.atomic() as conn:
            known = dict(conn.execute("SELECT name, class_id FROM label_classes WHERE key=?", (key,)).fetchall())
            nxt = max(known.values(), default=-1) + 1
            for name in sorted(set(names) - set(known)):
                conn.execute("INSERT INTO label_classes(key, name, class_id) VALUES (?, ?, ?)", (key, name, nxt))
                known[name] = nxt
                nxt += 1
        return known

    def label_classes(self, key: str = "label") -> dict[str, int]:
        """Label name -> class id."""
        return dict(self._q("SELECT name, class_id FROM label_classes WHERE key=? ORDER BY class_id", (key,)))

    # ------------------------------------------------------------------ explanations
    def set_explanations(self, layer: str, explanations: Mapping[int, str], *, source: str = "manual",
                         scores: Mapping[int, float] | None = None) -> int:
        """Store a text explanation per channel (replacing earlier ones for those channels).

        ``source`` says who wrote them (``"manual"``, a model's name, ...); ``scores`` optionally
        says how well each predicts the channel's activations. Returns how many were written."""
        info = self.layer_info(layer)
        rows = []
        for channel, text in explanations.items():
            c = int(channel)
            if not 0 <= c < info.width:
                raise ConfigError(f"channel {channel} is outside {info.name!r} (width {info.width}; valid 0.."
                                  f"{info.width - 1})")
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"the explanation of channel {c} must be a non-empty string, got {text!r}")
            score = None if scores is None or channel not in scores else float(scores[channel])
            rows.append((info.layer_id, c, text.strip(), str(source), score, now()))
        with self.atomic() as conn:
            conn.executemany("INSERT OR REPLACE INTO latent_explanations(layer_id, channel, text, source, score,"
                             " created_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def explanations(self, layer: str) -> pd.DataFrame:
        """Stored explanations of a layer: channel, text, source, score, created_at (by channel)."""
        info = self.layer_info(layer)
        return pd.read_sql_query("SELECT channel, text, source, score, created_at FROM latent_explanations"
                                 " WHERE layer_id=? ORDER BY channel", self._conn, params=[info.layer_id])

    # ------------------------------------------------------------------ artifacts
    def add_artifact(self, name: str, kind: str, *, architecture: str | None = None, layer: str | None = None,
                     path: str | Path | None = None, data: bytes | None = None,
                     config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> int:
        """Record a trained module (a path to its saved folder or file, or its bytes) with its JSON
        config and evaluation metrics. Returns the artifact id.

        A path inside the store's folder is recorded relative to it, so the store can move with its
        ``{name}_artifacts`` folder; other paths are recorded absolute."""
        if path is None and data is None:
            raise ConfigError("an artifact needs a path or its bytes")
        with self.atomic() as conn:
            cur = conn.execute(
                "INSERT INTO artifacts(name, kind, architecture, layer, path, data, config, metrics, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, kind, architecture, layer, None if path is None else self._stored_path(path), data,
                 dumps(config or {}), dumps(metrics or {}), now()),
            )
        return int(cur.lastrowid)

    def _stored_path(self, path: str | Path) -> str:
        full = Path(path).expanduser().resolve()
        try:
            return full.relative_to(self.path.expanduser().resolve().parent).as_posix()
        except ValueError:
            return str(full)

    def _artifact_path(self, stored: str | None) -> str | None:
        """The absolute path of a recorded artifact: relative rows are under the store's folder; an
        absolute row whose target is gone is looked for under the store's folder by its last parts
        (the store moved with its artifacts folder before paths were recorded relative)."""
        if stored is None:
            return None
        folder = self.path.expanduser().resolve().parent
        path = Path(stored)
        if not path.is_absolute():
            return str(folder / path)
        if not path.exists():
            for n in (2, 1, 3):
                candidate = folder.joinpath(*path.parts[-n:])
                if len(path.parts) > n and candidate.exists():
                    return str(candidate)
        return stored

    def artifacts(self) -> pd.DataFrame:
        """Every artifact: id, name, kind, architecture, layer, path (absolute), config and metrics (parsed)."""
        df = pd.read_sql_query("SELECT artifact_id, name, kind, architecture, layer, path, config, metrics,"
                               " created_at FROM artifacts ORDER BY artifact_id", self._conn)
        df["path"] = df["path"].map(self._artifact_path)
        df["config"] = decoded(df["config"], {})
        df["metrics"] = decoded(df["metrics"], {})
        return df

    def get_artifact(self, artifact: int | str) -> dict[str, Any]:
        """One artifact by id, or by name (the newest of that name): id, name, kind, architecture,
        layer, path (absolute), data, config and metrics. Raises :class:`ArtifactNotFoundError`
        (a ``KeyError``) with the closest names."""
        cols = "artifact_id, name, kind, architecture, layer, path, data, config, metrics"
        if isinstance(artifact, str):
            row = self._conn.execute(f"SELECT {cols} FROM artifacts WHERE name=? ORDER BY artifact_id DESC LIMIT 1",
                                     (artifact,)).fetchone()
        elif isinstance(artifact, (int, np.integer)) and not isinstance(artifact, bool):
            row = self._conn.execute(f"SELECT {cols} FROM artifacts WHERE artifact_id=?", (int(artifact),)).fetchone()
        else:
            raise ConfigError(f"an artifact is named by its id (int) or its name (str), got {artifact!r}")
        if row is None:
            names = [r[0] for r in self._q("SELECT DISTINCT name FROM artifacts")]
            if isinstance(artifact, str):
                close = closest(artifact, names)
                hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close else
                        f"known names: {', '.join(repr(n) for n in sorted(names)[:12]) or 'none yet'}")
                raise ArtifactNotFoundError(f"no artifact named {artifact!r}; {hint} (db.artifacts() lists them)")
            ids = [r[0] for r in self._q("SELECT artifact_id FROM artifacts ORDER BY artifact_id")]
            known = f"ids {ids[0]}..{ids[-1]}" if ids else "none yet"
            raise ArtifactNotFoundError(f"no artifact with id {artifact} (known: {known}); db.artifacts() lists them")
        keys = ["artifact_id", "name", "kind", "architecture", "layer", "path", "data", "config", "metrics"]
        out = dict(zip(keys, row))
        out["path"] = self._artifact_path(out["path"])
        out["config"] = decode_json(out["config"], {})
        out["metrics"] = decode_json(out["metrics"], {})
        return out

    # ------------------------------------------------------------------ interventions
    def add_intervention(self, layer: str, kind: str, spec: dict[str, Any], results: dict[str, Any]) -> int:
        """Record a patching experiment (what was done, and its measured effects)."""
        with self.atomic() as conn:
            cur = conn.execute("INSERT INTO interventions(layer, kind, spec, results, created_at)"
                               " VALUES (?, ?, ?, ?, ?)", (layer, kind, dumps(spec), dumps(results), now()))
        return int(cur.lastrowid)

    def interventions(self, layer: str | None = None) -> pd.DataFrame:
        sql = "SELECT intervention_id, layer, kind, spec, results, created_at FROM interventions"
        params: list[Any] = []
        if layer is not None:
            sql += " WHERE layer=?"
            params.append(layer)
        df = pd.read_sql_query(sql + " ORDER BY intervention_id", self._conn, params=params)
        df["spec"] = decoded(df["spec"], {})
        df["results"] = decoded(df["results"], {})
        return df
