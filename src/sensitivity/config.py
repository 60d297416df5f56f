"""The run configuration: a TOML file, overridden by CLI options or flow parameters.

``load_config(path, overrides)`` reads the TOML, applies the overrides (flat names as on the
command line: ``tickers``, ``index``, ``start``, ``end``, ``source``, ``source_path``,
``window``, ``min_obs``, ``data_dir``) and validates everything once, before any work starts.
Every problem is reported as a :class:`~sensitivity.errors.ConfigError` whose message names
the key and the value.  Nothing is read or built at import time.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sensitivity.errors import ConfigError
from sensitivity.symbols import normalize_symbol, normalize_symbols

SourceKind = Literal["yahoo", "files", "sample"]

#: CLI option / flow parameter name -> (section, key) in the TOML file.
OVERRIDE_KEYS: dict[str, tuple[str, str]] = {
    "tickers": ("universe", "tickers"),
    "index": ("universe", "index"),
    "start": ("universe", "start"),
    "end": ("universe", "end"),
    "source": ("source", "kind"),
    "source_path": ("source", "path"),
    "window": ("model", "window"),
    "min_obs": ("model", "min_obs"),
    "data_dir": ("output", "data_dir"),
}


def _parse_date(value: Any) -> Any:
    """Accept a ``date`` or an ISO ``YYYY-MM-DD`` string; leave anything else to pydantic."""
    if isinstance(value, dt.datetime):
        raise ValueError("must be a date (YYYY-MM-DD), not a date and time")
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("must be a date written YYYY-MM-DD") from None
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class UniverseConfig(_Section):
    """What to fit: one index and the stocks measured against it."""

    index: str = Field("^GSPC", description="Yahoo symbol of the market index.")
    tickers: tuple[str, ...] = Field(
        description="Yahoo symbols of the stocks.", min_length=1, max_length=20_000
    )
    start: dt.date = Field(description="First price date requested (inclusive).")
    end: dt.date | None = Field(None, description="Last price date requested (inclusive); default today.")

    @field_validator("index", mode="before")
    @classmethod
    def _index(cls, v: Any) -> str:
        return normalize_symbol(v, what="universe.index")

    @field_validator("tickers", mode="before")
    @classmethod
    def _tickers(cls, v: Any) -> tuple[str, ...]:
        return tuple(normalize_symbols(v, what="universe.tickers"))

    @field_validator("start", "end", mode="before")
    @classmethod
    def _dates(cls, v: Any) -> Any:
        return _parse_date(v)

    @model_validator(mode="after")
    def _consistent(self) -> UniverseConfig:
        if self.index in self.tickers:
            raise ValueError(
                f"universe.tickers contains the index {self.index}; a stock cannot be measured "
                "against itself (remove it from the tickers or choose another index)"
            )
        if self.start > self.resolved_end:
            raise ValueError(
                f"universe.start {self.start} is after universe.end {self.resolved_end}; "
                "start must be on or before end"
            )
        return self

    @property
    def resolved_end(self) -> dt.date:
        """``end``, or today when it is not set."""
        return self.end if self.end is not None else dt.date.today()

    @property
    def symbols(self) -> tuple[str, ...]:
        """The index first, then the tickers."""
        return (self.index, *self.tickers)


class SourceConfig(_Section):
    """Where prices come from."""

    kind: SourceKind = Field("yahoo", description="yahoo (live), files (a folder) or sample (bundled).")
    path: Path | None = Field(
        None, description="For kind='files': folder with one <SYMBOL>.csv or .parquet per symbol."
    )
    concurrency: int = Field(4, ge=1, le=64, description="Symbols fetched at once.")
    timeout_s: float = Field(30.0, gt=0, le=600, description="Timeout of one request, seconds.")
    retries: int = Field(3, ge=0, le=10, description="Retries of a fetch that failed transiently.")
    retry_delay_s: float = Field(
        5.0,
        ge=0,
        le=600,
        description=(
            "Base delay of the exponential backoff between retries, seconds: retry n waits about "
            "retry_delay_s * 2**(n-1), randomised (jitter, at most 1.5 times that)."
        ),
    )
    requests_per_second: float = Field(
        2.0,
        gt=0,
        le=1000,
        description=(
            "Most requests per second to Yahoo from one process (a token bucket; bursts of one "
            "second's worth)."
        ),
    )
    overlap_days: int = Field(
        5,
        ge=1,
        le=250,
        description=(
            "Stored trading days an update fetches again and compares with the store, to detect "
            "a restated (re-adjusted) history."
        ),
    )
    repair: bool = Field(
        False, description="Ask yfinance to repair Yahoo's prices (history(repair=True)); yahoo only."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():  # Path("") would be the current folder
                raise ValueError("must not be empty (name a folder)")
            return Path(v)
        return v

    @field_validator("timeout_s", "retry_delay_s", "requests_per_second", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _needs_path(self) -> SourceConfig:
        if self.kind == "files" and self.path is None:
            raise ValueError(
                "source.path is required when source.kind is 'files' (the folder holding "
                "<SYMBOL>.csv or <SYMBOL>.parquet)"
            )
        return self


class ModelConfig(_Section):
    """The quadratic market model."""

    window: int = Field(252, ge=0, le=100_000, description="Rolling window in trading days; 0 = full sample.")
    min_obs: int = Field(126, ge=4, le=100_000, description="Fewest stock returns a fit needs.")
    se: Literal["classical", "hc1", "hac"] = Field(
        "classical",
        description=(
            "Covariance behind every standard error, interval and test: classical OLS, hc1 "
            "(White, n/(n-3) scaled) or hac (Newey-West, Bartlett weights)."
        ),
    )
    hac_lags: int | None = Field(
        None,
        ge=0,
        le=1000,
        description=(
            "Maximum lag of the HAC covariance (se = 'hac'); unset: floor(4*(n/100)**(2/9)) of "
            "each window's n_obs (Newey-West 1994)."
        ),
    )
    fit: Literal["ols", "huber"] = Field(
        "ols",
        description=(
            "Estimator of the scenarios: ols, or huber (then also a Huber fit of every rolling "
            "window in the huber_* columns; the latest window's is always computed)."
        ),
    )
    scenarios: tuple[float, ...] = Field(
        (-0.10, -0.05, -0.02, -0.01, 0.01, 0.02, 0.05, 0.10),
        min_length=1,
        max_length=50,
        description="Index moves of the scenario table, decimal fractions (-0.05 = -5%), each in (-1, 1].",
    )
    risk_free: float = Field(
        0.0,
        ge=-0.5,
        le=1.0,
        description=(
            "Constant annual risk-free rate, decimal (0.04 = 4%), subtracted from both returns "
            "before the fit, compounded daily over 252 trading days; 0 = raw returns."
        ),
    )
    risk_free_symbol: str | None = Field(
        None,
        description=(
            "Symbol of a rate series quoted in percent per year (e.g. ^IRX), fetched with the "
            "other symbols; its daily rate (1 + r/100)**(1/252) - 1 is subtracted from both returns."
        ),
    )

    @field_validator("scenarios", mode="before")
    @classmethod
    def _moves(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(float(m) if isinstance(m, int) and not isinstance(m, bool) else m for m in v)
        return v

    @field_validator("risk_free", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("risk_free_symbol", mode="before")
    @classmethod
    def _rate_symbol(cls, v: Any) -> Any:
        return None if v is None else normalize_symbol(v, what="model.risk_free_symbol")

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.window > 0 and self.min_obs > self.window:
            raise ValueError(
                f"model.min_obs must be <= model.window when the window is rolling, got "
                f"min_obs={self.min_obs} > window={self.window}"
            )
        for move in self.scenarios:
            if not -1.0 < move <= 1.0:
                raise ValueError(
                    f"model.scenarios must hold index moves in (-1, 1] as decimal fractions "
                    f"(-0.05 = -5%), got {move!r}"
                )
        if len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError(f"model.scenarios must not repeat a move, got {list(self.scenarios)!r}")
        if self.risk_free_symbol is not None and self.risk_free != 0.0:
            raise ValueError(
                f"model.risk_free ({self.risk_free!r}) and model.risk_free_symbol "
                f"({self.risk_free_symbol!r}) are exclusive; set one of them"
            )
        if self.hac_lags is not None and self.se != "hac":
            raise ValueError(f"model.hac_lags applies to se = 'hac' only, got se = {self.se!r}")
        return self


class OutputConfig(_Section):
    """Where the store and the reports live."""

    data_dir: Path = Field(Path("data"), description="Folder of the price store and the reports.")

    @field_validator("data_dir", mode="before")
    @classmethod
    def _path(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("must not be empty (name a folder)")
            return Path(v)
        return v

    @field_validator("data_dir")
    @classmethod
    def _not_a_file(cls, v: Path) -> Path:
        # Refused before any work: otherwise every symbol would fail on its own.
        if v.exists() and not v.is_dir():
            raise ValueError("must be a folder, not a file (name a new or existing folder)")
        return v


class RuntimeConfig(_Section):
    """Where the work runs."""

    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads (one process) or dask (fetches spread over Dask workers)."
    )
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786); default: a local cluster."
    )
    dask_workers: int = Field(2, ge=1, le=256, description="Worker processes of the local Dask cluster.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the batched fit runs: auto (CUDA when available), cpu or cuda."
    )
    lock_timeout_s: float = Field(
        600.0, ge=0, le=86_400, description="How long a run waits for another run's store lock, seconds."
    )
    fetch_processes: Literal["auto"] | int = Field(
        "auto",
        description=(
            "Worker processes for local fetches (files, sample) on the thread runner: auto (one "
            "per CPU up to source.concurrency, from 64 symbols), 0 (none: the task threads), or N."
        ),
    )
    fetch_head_start: bool = Field(
        True,
        description=(
            "sensitivity run: prepare the local fetches in those worker processes while the run "
            "starts up; the flow's fetch tasks commit them (nothing is written before)."
        ),
    )

    @field_validator("lock_timeout_s", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("fetch_processes", mode="before")
    @classmethod
    def _processes(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 64):
            return v
        raise ValueError('must be "auto" or a whole number from 0 to 64')


class Config(_Section):
    """The whole run configuration."""

    universe: UniverseConfig
    source: SourceConfig = SourceConfig()
    model: ModelConfig = ModelConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @property
    def fetch_symbols(self) -> tuple[str, ...]:
        """Every symbol a run fetches: the index, the tickers, then the risk-free rate symbol."""
        rate = self.model.risk_free_symbol
        symbols = self.universe.symbols
        return symbols if rate is None or rate in symbols else (*symbols, rate)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (for the manifest)."""
        return self.model_dump(mode="json")


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if not str(p).startswith("function-"))
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key {loc!r} (check the spelling; see docs/configuration.md for the keys)"
    if kind == "missing":
        return f"{loc} is required but missing"
    templates = {
        "greater_than_equal": "must be >= {ge}",
        "greater_than": "must be > {gt}",
        "less_than_equal": "must be <= {le}",
        "less_than": "must be < {lt}",
        "too_short": "must have at least {min_length} item(s)",
        "too_long": "must have at most {max_length} item(s)",
        "int_type": "must be an integer",
        "float_type": "must be a number",
        "date_type": "must be a date (YYYY-MM-DD)",
        "string_type": "must be a string",
        "literal_error": "must be one of {expected}",
        "tuple_type": "must be a list",
        "path_type": "must be a folder path",
        "model_type": "must be a table ([section] of keys)",
    }
    if kind in templates:
        what = templates[kind].format(**{k: v for k, v in ctx.items()})
    else:
        what = str(ctx.get("error") or error.get("msg", "is invalid"))
        if what.startswith("Value error, "):
            what = what[len("Value error, ") :]
        if what.startswith(("universe.", "model.", "source.", "output.", "runtime.")) or not loc:
            return what
    return f"{loc} {what}, got {value!r}" if loc else f"{what}, got {value!r}"


def _validate(raw: Mapping[str, Any], origin: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from exc
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a copy of the raw TOML dict with flat overrides placed in their sections.

    ``None`` values mean "not given" and leave the file's value alone.
    """
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for name, value in (overrides or {}).items():
        if name not in OVERRIDE_KEYS:
            raise ConfigError(f"unknown option {name!r}; valid options: {', '.join(OVERRIDE_KEYS)}")
        if value is None:
            continue
        section, key = OVERRIDE_KEYS[name]
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table, got {target!r}")
        if isinstance(value, Path):
            value = str(value)
        target[key] = value
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into a plain dict; a missing or malformed file is a ConfigError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist (pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load, override and validate a configuration.

    ``path`` None means no file: everything comes from ``overrides`` and the defaults.
    """
    raw = read_config_file(path) if path is not None else {}
    origin = f"config {str(path)!r}" if path is not None else "configuration"
    return _validate(apply_overrides(raw, overrides), origin)
