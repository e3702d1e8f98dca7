"""csrc/option_codes.h (C++) and fastalign/ops/_options.py (Python, Triton) spell the option
codes twice; this test keeps them equal."""

import re
from pathlib import Path

from fastalign.ops import _options

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "option_codes.h"
STRUCT_RE = re.compile(
    r"struct (\w+) \{\s*enum : int64_t \{([^}]*)\};\s*"
    r"static constexpr const char\* kNames\[\] = \{([^}]*)\};\s*\};"
)


def header_options() -> dict[str, tuple[list[tuple[str, int]], list[str]]]:
    """Per struct: its (enumerator, code) pairs and its kNames, in order."""
    found = {}
    for name, enum, names in STRUCT_RE.findall(HEADER.read_text()):
        codes = [(k, int(v)) for k, v in re.findall(r"k(\w+) = (\d+)", enum)]
        found[name] = (codes, re.findall(r'"([^"]*)"', names))
    return found


def test_every_option_is_spelled_alike_in_cpp_and_python():
    found = header_options()
    assert sorted(found) == sorted(_options.CPP_NAMES), "an option lacks its C++ or Python twin"
    for struct, python_names in _options.CPP_NAMES.items():
        codes, names = found[struct]
        assert names == list(python_names), struct
        assert [code for _, code in codes] == list(range(len(python_names))), struct
        assert [k.lower() for k, _ in codes] == list(python_names), struct


def test_every_option_has_its_named_code():
    """<PREFIX>_<NAME> in _options is the index of the name, for every option and only those:
    the launchers and the Triton kernels compare against these names, never against numbers."""
    named = {k for k in vars(_options) if k.isupper() and isinstance(getattr(_options, k), int)}
    expected = set()
    for struct, names in _options.CPP_NAMES.items():
        for code, name in enumerate(names):
            key = f"{_options.CODE_PREFIXES[struct]}_{name.upper()}"
            assert getattr(_options, key) == code, key
            expected.add(key)
    assert named == expected
