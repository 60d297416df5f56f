"""Nothing let in: symbols checked before any path or URL, no path out of ``<data_dir>``, no
unpickling or eval of anything read, servers on 127.0.0.1, the lint rule that holds the line.

See docs/reliability.md ("Security").
"""

from __future__ import annotations

import ast
import datetime as dt
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yahoo_stub import YahooStub

from sensitivity.errors import ConfigError, SensitivityError, SourceError, StoreError
from sensitivity.sources.files import FilesSource
from sensitivity.sources.sample import SampleSource
from sensitivity.store import PriceStore, ReportStore
from sensitivity.symbols import MAX_SYMBOL_LENGTH, normalize_symbol

ROOT = Path(__file__).resolve().parents[1]

#: Real Yahoo symbols of every shape: indices, share classes, exchange suffixes, currencies,
#: futures, crypto pairs, an ampersand (NSE).
YAHOO_SYMBOLS = [
    "AAPL",
    "brk-b",
    "BRK.B",
    "^GSPC",
    "^N225",
    "EURUSD=X",
    "ES=F",
    "GC=F",
    "0700.HK",
    "005930.KS",
    "SHOP.TO",
    "BTC-USD",
    "M&M.NS",
    "X" * MAX_SYMBOL_LENGTH,
]

#: Strings that must never become a file name or a URL path.
HOSTILE = [
    "",
    " ",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "A/B",
    "A\\B",
    "A..B",
    ".hidden",
    "A.",
    "-A",
    "A B",
    "A\tB",
    "A\nB",
    "A\x00B",
    "A\x1bB",
    "%2e%2e%2f",
    "A?x=1",
    "A#frag",
    "A;rm",
    "$(id)",
    "`id`",
    "A|B",
    "<script>",
    "KÖ",
    "Ａ",  # a full-width letter
    "X" * (MAX_SYMBOL_LENGTH + 1),
    "A" * 200,
    "^^GSPC",
    "A==B",
]


# -- symbols ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", YAHOO_SYMBOLS)
def test_yahoo_symbol_alphabet_is_accepted_and_maps_inside_the_store(symbol: str, tmp_path: Path) -> None:
    sym = normalize_symbol(symbol)
    assert sym == symbol.strip().upper()
    for path in (
        PriceStore(tmp_path).path_for(sym),
        ReportStore(tmp_path).sensitivity_path("^GSPC", sym, 252),
        ReportStore(tmp_path).sensitivity_path(sym, "AAPL", 0),
    ):
        assert path.resolve().parent.parent in (tmp_path.resolve(), (tmp_path / "reports").resolve())
        assert path.resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("symbol", HOSTILE, ids=[repr(s)[:20] for s in HOSTILE])
def test_hostile_symbol_never_reaches_a_path(symbol: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(ConfigError, match=r"must not be empty|not a plausible ticker|characters long"):
        normalize_symbol(symbol)
    refusals = [
        lambda: PriceStore(tmp_path).path_for(symbol),
        lambda: PriceStore(tmp_path).read(symbol),
        lambda: ReportStore(tmp_path).sensitivity_path("^GSPC", symbol, 252),
        lambda: ReportStore(tmp_path).sensitivity_path(symbol, "AAPL", 252),
        lambda: FilesSource(tmp_path / "src").path_for(symbol),
        lambda: FilesSource(tmp_path / "src").fetch(symbol, dt.date(2020, 1, 1), dt.date(2020, 2, 1)),
        lambda: SampleSource().fetch(symbol, dt.date(2015, 1, 1), dt.date(2015, 2, 1)),
    ]
    for refuse in refusals:
        with pytest.raises(ConfigError):
            refuse()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing was created


@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
def test_hostile_symbol_never_reaches_a_url(yahoo_env: YahooStub, network_guard: list[str]) -> None:
    from sensitivity.sources.yahoo import YahooSource

    source = YahooSource(timeout_s=2.0)
    for symbol in HOSTILE:
        with pytest.raises(ConfigError):
            source.fetch(symbol, dt.date(2020, 1, 1), dt.date(2020, 2, 1))
    assert yahoo_env.requests == []  # not one request left the process
    assert network_guard == []


@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
def test_a_symbol_reaches_the_url_exactly_as_validated(yahoo_env: YahooStub) -> None:
    from sensitivity.sources.yahoo import YahooSource

    with pytest.raises(SourceError, match=r"^M&M\.NS: Yahoo has no prices for this symbol"):
        YahooSource(timeout_s=2.0).fetch("m&m.ns", dt.date(2020, 1, 1), dt.date(2020, 2, 1))
    assert {r.chart_symbol for r in yahoo_env.chart_requests()} == {"M&M.NS"}
    assert {r.path for r in yahoo_env.chart_requests()} <= {
        "/v8/finance/chart/M&M.NS",
        "/v8/finance/chart/M%26M.NS",
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=0, max_size=40))
def test_any_string_is_refused_or_stays_in_its_folder(text: str, tmp_path: Path) -> None:
    store = PriceStore(tmp_path)
    try:
        path = store.path_for(text)
    except (ConfigError, StoreError):
        return
    assert path.parent == store.folder
    assert path.resolve().parent == store.folder.resolve()
    assert path.name == f"{normalize_symbol(text)}.parquet"
    assert not path.name.startswith(".")


def test_as_of_and_window_never_shape_a_path(tmp_path: Path) -> None:
    reports = ReportStore(tmp_path)
    for bad in ("../2020-01-01", "2020-01-01/..", "2020-13-01", "..", ""):
        with pytest.raises((ValueError, TypeError)):
            reports.report_paths(bad)
        with pytest.raises((ValueError, TypeError)):
            reports.summary_path(bad)
    for window in (-1, 1.5, "20", True):
        with pytest.raises(ValueError):
            reports.sensitivity_path("^GSPC", "AAPL", window)  # type: ignore[arg-type]
    html, manifest = reports.report_paths(dt.date(2020, 1, 2))
    assert html.parent == manifest.parent == tmp_path / "reports" / "daily" / "2020-01-02"


# -- symlinks ---------------------------------------------------------------------------------------


def _price_file(path: Path) -> None:
    from sensitivity.store import write_price_file

    frame = pd.DataFrame(
        {c: [10.0, 11.0] for c in ("open", "high", "low", "close", "adj_close", "volume")}
        | {"dividends": [0.0, 0.0], "splits": [0.0, 0.0]},
        index=pd.DatetimeIndex(["2020-01-02", "2020-01-03"], name="date"),
    )
    write_price_file(
        path, frame, symbol="X", source="test", fetched_at=dt.datetime(2020, 1, 4, tzinfo=dt.UTC)
    )


def test_store_refuses_a_price_file_that_links_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside.parquet"
    _price_file(outside)
    before = outside.read_bytes()
    data = tmp_path / "data"
    (data / "prices").mkdir(parents=True)
    (data / "prices" / "KO.parquet").symlink_to(outside)
    store = PriceStore(data)
    with pytest.raises(StoreError, match=r"'KO\.parquet' resolves outside .*prices; refusing"):
        store.read("KO")
    frame = pd.DataFrame(
        {c: [12.0] for c in ("open", "high", "low", "close", "adj_close", "volume", "dividends", "splits")},
        index=pd.DatetimeIndex(["2020-01-06"], name="date"),
    )
    with pytest.raises(StoreError, match=r"resolves outside"):
        store.merge("KO", frame, source="test")
    assert outside.read_bytes() == before  # never read through, never written through


def test_files_source_refuses_a_file_that_links_outside(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "secret.csv"
    outside.parent.mkdir()
    outside.write_text("Date,Close\n2020-01-02,1.0\n2020-01-03,2.0\n")
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "KO.csv").symlink_to(outside)
    with pytest.raises(SourceError, match=r"^KO: KO\.csv in .* links to .*secret\.csv, outside the folder"):
        FilesSource(folder).fetch("KO", dt.date(2020, 1, 1), dt.date(2020, 1, 31))


def test_files_source_follows_a_link_inside_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "ko-2020.csv").write_text("Date,Close\n2020-01-02,1.0\n2020-01-03,2.0\n")
    (folder / "KO.csv").symlink_to(folder / "ko-2020.csv")
    assert len(FilesSource(folder).fetch("KO", dt.date(2020, 1, 1), dt.date(2020, 1, 31))) == 2


# -- no unpickling, no eval ---------------------------------------------------------------------------

#: Calls that turn bytes read from disk or the network into code or arbitrary objects.
UNSAFE = {
    "pickle.load(s)": r"\b(cloud)?pickle\s*\.\s*(loads?|Unpickler)\b",
    "dill/joblib/marshal/shelve": (
        r"\b(dill\s*\.\s*loads?|joblib\s*\.\s*load|marshal\s*\.\s*loads?|shelve\s*\.\s*open)\b"
    ),
    "eval(": r"(?<![\w.])eval\s*\(",
    "exec(": r"(?<![\w.])exec\s*\(",
    "yaml.load( without SafeLoader": r"\byaml\s*\.\s*(unsafe_load|load(_all)?\s*\((?![^)]*SafeLoader))",
    "torch.load": r"\btorch\s*\.\s*load\b",
    "read_pickle": r"\bread_pickle\b",
    "numpy allow_pickle=True": r"\ballow_pickle\s*=\s*True\b",
}


def code_text(source: str) -> str:
    """``source`` without comments and string literals (docstrings may name what the code must not do)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    kept = [t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING)]
    return re.sub(r"\s*\.\s*", ".", " ".join(kept))  # ``a . b`` -> ``a.b``: attribute access stays visible


def unsafe_calls(source: str) -> list[str]:
    text = code_text(source)
    return [name for name, pattern in UNSAFE.items() if re.search(pattern, text)]


def test_the_scan_finds_what_it_looks_for() -> None:
    bad = [
        "import pickle\nx = pickle.loads(b)",
        "obj = cloudpickle.load(fh)",
        "v = eval(text)",
        "exec(code)",
        "cfg = yaml.load(fh)",
        "cfg = yaml.load(fh, Loader=yaml.Loader)",
        "m = torch.load(path)",
        "df = pd.read_pickle(path)",
        "a = np.load(path, allow_pickle=True)",
    ]
    for snippet in bad:
        assert unsafe_calls(snippet), snippet
    ok = [
        "model.eval()",
        "spec.loader.exec_module(module)",
        "cfg = yaml.load(fh, Loader=yaml.SafeLoader)",
        "cfg = yaml.safe_load(fh)",
        '"""never pickle.loads anything"""',
        "x = 1  # eval(x) would be wrong",
        "cloudpickle.register_pickle_by_value(module)",
    ]
    for snippet in ok:
        assert not unsafe_calls(snippet), snippet


#: The one exception: the worker pool pickles jobs and results on the anonymous pipes between
#: the process and the workers it started itself -- bytes that never touch a file or a
#: socket, written only by this package's code on either side.
PIPE_ONLY = {"src/sensitivity/process_pool.py": ["pickle.load(s)"]}


def test_no_unpickling_or_eval_in_src_and_flows() -> None:
    files = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])
    assert len(files) > 10
    found = {str(p.relative_to(ROOT)): calls for p in files if (calls := unsafe_calls(p.read_text()))}
    assert found == PIPE_ONLY


def test_the_worker_pool_unpickles_only_from_its_own_pipes() -> None:
    source = (ROOT / "src/sensitivity/process_pool.py").read_text()
    text = code_text(source)
    # No file, shared memory, network or named socket in the module.  Its channels are the
    # pipes to the workers (made by Popen, or by os.pipe for the ones the zygote forks)...
    for channel in (
        r"\bopen\s*\(",
        r"\bmmap\b",
        r"shared_memory",
        r"\bPath\b",
        r"AF_INET",
        r"\.bind\b",
        r"\.connect\b",
    ):
        assert not re.search(channel, text), channel
    assert "stdin=subprocess.PIPE" in text.replace(" ", "")
    assert "stdout=subprocess.PIPE" in text.replace(" ", "")
    assert re.findall(r"os\.fdopen \( (\w+)", text) == ["ours_in", "ours_out"]
    assert re.search(r"child_in , ours_in = os\.pipe \( \)", text)
    assert re.search(r"ours_out , child_out = os\.pipe \( \)", text)
    # ...and one anonymous socket pair to the zygote, which carries JSON out and fixed-size
    # records of integers back, never a pickle.
    assert re.findall(r"socket\.(\w+) \(", text) == ["socketpair", "send_fds"]
    assert re.findall(r"self\._sock\.recv \( (.*?) \)", text) == ["_REPLY.size"]
    tree = ast.parse(source)
    unpickling = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and "pickle.load" in ast.unparse(node)
    }
    assert unpickling == {"_receive"}  # called on a worker's stdout, and in the worker on its stdin


def _ruff(code: str, filename: str) -> subprocess.CompletedProcess[str]:
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [str(ruff), "check", "--no-cache", "--output-format", "concise", "--stdin-filename", filename, "-"],
        input=code,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_ruff_bans_pickle_and_prefect_in_the_core() -> None:
    code = (
        "import pickle\n\nimport prefect\n\n\n"
        "def f(b: bytes) -> object:\n    return pickle.loads(b), prefect\n"
    )
    core = _ruff(code, "src/sensitivity/_security_probe.py")
    assert core.returncode == 1, core.stdout + core.stderr
    assert "TID251 `pickle` is banned: Never unpickle anything read from disk or the network." in core.stdout
    assert "TID251 `prefect` is banned" in core.stdout
    assert "S301" in core.stdout  # and the unpickling call itself
    flows = _ruff(code, "flows/_security_probe.py")  # flows may import Prefect, still not unpickle
    assert "`prefect` is banned" not in flows.stdout
    assert "S301" in flows.stdout


# -- servers on the loopback only ------------------------------------------------------------------------


def test_servers_in_docs_and_tests_bind_to_loopback() -> None:
    any_address = "0.0.0" + ".0"  # spelt out here, this file would match itself
    texts = [ROOT / "README.md", ROOT / "prefect.yaml", ROOT / "Makefile"]
    for folder in ("docs", "tests", "flows", "src", "config", "benchmarks", ".ci"):
        texts += [
            p
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and p.suffix in (".md", ".py", ".toml", ".yaml", ".yml", "")
        ]
    offenders = []
    for path in texts:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any_address in line or re.search(r"--host\s+(?!127\.0\.0\.1\b|localhost\b)\S+", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"\bbind\(\(\s*(['\"])\1", line) or re.search(r"HTTPServer\(\(\s*(['\"])\1", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
    readme = (ROOT / "README.md").read_text()
    assert "prefect server start --host 127.0.0.1" in readme


def test_the_yahoo_stub_listens_on_loopback_only() -> None:
    with YahooStub() as stub:
        assert stub.base_url.startswith("http://127.0.0.1:")


def test_redirected_yahoo_session_contacts_nothing_else(yahoo_env: YahooStub) -> None:
    import requests

    from sensitivity.sources.yahoo import YahooRequestsSession

    session = YahooRequestsSession(base_url=yahoo_env.base_url, timeout_s=2.0)
    with pytest.raises(requests.ConnectionError, match=r"refusing to contact example\.com"):
        session.get("https://example.com/steal?x=1")
    assert session.trust_env is False  # no proxy from the environment either
    assert yahoo_env.requests == []


# -- what the report shows -----------------------------------------------------------------------------


def test_report_escapes_text_that_came_from_files(tmp_path: Path) -> None:
    """A failure reason quotes a source file (its header line); the HTML shows it as text."""
    import numpy as np

    from sensitivity.api import quadratic_sensitivity
    from sensitivity.pipeline import _with_prices
    from sensitivity.report import render_report, summary_table

    idx = pd.bdate_range("2020-01-02", periods=30, name="date")
    rng = np.random.default_rng(0)
    market = pd.Series(rng.normal(0, 0.01, 30), index=idx)
    stocks = pd.DataFrame({"KO": market * 0.8 + rng.normal(0, 0.005, 30)}, index=idx)
    result = quadratic_sensitivity(stocks, market, window=20, min_obs=10)
    close = pd.DataFrame({"KO": 50.0 + rng.random(30)}, index=idx)
    table = _with_prices(result, close, close.shift(1), "^GSPC")
    summary = summary_table(table)
    summary["fit"] = "ols"
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    manifest = {
        "as_of": "2020-02-12",
        "failures": {"ZZZZ": f"ZZZZ.csv has no Close column (its columns: {evil})"},
        "config": {},
    }
    try:
        html = render_report(table, summary, manifest).decode()
    except (KeyError, TypeError, SensitivityError) as exc:  # the manifest above is minimal
        pytest.skip(f"render_report needs a fuller manifest: {exc}")
    assert "<script>alert(1)" not in html
    assert "<img src=x" not in html
