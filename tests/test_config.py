"""Config loading: every impossible value is refused before work starts, naming key and value."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from sensitivity.config import Config, load_config
from sensitivity.errors import ConfigError

GOOD = """
[universe]
index = "^GSPC"
tickers = ["AAPL", "msft", "BRK-B"]
start = 2015-01-01
end = 2016-12-31

[source]
kind = "sample"

[model]
window = 252
min_obs = 126

[output]
data_dir = "out"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_load_config_reads_every_section(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.universe.index == "^GSPC"
    assert cfg.universe.tickers == ("AAPL", "MSFT", "BRK-B")
    assert cfg.universe.start == dt.date(2015, 1, 1)
    assert cfg.universe.end == dt.date(2016, 12, 31)
    assert cfg.source.kind == "sample"
    assert (cfg.model.window, cfg.model.min_obs) == (252, 126)
    assert cfg.output.data_dir == Path("out")


def test_load_config_shipped_files_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in ("default.toml", "sample.toml"):
        assert isinstance(load_config(root / "config" / name), Config)


def test_load_config_overrides_win_over_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, GOOD),
        {"tickers": ["KO"], "window": 0, "min_obs": 10, "start": "2015-06-01", "data_dir": "x", "end": None},
    )
    assert cfg.universe.tickers == ("KO",)
    assert cfg.model.window == 0
    assert cfg.universe.start == dt.date(2015, 6, 1)
    assert cfg.universe.end == dt.date(2016, 12, 31)  # None leaves the file's value
    assert cfg.output.data_dir == Path("x")


def test_load_config_comma_separated_tickers(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), {"tickers": "AAPL, KO"})
    assert cfg.universe.tickers == ("AAPL", "KO")


def test_end_defaults_to_today(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace("end = 2016-12-31", "")))
    assert cfg.universe.end is None
    assert cfg.universe.resolved_end == dt.date.today()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param(
            "window = 252", "window = -5", r"model\.window must be >= 0, got -5", id="negative-window"
        ),
        pytest.param(
            "min_obs = 126", "min_obs = 3", r"model\.min_obs must be >= 4, got 3", id="min-obs-too-small"
        ),
        pytest.param(
            "min_obs = 126", "min_obs = 300", r"min_obs=300 > window=252", id="min-obs-above-window"
        ),
        pytest.param(
            "window = 252", 'window = "252"', r"model\.window must be an integer, got '252'", id="window-str"
        ),
        pytest.param("window = 252", "window = 25.5", r"model\.window must be an integer", id="window-float"),
        pytest.param("window = 252", "window = true", r"model\.window must be an integer", id="window-bool"),
        pytest.param(
            "window = 252", "window = 252\nwindo = 3", r"unknown key 'model\.windo'", id="unknown-key"
        ),
        pytest.param("[output]", "[outputs]", r"unknown key 'outputs'", id="unknown-section"),
        pytest.param(
            "end = 2016-12-31",
            "end = 2014-12-31",
            r"universe\.start 2015-01-01 is after universe\.end",
            id="start-after-end",
        ),
        pytest.param(
            "start = 2015-01-01", 'start = "2015-13-01"', r"universe\.start must be a date", id="bad-date"
        ),
        pytest.param(
            "start = 2015-01-01", "start = 2015-01-01T10:00:00", r"not a date and time", id="datetime"
        ),
        pytest.param(
            'tickers = ["AAPL", "msft", "BRK-B"]', "tickers = []", r"at least one ticker", id="empty-tickers"
        ),
        pytest.param(
            'tickers = ["AAPL", "msft", "BRK-B"]',
            'tickers = ["AAPL", "aapl"]',
            r"lists AAPL more than once",
            id="dup",
        ),
        pytest.param(
            'tickers = ["AAPL", "msft", "BRK-B"]',
            'tickers = ["../etc/passwd"]',
            r"'\.\./etc/passwd' is not a plausible",
            id="path",
        ),
        pytest.param(
            'tickers = ["AAPL", "msft", "BRK-B"]',
            'tickers = ["AA PL"]',
            r"'AA PL' is not a plausible",
            id="space",
        ),
        pytest.param(
            'tickers = ["AAPL", "msft", "BRK-B"]',
            'tickers = ["AAPL", "^GSPC"]',
            r"contains the index \^GSPC",
            id="index-in-tickers",
        ),
        pytest.param(
            'kind = "sample"', 'kind = "bloomberg"', r"source\.kind must be one of", id="bad-source"
        ),
        pytest.param(
            'kind = "sample"', 'kind = "files"', r"source\.path is required", id="files-without-path"
        ),
        pytest.param(
            'index = "^GSPC"',
            'index = "^GS/PC"',
            r"universe\.index '\^GS/PC' is not a plausible",
            id="bad-index",
        ),
    ],
)
def test_load_config_rejects_bad_values(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, GOOD.replace(old, new)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"window": -1}, r"model\.window must be >= 0, got -1", id="window"),
        pytest.param(
            {"start": "yesterday"}, r"universe\.start must be a date written YYYY-MM-DD", id="start"
        ),
        pytest.param({"tickers": "AAPL,,KO"}, r"must not be empty", id="empty-item"),
        pytest.param({"source": "ftp"}, r"source\.kind must be one of", id="source"),
        pytest.param({"colour": "red"}, r"unknown option 'colour'", id="unknown-option"),
    ],
)
def test_load_config_rejects_bad_overrides(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, GOOD), overrides)


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml' does not exist"):
        load_config(tmp_path / "nope.toml")


def test_load_config_malformed_toml_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[universe\nindex="))


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    with pytest.raises(Exception, match="frozen"):
        cfg.model.window = 5  # type: ignore[misc]


# ------------------------------------------------------------------ model: inference options

MODEL = "window = 252\nmin_obs = 126"


def test_model_inference_options_defaults_and_values(tmp_path: Path) -> None:
    m = load_config(write(tmp_path, GOOD)).model
    assert (m.se, m.hac_lags, m.fit, m.risk_free, m.risk_free_symbol) == ("classical", None, "ols", 0.0, None)
    assert m.scenarios == (-0.10, -0.05, -0.02, -0.01, 0.01, 0.02, 0.05, 0.10)
    text = GOOD.replace(
        MODEL,
        MODEL
        + '\nse = "hac"\nhac_lags = 5\nfit = "huber"\nscenarios = [-0.2, 0, 1]\nrisk_free_symbol = "^irx"',
    )
    cfg = load_config(write(tmp_path, text))
    assert (cfg.model.se, cfg.model.hac_lags, cfg.model.fit) == ("hac", 5, "huber")
    assert cfg.model.scenarios == (-0.2, 0.0, 1.0)
    assert cfg.model.risk_free_symbol == "^IRX"
    assert cfg.fetch_symbols == ("^GSPC", "AAPL", "MSFT", "BRK-B", "^IRX")
    constant = load_config(write(tmp_path, GOOD.replace(MODEL, MODEL + "\nrisk_free = 0.04")))
    assert constant.model.risk_free == 0.04
    assert constant.fetch_symbols == constant.universe.symbols


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            'se = "hc3"', r"model\.se must be one of 'classical', 'hc1' or 'hac', got 'hc3'", id="se"
        ),
        pytest.param(
            'se = "hac"\nhac_lags = -1', r"model\.hac_lags must be >= 0, got -1", id="lags-negative"
        ),
        pytest.param("hac_lags = 4", r"model\.hac_lags applies to se = 'hac' only", id="lags-without-hac"),
        pytest.param('fit = "lad"', r"model\.fit must be one of 'ols' or 'huber', got 'lad'", id="fit"),
        pytest.param("scenarios = []", r"model\.scenarios must have at least 1 item", id="no-scenarios"),
        pytest.param("scenarios = [0.1, 0.1]", r"model\.scenarios must not repeat a move", id="dup-move"),
        pytest.param("scenarios = [-1.0]", r"index moves in \(-1, 1\].*got -1\.0", id="move-minus-100%"),
        pytest.param("scenarios = [5]", r"index moves in \(-1, 1\].*got 5\.0", id="move-in-percent"),
        pytest.param("risk_free = 4", r"model\.risk_free must be <= 1\.0, got 4\.0", id="rate-in-percent"),
        pytest.param(
            'risk_free = 0.02\nrisk_free_symbol = "^IRX"',
            r"risk_free .* and model\.risk_free_symbol",
            id="both-rates",
        ),
        pytest.param(
            'risk_free_symbol = "../x"',
            r"model\.risk_free_symbol '\.\./x' is not a plausible",
            id="bad-symbol",
        ),
    ],
)
def test_model_inference_options_are_validated(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, GOOD.replace(MODEL, MODEL + "\n" + extra)))
