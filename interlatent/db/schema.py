"""The store's schema, as an ordered list of named migrations.

Each migration runs in the same transaction as the row that records it in ``schema_migrations``, so
a store is always at exactly one known version. A store written by a newer library (a version this
list does not reach) is refused rather than read with a guess.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from interlatent.errors import SchemaVersionError


@dataclass(frozen=True)
class Migration:
    """One schema step: its version number, a name, the SQL that performs it, and optionally a
    function of the connection run after the SQL, in the same transaction (a backfill)."""

    version: int
    name: str
    sql: str
    run: Callable[[sqlite3.Connection], None] | None = None


def _index_stored_tokens(conn: sqlite3.Connection) -> None:
    # imported here: that module builds on the store's readers, which import this one
    from interlatent.db.token_index import backfill

    backfill(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial",
        """
        CREATE TABLE runs (
            run_id      INTEGER PRIMARY KEY,
            kind        TEXT NOT NULL,              -- llm | gym | custom | train
            model       TEXT,
            config      TEXT NOT NULL DEFAULT '{}', -- JSON
            status      TEXT NOT NULL,              -- running | complete | interrupted
            error       TEXT,
            created_at  TEXT NOT NULL,
            finished_at TEXT,
            library_version TEXT NOT NULL
        );
        CREATE TABLE sequences (
            seq_id       INTEGER PRIMARY KEY,
            run_id       INTEGER NOT NULL REFERENCES runs(run_id),
            prompt_index INTEGER NOT NULL UNIQUE,   -- the prompt (LLM) or episode (Gym) index
            kind         TEXT NOT NULL DEFAULT 'prompt',
            text         TEXT,
            label        TEXT,                      -- JSON value as given
            label_id     INTEGER,                   -- class id for string labels
            context      TEXT NOT NULL DEFAULT '{}',-- JSON, once per sequence
            n_positions  INTEGER NOT NULL
        );
        -- the positions of a sequence, one row per sequence (token rows cost more than the
        -- activations they describe): ids int32 [P], texts a JSON list [P], positions int32 [P]
        -- (NULL = 0..P-1), generated uint8 [P] (NULL = none), context a JSON list of dicts or NULL
        CREATE TABLE tokens (
            seq_id    INTEGER PRIMARY KEY REFERENCES sequences(seq_id),
            token_ids BLOB NOT NULL,
            tokens    TEXT NOT NULL,
            positions BLOB,
            generated BLOB,
            context   TEXT
        );
        CREATE TABLE metrics (
            metric_id INTEGER PRIMARY KEY,
            name      TEXT NOT NULL UNIQUE
        );
        CREATE TABLE token_metrics (
            seq_id    INTEGER NOT NULL REFERENCES sequences(seq_id),
            metric_id INTEGER NOT NULL REFERENCES metrics(metric_id),
            data      BLOB NOT NULL,                -- float32 [positions], NaN where undefined
            PRIMARY KEY (seq_id, metric_id)
        ) WITHOUT ROWID;
        CREATE TABLE label_classes (
            key      TEXT NOT NULL,
            name     TEXT NOT NULL,
            class_id INTEGER NOT NULL,
            PRIMARY KEY (key, name),
            UNIQUE (key, class_id)
        );
        CREATE TABLE layers (
            layer_id    INTEGER PRIMARY KEY,
            name        TEXT NOT NULL UNIQUE,
            kind        TEXT NOT NULL,              -- model | latent | latent_sae | probe | custom
            width       INTEGER NOT NULL,
            dtype       TEXT NOT NULL,              -- float16 | float32 | bfloat16
            storage     TEXT NOT NULL,              -- dense | sparse
            hook_name   TEXT,                       -- the raw hook point it was read from
            source      TEXT,                       -- source layer for latents
            artifact_id INTEGER REFERENCES artifacts(artifact_id),
            run_id      INTEGER REFERENCES runs(run_id),
            meta        TEXT NOT NULL DEFAULT '{}',
            created_at  TEXT NOT NULL
        );
        CREATE TABLE activations (
            act_id      INTEGER PRIMARY KEY,
            layer_id    INTEGER NOT NULL REFERENCES layers(layer_id),
            seq_id      INTEGER NOT NULL REFERENCES sequences(seq_id),
            n_positions INTEGER NOT NULL,
            dtype       TEXT NOT NULL,              -- this row's storage dtype
            k           INTEGER,                    -- active latents per position (sparse rows)
            index_dtype TEXT,
            data        BLOB NOT NULL,              -- dense [P, C] or sparse values [P, k]
            indices     BLOB,                       -- sparse indices [P, k]
            UNIQUE (layer_id, seq_id)
        );
        CREATE TABLE latent_examples (
            layer_id INTEGER NOT NULL REFERENCES layers(layer_id),
            channel  INTEGER NOT NULL,
            rank     INTEGER NOT NULL,
            seq_id   INTEGER NOT NULL REFERENCES sequences(seq_id),
            position INTEGER NOT NULL,
            value    REAL NOT NULL,
            PRIMARY KEY (layer_id, channel, rank)
        ) WITHOUT ROWID;
        CREATE TABLE stats (
            layer_id     INTEGER NOT NULL REFERENCES layers(layer_id),
            channel      INTEGER NOT NULL,
            count        INTEGER NOT NULL,
            active_count INTEGER NOT NULL,
            mean REAL, std REAL, min REAL, max REAL,
            PRIMARY KEY (layer_id, channel)
        ) WITHOUT ROWID;
        CREATE TABLE correlations (
            layer_id INTEGER NOT NULL REFERENCES layers(layer_id),
            channel  INTEGER NOT NULL,
            metric   TEXT NOT NULL,
            r        REAL NOT NULL,
            n        INTEGER NOT NULL,
            PRIMARY KEY (layer_id, channel, metric)
        ) WITHOUT ROWID;
        CREATE TABLE artifacts (
            artifact_id  INTEGER PRIMARY KEY,
            name         TEXT NOT NULL,
            kind         TEXT NOT NULL,             -- sae | transcoder | probe | ...
            architecture TEXT,
            layer        TEXT,
            path         TEXT,
            data         BLOB,
            config       TEXT NOT NULL DEFAULT '{}',
            metrics      TEXT NOT NULL DEFAULT '{}',
            created_at   TEXT NOT NULL
        );
        CREATE TABLE interventions (
            intervention_id INTEGER PRIMARY KEY,
            layer      TEXT NOT NULL,
            kind       TEXT NOT NULL,
            spec       TEXT NOT NULL DEFAULT '{}',
            results    TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL
        );
        """,
    ),
    Migration(
        2,
        "latent_explanations",
        """
        CREATE TABLE latent_explanations (
            layer_id   INTEGER NOT NULL REFERENCES layers(layer_id),
            channel    INTEGER NOT NULL,
            text       TEXT NOT NULL,               -- what the latent responds to, in words
            source     TEXT NOT NULL,               -- who wrote it: manual, a model's name, ...
            score      REAL,                        -- optional: how well it predicts activations
            created_at TEXT NOT NULL,
            PRIMARY KEY (layer_id, channel)
        ) WITHOUT ROWID;
        """,
    ),
    Migration(
        3,
        "run_owners",
        """
        -- who runs a run, so a reopen can tell a live run from one whose process was killed
        ALTER TABLE runs ADD COLUMN owner_host TEXT;      -- the machine's hostname
        ALTER TABLE runs ADD COLUMN owner_pid INTEGER;    -- the process id on that machine
        ALTER TABLE runs ADD COLUMN owner_started TEXT;   -- boot id and process start time (Linux), to
                                                          -- tell a reused pid or a reboot
        -- the run that wrote each activation row (NULL in older stores: the sequence's run)
        ALTER TABLE activations ADD COLUMN run_id INTEGER REFERENCES runs(run_id);
        CREATE INDEX IF NOT EXISTS sequences_text ON sequences(text);
        """,
    ),
    Migration(
        4,
        "logit_effects",
        """
        -- the tokens a latent's decoder direction promotes / suppresses through the model's
        -- unembedding (after the final norm), computed once when the model is at hand
        CREATE TABLE IF NOT EXISTS logit_effects (
            layer_id  INTEGER NOT NULL REFERENCES layers(layer_id),
            channel   INTEGER NOT NULL,
            direction TEXT NOT NULL,                -- promoted | suppressed
            rank      INTEGER NOT NULL,             -- 0 = strongest
            token_id  INTEGER NOT NULL,
            token     TEXT,                         -- the token's text, so readers need no tokenizer
            value     REAL NOT NULL,                -- the logit change per unit of latent activation
            PRIMARY KEY (layer_id, channel, direction, rank)
        ) WITHOUT ROWID;
        """,
    ),
    Migration(
        5,
        "activation_tiers",
        """
        -- where a store keeps its bulk activations: 'sqlite' (BLOBs in activations.data) or
        -- 'parquet' (immutable shard files under shard_root), chosen when the store is created
        CREATE TABLE IF NOT EXISTS store_settings (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;
        INSERT OR IGNORE INTO store_settings(key, value) VALUES ('activations', 'sqlite');
        -- one immutable Parquet file of one layer, written by one run; path is relative to the
        -- store's shard root
        CREATE TABLE IF NOT EXISTS shards (
            shard_id   INTEGER PRIMARY KEY,
            layer_id   INTEGER NOT NULL REFERENCES layers(layer_id),
            run_id     INTEGER REFERENCES runs(run_id),
            path       TEXT NOT NULL UNIQUE,
            n_rows     INTEGER NOT NULL,            -- token positions (one Parquet row each)
            n_bytes    INTEGER NOT NULL,            -- size of the file
            created_at TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS shards_layer ON shards(layer_id);
        -- a parquet-tier row keeps an empty data BLOB; its block is rows shard_row.. of shard_id
        ALTER TABLE activations ADD COLUMN shard_id INTEGER REFERENCES shards(shard_id);
        ALTER TABLE activations ADD COLUMN shard_row INTEGER;
        """,
    ),
    Migration(
        6,
        "search_index",
        """
        -- per (layer, channel) its highest stored values, kept as data is written
        -- (interlatent.db.search_index): data holds up to depth (value float32, prompt_index int64,
        -- row int32) entries in (prompt_index, row) order
        CREATE TABLE IF NOT EXISTS search_index (
            layer_id INTEGER NOT NULL REFERENCES layers(layer_id),
            channel  INTEGER NOT NULL,
            data     BLOB NOT NULL,
            PRIMARY KEY (layer_id, channel)
        ) WITHOUT ROWID;
        -- entries written since the channel rows were last folded: one row per write batch,
        -- (value, prompt_index, row, channel int32) records that may enter their channel's top
        CREATE TABLE IF NOT EXISTS search_index_log (
            log_id   INTEGER PRIMARY KEY,
            layer_id INTEGER NOT NULL REFERENCES layers(layer_id),
            data     BLOB NOT NULL
        );
        CREATE INDEX IF NOT EXISTS search_index_log_layer ON search_index_log(layer_id);
        -- one row per indexed layer: its depth, the sequences it has seen (a store whose count
        -- differs is rebuilt), the highest prompt index seen, per channel the lowest value kept
        -- at the last fold (float32 [channels], -inf while not full), and the entries logged since
        CREATE TABLE IF NOT EXISTS search_index_layers (
            layer_id    INTEGER PRIMARY KEY REFERENCES layers(layer_id),
            depth       INTEGER NOT NULL,
            n_sequences INTEGER NOT NULL,
            max_prompt  INTEGER NOT NULL,
            floor       BLOB NOT NULL,
            n_logged    INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    Migration(
        7,
        "token_index",
        """
        -- the token index (interlatent.db.token_index): the distinct token texts, per sequence the
        -- vocab id of each position (int32 [positions]), per vocab id the sequences holding it
        -- (int64 seq ids, one row per fold of the log), and the log of (vocab_id int32, seq_id
        -- int64) pairs written since the last fold; built again from the tokens rows
        DROP TABLE IF EXISTS token_vocab;
        DROP TABLE IF EXISTS token_vocab_ids;
        DROP TABLE IF EXISTS token_postings;
        DROP TABLE IF EXISTS token_postings_log;
        DROP TABLE IF EXISTS token_index_pending;
        CREATE TABLE token_vocab (
            vocab_id INTEGER PRIMARY KEY,
            text     TEXT NOT NULL UNIQUE
        );
        CREATE TABLE token_vocab_ids (
            seq_id INTEGER PRIMARY KEY,
            data   BLOB NOT NULL
        );
        CREATE TABLE token_postings (
            vocab_id INTEGER NOT NULL,
            part     INTEGER NOT NULL,
            data     BLOB NOT NULL,
            PRIMARY KEY (vocab_id, part)
        ) WITHOUT ROWID;
        CREATE TABLE token_postings_log (
            log_id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: a fold's part is its last log_id
            data   BLOB NOT NULL
        );
        -- sequences whose tokens row is not indexed yet: filled by these triggers, emptied at the
        -- commit of the write that filled it (and here, by the backfill)
        CREATE TABLE token_index_pending (
            seq_id INTEGER PRIMARY KEY
        );
        DROP TRIGGER IF EXISTS token_index_insert;
        DROP TRIGGER IF EXISTS token_index_update;
        DROP TRIGGER IF EXISTS token_index_delete;
        CREATE TRIGGER token_index_insert AFTER INSERT ON tokens BEGIN
            INSERT OR IGNORE INTO token_index_pending(seq_id) VALUES (new.seq_id);
        END;
        CREATE TRIGGER token_index_update AFTER UPDATE OF seq_id, tokens ON tokens BEGIN
            INSERT OR IGNORE INTO token_index_pending(seq_id) VALUES (new.seq_id);
        END;
        CREATE TRIGGER token_index_delete AFTER DELETE ON tokens BEGIN
            DELETE FROM token_vocab_ids WHERE seq_id = old.seq_id;
            DELETE FROM token_index_pending WHERE seq_id = old.seq_id;
        END;
        INSERT INTO token_index_pending(seq_id) SELECT seq_id FROM tokens;
        """,
        _index_stored_tokens,
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version
OUR_TABLES = {"runs", "sequences", "tokens", "layers", "activations"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def current_version(conn: sqlite3.Connection) -> int | None:
    """The applied schema version, or None for an empty database.

    Raises :class:`SchemaVersionError` for a database that holds other tables but no version.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "schema_migrations" not in tables:
        if tables:
            raise SchemaVersionError(
                f"this SQLite file is not an Interlatent store (it has tables {sorted(tables)[:6]} "
                "but no schema_migrations); open a new path instead"
            )
        return None
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def check_version(version: int | None) -> None:
    if version is not None and version > LATEST_VERSION:
        raise SchemaVersionError(
            f"store schema version {version} is newer than this library supports "
            f"(up to {LATEST_VERSION}); upgrade interlatent to read it"
        )


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every pending migration, each in its own transaction. Returns the final version.

    Safe when several processes open a new store at once: each step reads the version inside its
    own ``BEGIN IMMEDIATE`` (one writer at a time), so a step another process applied meanwhile
    is skipped rather than run twice.
    """
    with _immediate(conn):
        version = current_version(conn)
        check_version(version)
        if version is None:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            version = 0
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        with _immediate(conn):
            version = current_version(conn) or 0
            check_version(version)
            if migration.version <= version:
                continue
            for statement in _statements(migration.sql):
                conn.execute(statement)
            if migration.run is not None:
                migration.run(conn)
            conn.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, _now()),
            )
        version = migration.version
    return version


def is_busy(exc: BaseException) -> bool:
    """True for SQLite's "database is locked" / "busy": another connection holds the lock."""
    text = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)


def begin_immediate(conn: sqlite3.Connection, attempts: int = 8) -> None:
    """``BEGIN IMMEDIATE``, retried with backoff while another process holds the write lock beyond
    the connection's busy timeout (or where SQLite reports busy without waiting)."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    begin_immediate(conn)
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(sql: str) -> list[str]:
    """Split a migration script on semicolons that end a complete statement."""
    out, buf = [], []
    for line in sql.splitlines():
        code = line.split("--", 1)[0]
        buf.append(code)
        if code.rstrip().endswith(";") and sqlite3.complete_statement("\n".join(buf)):
            out.append("\n".join(buf).strip())
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        out.append(rest)
    return [s for s in out if s.strip(" ;\n")]
