"""Every command against every kind of bad store: exit 1 or 2, exactly one line on stderr, never a
traceback. The whole matrix runs in this process through ``main(argv)``; a subset runs as real
processes, to check the exit codes and that nothing else (logging, warnings) reaches stderr."""

from __future__ import annotations

import ctypes
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent import cli as cli_module
from interlatent.db import SequenceRecord, SparseActs

ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096

# subcommand -> its arguments after the store path (the smallest call that reads the store)
ARGS = {
    "summary": [],
    "search": ["--layer", "llm.layer.0"],
    "plot": ["--layer", "llm.layer.0", "--channel", "0", "--prompt-index", "0", "--out", "{tmp}/p.png"],
    "diff": ["--layer", "llm.layer.0", "--label-a", "a", "--label-b", "b"],
    "dashboard": ["-o", "{tmp}/report.html"],
    "eval": ["--list"],
    "attribute": [],
    "export": ["{tmp}/exported.db"],
    "import": ["{tmp}/imported.db"],
}
# subcommands whose module form (python -m) is another module, with the words that pick the command there
MODULE_FORMS = {"export": ("interlatent.vis.transfer", ["export"]), "import": ("interlatent.vis.transfer", ["import"])}


def module_form(command: str) -> tuple[str, list[str]]:
    return MODULE_FORMS.get(command, (f"interlatent.vis.{command}", []))
# more calls that read other parts of a store
EXTRA = {
    "summary-stats": ("summary", ["--stats", "llm.layer.0", "--format", "json"]),
    "summary-layers": ("summary", ["--list-layers", "--format", "csv"]),
    "search-filtered": ("search", ["--layer-prefix", "latent:", "--token-like", "w", "--format", "json"]),
    "search-examples": ("search", ["--layer", "latent:llm.layer.0"]),
    "attribute-list": ("attribute", ["--list", "--format", "json"]),
}
CALLS = {**{name: (name, args) for name, args in ARGS.items()}, **EXTRA}

# stores no command can read
BROKEN = ("missing", "empty", "text", "foreign_sqlite", "directory", "damaged_middle", "damaged_pages",
          "truncated", "newer_schema")
# stores where some commands still read what is intact (those exit 0); the others fail cleanly
PARTLY = ("bad_blob", "bad_json")


def build_real_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(8):
        n = 12
        dense = rng.standard_normal((n, 16)).astype(np.float32)
        idx = np.stack([rng.choice(32, 3, replace=False) for _ in range(n)])
        vals = rng.random((n, 3)).astype(np.float32) + 0.1
        recs.append(SequenceRecord(list(range(n)), [f" w{j}" for j in range(n)],
                                   {"llm.layer.0": dense, "latent:llm.layer.0": SparseActs(idx, vals, 32)},
                                   text=f"prompt {i}", label="a" if i % 2 else "b", prompt_index=i,
                                   metrics={"score": rng.standard_normal(n)}))
    with LatentDB(path) as db:
        with db.run() as run:
            run.write(recs, dtypes={"llm.layer.0": "float32", "latent:llm.layer.0": "float32"})
        db.compute_latent_examples("latent:llm.layer.0", top=4)
        db.compute_stats(min_count=1)
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0  # checkpointed
    return path


def _garbage_pages(path: Path, pages: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for p in pages:
            f.seek((p - 1) * PAGE)
            f.write(rng.bytes(PAGE))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kinds")
    good = build_real_store(folder / "good.db")
    size = good.stat().st_size
    out = {"good": good, "missing": folder / "missing.db"}
    (folder / "empty.db").write_bytes(b"")
    out["empty"] = folder / "empty.db"
    (folder / "text.db").write_text("name,score\nalice,3\n")
    out["text"] = folder / "text.db"
    conn = sqlite3.connect(folder / "foreign.db")
    conn.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    out["foreign_sqlite"] = folder / "foreign.db"
    (folder / "a_directory.db").mkdir()
    out["directory"] = folder / "a_directory.db"

    def copy(kind: str) -> Path:
        dst = folder / f"{kind}.db"
        shutil.copy(good, dst)
        out[kind] = dst
        return dst

    middle = copy("damaged_middle")  # bytes overwritten in the middle of the file
    with open(middle, "r+b") as f:
        f.seek(size // 3)
        f.write(np.random.default_rng(1).bytes(size // 3))
    conn = sqlite3.connect(good)
    roots = [r for (r,) in conn.execute("SELECT rootpage FROM sqlite_master WHERE rootpage > 0"
                                        " AND name != 'schema_migrations'")]
    conn.close()
    _garbage_pages(copy("damaged_pages"), roots, seed=2)  # the schema reads, every table's pages are garbage
    os.truncate(copy("truncated"), size // 2)
    conn = sqlite3.connect(copy("newer_schema"))
    conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, 'future', '2031-01-01')")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(copy("bad_blob"))  # every stored activation block cut to 3 bytes
    conn.execute("UPDATE activations SET data = x'010203'")
    conn.commit()
    conn.close()
    conn = sqlite3.connect(copy("bad_json"))  # a run's JSON config is not JSON
    conn.execute("UPDATE runs SET config = '{not json'")
    conn.commit()
    conn.close()
    return out


def argv_for(call: str, db: Path, tmp: Path) -> list[str]:
    command, args = CALLS[call]
    return [command, str(db), *(a.format(tmp=tmp) for a in args)]


def in_process(argv: list[str], capsys, entry=None) -> tuple[int, str, str]:
    try:
        rc = (entry or cli_module.main)(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_clean_line(rc: int, err: str, allowed=(1, 2)) -> None:
    assert rc in allowed, f"exit {rc}: {err}"
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and len(lines[0]) < 400, lines[0]


def test_every_subcommand_is_in_the_matrix():
    assert set(cli_module.SUBCOMMANDS) <= set(ARGS), (
        f"add the smallest store-reading call of {sorted(set(cli_module.SUBCOMMANDS) - set(ARGS))} to ARGS")


def test_the_good_store_reads_with_every_call(stores, tmp_path, capsys):
    for call in CALLS:
        rc, out, err = in_process(argv_for(call, stores["good"], tmp_path), capsys)
        assert rc == 0, (call, err)


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_store_no_command_can_read_is_one_line_and_exit_1(stores, kind, call, tmp_path, capsys):
    rc, out, err = in_process(argv_for(call, stores[kind], tmp_path), capsys)
    assert_one_clean_line(rc, err, allowed=(1,))
    assert out == ""
    assert not stores["missing"].exists()  # reading never creates a store


@pytest.mark.parametrize("kind", PARTLY)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_partly_damaged_store_reads_or_fails_in_one_line(stores, kind, call, tmp_path, capsys):
    rc, out, err = in_process(argv_for(call, stores[kind], tmp_path), capsys)
    if rc != 0:
        assert_one_clean_line(rc, err, allowed=(1,))
        assert "damaged" in err


def test_damaged_pages_name_the_store_and_the_damage(stores, tmp_path, capsys):
    rc, _, err = in_process(["summary", str(stores["damaged_pages"])], capsys)
    assert rc == 1 and "damaged_pages.db" in err and "malformed" in err and "Execution failed on sql" not in err


# ---------------------------------------------------------------------------- real processes
def run_process(args: list[str], *, module: str = "interlatent.cli", env: dict | None = None,
                preexec_fn=None, cwd: Path = ROOT) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if k != "INTERLATENT_DEBUG"}
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=120, preexec_fn=preexec_fn)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("kind", BROKEN + PARTLY)
def test_console_script_exit_code_and_stderr_in_a_process(stores, kind, tmp_path):
    # plot reads the damaged blocks (search answers from the search index, which they do not reach)
    call = "plot" if kind == "bad_blob" else "summary"
    rc, _, err = run_process(argv_for(call, stores[kind], tmp_path))
    assert_one_clean_line(rc, err, allowed=(1,))


@pytest.mark.parametrize("command", sorted(ARGS))
def test_module_forms_in_a_process(stores, command, tmp_path):
    _, args = CALLS[command]
    module, words = module_form(command)
    rc, _, err = run_process([*words, str(stores["damaged_pages"]), *(a.format(tmp=tmp_path) for a in args)],
                             module=module)
    assert_one_clean_line(rc, err, allowed=(1,))


def test_usage_errors_exit_2_in_a_process(stores):
    rc, _, err = run_process(["search", str(stores["good"])])  # neither --layer nor --layer-prefix
    assert_one_clean_line(rc, err, allowed=(2,))
    assert "usage:" not in err and err.strip().endswith("(see interlatent search --help)")


@pytest.mark.parametrize("command", sorted(ARGS))
def test_usage_errors_of_the_module_forms_are_one_line_in_a_process(stores, command):
    module, words = module_form(command)
    rc, _, err = run_process([*words, str(stores["good"]), "--not-an-option"], module=module)
    assert_one_clean_line(rc, err, allowed=(2,))
    assert err.strip().endswith(f"(see python -m {' '.join([module, *words])} --help)")


@pytest.mark.parametrize("argv", [["summary"], ["bogus"], ["summary", "{db}", "--top", "0"],
                                  ["search", "{db}", "--layer", "llm.layer.0", "--top", "abc"],
                                  ["search", "{db}", "--layer", "llm.layer.0", "--window", "-5"],
                                  ["plot", "{db}", "--layer", "llm.layer.0"], ["diff", "{db}", "--label-a", "a"],
                                  ["dashboard", "{db}", "--unknown"]], ids=" ".join)
def test_usage_errors_are_one_line(stores, argv, capsys):
    rc, out, err = in_process([a.format(db=stores["good"]) for a in argv], capsys)
    assert_one_clean_line(rc, err, allowed=(2,))
    assert out == "" and "usage:" not in err and err.strip().endswith(" --help)")


def test_a_closed_stdout_pipe_stops_quietly(stores):
    proc = subprocess.Popen([sys.executable, "-m", "interlatent.cli", "search", str(stores["good"]), "--layer",
                             "llm.layer.0", "--top", "5000", "--format", "csv"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().startswith(b"layer,channel,value")
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 1) and err == ""


def _drop_file_permission_override() -> None:
    """In the child, before exec: give up root's right to ignore file permissions, so that a
    directory with mode 0o555 is read-only for it as for any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture(scope="module")
def read_only_store(stores, tmp_path_factory):
    folder = tmp_path_factory.mktemp("readonly")
    store = folder / "ro" / "latents.db"
    store.parent.mkdir()
    shutil.copy(stores["good"], store)
    writable_out = folder / "out"
    writable_out.mkdir()
    store.parent.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    preexec = _drop_file_permission_override if os.geteuid() == 0 else None
    probe = subprocess.run([sys.executable, "-c", f"open({str(store.parent / 'probe')!r}, 'w')"],
                           capture_output=True, preexec_fn=preexec)
    if probe.returncode == 0:
        store.parent.chmod(0o755)
        pytest.skip("this process can write into a 0o555 directory (root without a way to drop that right)")
    yield store, writable_out, preexec
    store.parent.chmod(0o755)


@pytest.mark.parametrize("command", sorted(ARGS))
def test_read_only_store_reads_or_fails_in_one_line(read_only_store, command):
    store, out_dir, preexec = read_only_store
    rc, _, err = run_process(argv_for(command, store, out_dir), preexec_fn=preexec)
    if rc != 0:  # SQLite cannot read a WAL store where it cannot create the -shm file: say so
        assert_one_clean_line(rc, err, allowed=(1,))
        assert "read-only" in err and "copy the store to a writable folder" in err
    assert sorted(p.name for p in store.parent.iterdir()) == ["latents.db"]  # nothing written beside it


def test_output_into_a_read_only_directory_is_one_line(read_only_store, stores, tmp_path):
    store, _, preexec = read_only_store
    for command in ("dashboard", "plot"):
        args = argv_for(command, stores["good"], store.parent)
        rc, _, err = run_process(args, preexec_fn=preexec)
        assert_one_clean_line(rc, err, allowed=(1,))
        assert "Permission denied" in err or "permission" in err.lower()


# ---------------------------------------------------------------------------- --debug and genuine bugs
def test_a_genuine_bug_is_one_line_and_shows_its_traceback_with_debug(stores, monkeypatch, capsys):
    from interlatent.vis import queries

    def broken(*_a, **_k):
        raise ZeroDivisionError("a bug in the query layer")

    monkeypatch.setattr(queries, "layers_table", broken)
    rc, _, err = in_process(["summary", str(stores["good"])], capsys)
    assert_one_clean_line(rc, err, allowed=(1,))
    assert "ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli_module.main(["--debug", "summary", str(stores["good"])])
    with pytest.raises(ZeroDivisionError):
        cli_module.main(["summary", str(stores["good"]), "--debug"])
    monkeypatch.setenv("INTERLATENT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli_module.main(["summary", str(stores["good"])])


def test_debug_in_a_process_prints_the_traceback(stores):
    rc, _, err = run_process(["--debug", "summary", str(stores["damaged_pages"])])
    assert rc == 1 and "Traceback" in err
    rc, _, err = run_process([str(stores["damaged_pages"])], module="interlatent.vis.summary",
                             env={"INTERLATENT_DEBUG": "1"})
    assert rc == 1 and "Traceback" in err


@pytest.mark.parametrize("call", [
    ["summary", "--stats", "llm.layer.0", "--top", "-2"], ["summary", "--stats", "llm.layer.0", "--top", "0"],
    ["search", "--layer", "llm.layer.0", "--window", "-2"], ["search", "--layer", "llm.layer.0", "--top", "x"],
    ["diff", "--layer", "llm.layer.0", "--label-a", "a", "--label-b", "b", "--top", "-1"],
    ["dashboard", "-o", "{tmp}/r.html", "--max-tokens", "-5"], ["dashboard", "-o", "{tmp}/r.html", "--max-latents", "0"],
], ids=lambda c: " ".join(c[:1] + c[-2:]))
def test_counts_out_of_range_are_usage_errors_not_silently_wrong_output(stores, call, tmp_path, capsys):
    argv = [call[0], str(stores["good"]), *(a.format(tmp=tmp_path) for a in call[1:])]
    rc, out, err = in_process(argv, capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert f"argument {call[-2]}: expected an integer >= " in err
    assert_one_clean_line(rc, err, allowed=(2,))


# ---------------------------------------------------------------------------- output paths (item 15a)
def test_plot_unknown_extension_is_a_usage_error_listing_the_formats(stores, tmp_path, capsys):
    out = tmp_path / "p.xyz"
    rc, stdout, err = in_process(["plot", str(stores["good"]), "--layer", "llm.layer.0", "--channel", "0",
                                  "--prompt-index", "0", "--out", str(out)], capsys)
    assert rc == 2 and "Traceback" not in err and stdout == ""
    assert "'.xyz'" in err and "png" in err and "svg" in err and "pdf" in err
    assert not out.exists()


def test_plot_without_extension_writes_png_and_prints_that_path(stores, tmp_path, capsys):
    rc, stdout, err = in_process(["plot", str(stores["good"]), "--layer", "llm.layer.0", "--channel", "0",
                                  "--prompt-index", "0", "--out", str(tmp_path / "report")], capsys)
    assert rc == 0, err
    printed = Path(stdout.strip())
    assert printed == tmp_path / "report.png" and printed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "report").exists()


def test_plot_into_a_directory_writes_the_default_name_there(stores, tmp_path, capsys):
    rc, stdout, err = in_process(["plot", str(stores["good"]), "--layer", "llm.layer.0", "--channel", "0", "1",
                                  "--prompt-index", "2", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    printed = Path(stdout.strip())
    assert printed == tmp_path / "plot_llm.layer.0_p2.png" and printed.read_bytes()[:4] == b"\x89PNG"


def test_plot_into_a_missing_directory_is_a_usage_error(stores, tmp_path, capsys):
    rc, stdout, err = in_process(["plot", str(stores["good"]), "--layer", "llm.layer.0", "--channel", "0",
                                  "--prompt-index", "0", "--out", f"{tmp_path}/not_there/"], capsys)
    assert rc == 2 and "there is no directory" in err and stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_plot_svg_is_written_as_svg(stores, tmp_path, capsys):
    rc, stdout, err = in_process(["plot", str(stores["good"]), "--layer", "llm.layer.0", "--channel", "0",
                                  "--prompt-index", "0", "--out", str(tmp_path / "p.svg")], capsys)
    assert rc == 0 and Path(stdout.strip()).read_text().lstrip().startswith("<?xml")


def test_dashboard_into_a_directory_writes_report_html_there(stores, tmp_path, capsys):
    rc, stdout, err = in_process(["dashboard", str(stores["good"]), "-o", str(tmp_path)], capsys)
    assert rc == 0, err
    printed = Path(stdout.strip())
    assert printed == tmp_path / "report.html" and printed.read_text().startswith("<!DOCTYPE html>")


def test_dashboard_output_under_a_file_is_one_line(stores, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = in_process(["dashboard", str(stores["good"]), "-o", str(blocker / "r.html")], capsys)
    assert_one_clean_line(rc, err, allowed=(1,))
    assert blocker.read_text() == "x"


def test_no_command_imports_torch_even_when_it_fails(stores, tmp_path):
    calls = [argv_for(c, stores[k], tmp_path) for c in sorted(ARGS) for k in ("good", "damaged_pages")]
    code = ("import sys\nfrom interlatent.cli import main\n"
            f"for argv in {calls!r}:\n    main(argv)\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr
    assert "Traceback" not in proc.stderr
