"""CodeXGLUE py150 normalisation: golden cases, version agreement, and the inverse."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from distil_codegpt.data.denormalize import denormalize
from distil_codegpt.data.normalize import NoCodeError, NormalizeError, load_literals, normalize_code

SRC = Path(__file__).resolve().parents[1] / "src"
LIT = load_literals()

GOLDEN = {
    # strings: prefixes, kept and not-kept bodies
    "prefixes": (
        "x = r'a\\d' + b\"b\" + b'zzz' + f'c' + rb'd' + Rb\"e\" + u'x'\n",
        "<s> x = r'<STR_LIT>' + b\"<STR_LIT:b>\" + b'<STR_LIT>' + f'<STR_LIT:c>' + rb'<STR_LIT:d>' + "
        "Rb\"<STR_LIT:e>\" + u'<STR_LIT:x>' </s>",
    ),
    "triple_quotes": (
        '\'\'\'doc string\'\'\'\nv = """name"""\nw = """a\n   b"""\n',
        '<s> \'\'\'<STR_LIT>\'\'\' <EOL> v = """<STR_LIT:name>""" <EOL> w = """<STR_LIT>""" </s>',
    ),
    "spaces_and_commas": (
        "a = ', '.join(b) + ' ' + ',' + 'a b' + '  '\n",
        "<s> a = '<STR_LIT:U+002CU+0020>' . join ( b ) + '<STR_LIT:U+0020>' + '<STR_LIT:U+002C>' + '<STR_LIT>'"
        " + '<STR_LIT:U+0020>' </s>",
    ),
    "main_guard": (
        'if __name__ == "__main__":\n    main()\n',
        '<s> if __name__ == "<STR_LIT:__main__>" : <EOL> main ( ) </s>',
    ),
    "fstrings": (
        'a = f"{x[\'a\']}" + f\'{b!r:>{w}}\' + f"name" + f"{{x}}" + f"{f\'{1}\'}"\nc = f"""{a}\n{b}"""\n',
        '<s> a = f"<STR_LIT>" + f\'<STR_LIT>\' + f"<STR_LIT:name>" + f"<STR_LIT>" + f"<STR_LIT>" <EOL>'
        ' c = f"""<STR_LIT>""" </s>',
    ),
    "fstring_starts_line": (
        "def g(y):\n    f'y:{yield y*2}'\n    f'{yield}'\n",
        "<s> def g ( y ) : <EOL> f'<STR_LIT>' <EOL> f'<STR_LIT>' </s>",
    ),
    "numbers": (
        "n = [0, 1.0, 3.14, 0xff, 1e5, 1j, 100, 1_000, -1, 255]\n",
        "<s> n = [ <NUM_LIT:0> , <NUM_LIT:1.0> , <NUM_LIT> , <NUM_LIT> , <NUM_LIT> , <NUM_LIT> , <NUM_LIT:100> ,"
        " <NUM_LIT> , - <NUM_LIT:1> , <NUM_LIT:255> ] </s>",
    ),
    "comments_and_blank_lines": (
        "# header\n\n\nx = 1  # trailing\n# full line\n\n\n\ny = 2\n\n# end\n",
        "<s> x = <NUM_LIT:1> <EOL> y = <NUM_LIT:2> </s>",
    ),
    "continuations": (
        "x = 1 + \\\n    2\nf(a,\n  b)\n",
        "<s> x = <NUM_LIT:1> + <NUM_LIT:2> <EOL> f ( a , <EOL> b ) </s>",
    ),
    "decorators": (
        "@dec\n@mod.deco(1)\ndef f():\n    pass\n",
        "<s> @ dec <EOL> @ mod . deco ( <NUM_LIT:1> ) <EOL> def f ( ) : <EOL> pass </s>",
    ),
    "nested_indentation": (
        "class A:\n    def f(self):\n        if x:\n            return 1\n        return 2\n",
        "<s> class A : <EOL> def f ( self ) : <EOL> if x : <EOL> return <NUM_LIT:1> <EOL> return <NUM_LIT:2> </s>",
    ),
    "unicode_identifiers": ("café = naïve + 名前\n", "<s> café = naïve + 名前 </s>"),
    "bom_crlf_no_final_newline": ("\ufeffx = 1\r\ny = 2", "<s> x = <NUM_LIT:1> <EOL> y = <NUM_LIT:2> </s>"),
    "walrus": (
        "if (n := len(a)) > 10:\n    pass\n",
        "<s> if ( n := len ( a ) ) > <NUM_LIT:10> : <EOL> pass </s>",
    ),
    "python2_print": ("print 'hi'\n", "<s> print '<STR_LIT>' </s>"),
}

BAD = {
    "unterminated_string": "s = 'abc\n",
    "leading_zero_octal": "x = 0777\n",
    "long_suffix": "x = 1L\n",
    "dollar": "a = $\n",
    "backticks": "a = `x`\n",
    "diamond": "a <> b\n",
    "euro_name": "€ = 2\n",
    "inconsistent_tabs": "def f():\n\tif x:\n        pass\n",
    "unclosed_bracket": "x = (1,\n",
    "bad_dedent": "if x:\n    pass\n  y\n",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name: str) -> None:
    src, expected = GOLDEN[name]
    assert " ".join(normalize_code(src, LIT)) == expected


@pytest.mark.parametrize("name", sorted(BAD))
def test_rejected(name: str) -> None:
    with pytest.raises(NormalizeError):
        normalize_code(BAD[name], LIT)


@pytest.mark.parametrize("src", ["", "\n\n", "# only a comment\n", "   \n# a\n"])
def test_no_code(src: str) -> None:
    with pytest.raises(NoCodeError):
        normalize_code(src, LIT)


def test_custom_literal_list(tmp_path: Path) -> None:
    p = tmp_path / "lits.json"
    p.write_text(json.dumps({"str": ["hello U+0020 world", "helloU+0020world"], "num": ["42"]}))
    lits = load_literals(p)
    assert " ".join(normalize_code("x = 'hello world' + 42 + 0\n", lits)) == (
        "<s> x = '<STR_LIT:helloU+0020world>' + <NUM_LIT:42> + <NUM_LIT> </s>"
    )
    assert lits.tokens()[:2] == ["<STR_LIT:hello U+0020 world>", "<STR_LIT:helloU+0020world>"]


def test_default_literals_match_codexglue_list() -> None:
    assert len(LIT.str) == 200 and len(LIT.num) == 30
    assert {"__main__", "U+0020", "U+002CU+0020", "\\n"} <= LIT.str
    assert {"0", "1.0", "255"} <= LIT.num


# ---------------------------------------------------------------- other interpreters


def _interpreters() -> list[str]:
    """Working interpreters other than this one (3.11+), e.g. from pyenv; shims that fail are ignored."""
    names = {f"python3.{m}" for m in range(11, 16)}
    found = [p for n in names if (p := _which(n))]
    found += glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[1-9]*/bin/python3"))
    out, seen = [], {sys.version_info[:2]}
    for exe in sorted(set(found)):
        try:
            v = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if v.returncode == 0 and v.stdout.split():
            ver = tuple(map(int, v.stdout.split()))
            if ver >= (3, 11) and ver not in seen:
                seen.add(ver)
                out.append(exe)
    return out


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


_CHILD = """
import json, sys
from distil_codegpt.data.normalize import normalize_code, load_literals, NormalizeError
lits = load_literals()
out = []
for src in json.load(sys.stdin):
    try:
        out.append(" ".join(normalize_code(src, lits)))
    except NormalizeError:
        out.append(None)
print(json.dumps(out))
"""


def _normalize_elsewhere(exe: str, sources: list[str]) -> list[str | None]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([exe, "-c", _CHILD], input=json.dumps(sources), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _stdlib_sample(n: int = 40) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["string.py", "textwrap.py", "dataclasses.py", "argparse.py", "enum.py", "typing.py", "ast.py"]
    files = [root / n for n in names] + sorted(root.glob("json/*.py")) + sorted(root.glob("email/*.py"))
    return [f.read_text(encoding="utf-8") for f in files[:n] if f.is_file()]


INTERPRETERS = _interpreters()


@pytest.mark.skipif(not INTERPRETERS, reason="no other Python 3.11+ interpreter on this machine")
@pytest.mark.parametrize("exe", INTERPRETERS)
def test_versions_agree(exe: str) -> None:
    sources = [src for src, _ in GOLDEN.values()] + list(BAD.values()) + _stdlib_sample()
    here = []
    for src in sources:
        try:
            here.append(" ".join(normalize_code(src, LIT)))
        except NormalizeError:
            here.append(None)
    assert _normalize_elsewhere(exe, sources) == here


# ---------------------------------------------------------------- inverse


def test_denormalize_golden() -> None:
    toks = (
        "<s> if x : <EOL> return f ( a , b = - <NUM_LIT:1> ) [ <NUM_LIT:0> : <NUM_LIT:2> ] <EOL> else : <EOL>"
        " y = '<STR_LIT:U+002CU+0020>' . join ( z ) + \"<STR_LIT>\" <EOL> print ( <NUM_LIT> ) </s>"
    )
    d = denormalize(toks)
    assert d.code == "if x:\n    return f(a, b=-1)[0:2]\nelse:\n    y = ', '.join(z) + \"\"\n    print(0)\n"
    assert d.unresolved == ['"<STR_LIT>"', "<NUM_LIT>"]


def test_denormalize_class_methods() -> None:
    src = "class A(B):\n    def f(self, *args, **kw):\n        return -x ** 2\n    def g(self):\n        pass\n"
    d = denormalize(normalize_code(src, LIT))
    assert (
        d.code == "class A(B):\n    def f(self, *args, **kw):\n        return -x ** 2\n    def g(self):\n        pass\n"
    )


def _placeholders(tokens: list[str]) -> list[str]:
    """What `<STR_LIT>`/`<NUM_LIT>` placeholders normalise to after a round trip."""
    return [t.replace("<NUM_LIT>", "<NUM_LIT:0>") if t == "<NUM_LIT>" else t for t in tokens]


def test_denormalize_round_trip_on_stdlib() -> None:
    for src in _stdlib_sample(25):
        toks = normalize_code(src, LIT)
        again = normalize_code(denormalize(toks).code, LIT)
        assert again == _placeholders(toks)
