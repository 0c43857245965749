"""Fuzzing config files with hypothesis (issue "Hardening", part 1, property 4;
the node's edges are fuzzed in tests/nats/test_fuzz.py): random TOML documents
(and environments) fed to ``load_settings`` give Settings whose values have the
documented types, or a one-line ``ConfigError``, nothing else.

Budget: ``HERALD_FUZZ_EXAMPLES`` examples (tests/fuzzing.py). The bugs
this property found are pinned by the regression tests at the bottom.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import string
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.settings import ConfigError, Settings, load_settings

from ..fuzzing import FUZZ, REPORTS, fuzz_report, one_in  # noqa: F401 - fuzz_report: autouse

DEFAULTS = Settings()
# section -> key -> default, from the Settings dataclasses themselves.
FIELDS: dict[str, dict[str, Any]] = {
    section.name: {
        k.name: getattr(getattr(DEFAULTS, section.name), k.name)
        for k in dataclasses.fields(type(getattr(DEFAULTS, section.name)))
    }
    for section in dataclasses.fields(Settings)
}
ENV_NAMES = [f"HERALD_{s.upper()}_{k.upper()}" for s, keys in FIELDS.items() for k in keys]


def _keyfiles(root: Path) -> dict[str, str]:
    """PEM public keys: a usable P-256 one, a P-384 one (refused), and junk."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, curve in (("p256", ec.SECP256R1()), ("p384", ec.SECP384R1())):
        pem = (
            ec.generate_private_key(curve)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        (root / f"{name}.pem").write_bytes(pem)
        out[name] = str(root / f"{name}.pem")
    (root / "junk.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    out["junk"] = str(root / "junk.pem")
    return out


PATHS = [
    "/",
    "/nonexistent/key.pem",
    "/etc/hostname",
    "/dev/null",
    "\x00",
    "k" * 255,
    "k" * 256,
    "/tmp/" + "k" * 300,
    "~/key.pem",
    ".",
    "",
]


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04X}")
        else:
            out.append(f"\\U{o:08X}")
    return "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_document(doc: dict[str, Any]) -> str:
    top = [f"{_toml_str(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{_toml_str(k)}]\n" + "".join(f"{_toml_str(kk)} = {_toml_value(vv)}\n" for kk, vv in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables)


toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, -1, 1, 1023, 1024, 65535, 65536, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 300.0, 300.5, 1e-300, 1e300]),
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "*",
            "nats://127.0.0.1:4222",
            "tls://x",
            "http://x",
            "herald",
            "a.b",
            "a..b",
            "herald.live",
            "HERALD",
            "memory",
            "file",
            "per-user",
            "shared",
            "disconnect",
            "drop-oldest",
            "refuse-new",
            "close-oldest",
            "debug",
            "INFO",
            "https://app.example.com",
            "https://app.example.com/",
            "chat-*=200/3600",
            "x=0/1",
            "x=1/nan",
            "x=1/inf",
            "=1/1",
            "1",
            "true",
            "node-1.a_b",
            "nöde",
            "\u00b2",
            "a\nb",
        ]
    ),
    st.just("x=<5000 digits>/1").map(lambda _: "x=" + "9" * 5000 + "/1"),
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=6,
)


@st.composite
def config_inputs(draw: st.DrawFn, keys: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 4))):
        if not draw(one_in(10)):
            section = draw(st.sampled_from(sorted(FIELDS)))
        else:
            section = draw(st.text(max_size=8).filter(lambda s: s not in FIELDS))
        table = doc.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        for _ in range(draw(st.integers(0, 4))):
            known = FIELDS.get(section, {})
            if known and not draw(one_in(10)):
                key = draw(st.sampled_from(sorted(known)))
                default = known[key]
                typed: st.SearchStrategy[Any]
                if isinstance(default, tuple):
                    typed = st.lists(toml_scalars, max_size=3)
                elif key == "public_key":
                    typed = st.sampled_from([*PATHS, *keys.values()])
                else:
                    typed = st.just(default) | toml_scalars
                value = draw(st.one_of(typed, typed, toml_values))
            else:
                key = draw(st.text(max_size=8))
                value = draw(toml_values)
            table[key] = value
    if draw(one_in(20)):
        doc[draw(st.sampled_from(sorted(FIELDS)))] = draw(toml_scalars)  # a section that is not a table
    raw = toml_document(doc).encode()
    mangle = draw(st.sampled_from([-1] * 16 + [0, 1, 2, 3]))
    if mangle == 0:
        raw = draw(st.binary(max_size=60))
    elif mangle == 1:
        raw = b"# caf\xe9 (Latin-1)\n" + raw
    elif mangle == 2:
        raw = raw[: draw(st.integers(0, len(raw)))]  # cut anywhere
    elif mangle == 3:
        raw = b"\xef\xbb\xbf" + raw  # a BOM
    env = draw(
        st.dictionaries(
            st.one_of(
                st.sampled_from(ENV_NAMES),
                st.text(st.sampled_from(string.ascii_uppercase + "_"), max_size=12).map(lambda s: "HERALD_" + s),
            ),
            st.one_of(
                st.sampled_from(["", "0", "1", "true", "off", "-5", "1e400", "nan", "\u0661", "\u00b2", "a,b,,c"]),
                st.text(max_size=12).map(lambda s: s.replace("\x00", "")),
                st.just("<5000 digits>").map(lambda _: "9" * 5000),
            ),
            max_size=3,
        )
    )
    return raw, env


def _typed_like_defaults(s: Settings) -> None:
    for section, keys in FIELDS.items():
        for key, default in keys.items():
            value = getattr(getattr(s, section), key)
            assert type(value) is type(default), (section, key, value)
            if isinstance(value, tuple):
                assert all(isinstance(x, str) for x in value), (section, key, value)


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _keyfiles(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def config_stats() -> Any:
    h = Counter[str]()
    times: list[float] = []
    yield h, times
    if h["examples"]:
        elapsed = max(times[-1] - times[0], 1e-9)
        REPORTS["config"] = {
            "examples": h["examples"],
            "seconds": round(elapsed, 3),
            "per_second": round(h["examples"] / elapsed, 1),
        }


@pytest.mark.timeout(0)
@settings(FUZZ)
@given(data=st.data())
def test_config_files(tmp_path: Path, keyfiles: dict[str, str], config_stats: Any, data: st.DataObject) -> None:
    """Any TOML file (and HERALD_* environment) gives Settings whose values
    have the documented types, or a ConfigError of one line; nothing else."""
    stats, times = config_stats
    times.append(time.perf_counter())
    stats["examples"] += 1
    raw, env = data.draw(config_inputs(keyfiles))
    path = tmp_path / "herald.toml"
    path.write_bytes(raw)
    via_env = data.draw(st.booleans())
    try:
        if via_env:
            result = load_settings(env={**env, "HERALD_CONFIG": str(path)}, use_default_file=False)
        else:
            result = load_settings(path, env=env, use_default_file=False)
    except ConfigError as exc:
        message = str(exc)
        event("ConfigError")
        assert "\n" not in message and "\r" not in message, f"multi-line ConfigError {message!r} for {raw!r} {env!r}"
        assert message.startswith("config error: "), message
    except Exception as exc:  # anything else is what this property looks for
        raise AssertionError(f"load_settings raised {exc!r} for {raw!r} {env!r}") from exc
    else:
        event("Settings")
        _typed_like_defaults(result)
    times.append(time.perf_counter())


# --------------------------------------------------------------------------- bugs the fuzzer found
# Each was a traceback or a multi-line message before its fix.


def test_fixed_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_bytes(b"# caf\xe9\n[http]\nport = 8080\n")
    with pytest.raises(ConfigError):
        load_settings(path, env={}, use_default_file=False)


def test_fixed_config_long_public_key(tmp_path: Path) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(f'[jwt]\npublic_key = "{"k" * 300}.pem"\n')
    with pytest.raises(ConfigError, match=r"jwt\.public_key"):
        load_settings(path, env={}, use_default_file=False)


@pytest.mark.parametrize("document", ['["a\\nb"]\n', '[http]\n"a\\nb" = 1\n'])
def test_fixed_config_multiline_error(tmp_path: Path, document: str) -> None:
    path = tmp_path / "herald.toml"
    path.write_text(document)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={}, use_default_file=False)
    assert len(str(caught.value).splitlines()) == 1, str(caught.value)
