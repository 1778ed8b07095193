import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from distil_codegpt.config import ConfigError, TokenizerConfig, UserError, build_config
from distil_codegpt.data.formats import encode_document
from distil_codegpt.data.normalize import load_literals
from distil_codegpt.data.tokenizer import (
    MARKER_TOKENS,
    SPECIAL_TOKENS,
    encode_documents,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_meta,
    train_tokenizer,
)

VOCAB = 960
RAW_VOCAB = 520  # the smallest the config allows

# Normalised documents as the corpus stage writes them (CodeXGLUE py150 format).
DOCS = [
    '<s> if __name__ == "<STR_LIT:__main__>" : <EOL> main ( ) </s>',
    "<s> import os <EOL> import sys <EOL> def main ( argv ) : <EOL> return <NUM_LIT:0> </s>",
    "<s> def add ( a , b ) : <EOL> return a + b <EOL> print ( add ( <NUM_LIT:1> , <NUM_LIT:2> ) ) </s>",
    "<s> SEP = '<STR_LIT:U+002CU+0020>' <EOL> print ( SEP . join ( names ) ) </s>",
    "<s> π = <NUM_LIT> <EOL> größe = π * r ** <NUM_LIT:2> <EOL> naïve_wert = größe / <NUM_LIT:2> </s>",
    "<s> class Point : <EOL> def __init__ ( self , x , y ) : <EOL> self . x = x <EOL> self . y = y </s>",
    '<s> data = { "<STR_LIT:name>" : name , "<STR_LIT:id>" : <NUM_LIT:1> } <EOL> return data </s>',
    "<s> for i in range ( <NUM_LIT:10> ) : <EOL> if i % <NUM_LIT:2> == <NUM_LIT:0> : <EOL> continue </s>",
    '<s> with open ( path , "<STR_LIT:w>" ) as f : <EOL> f . write ( "<STR_LIT>" ) </s>',
    "<s> try : <EOL> import json <EOL> except ImportError : <EOL> json = None </s>",
    "<s> x = [ i * i for i in range ( n ) if i ] <EOL> y = sorted ( x , reverse = True ) </s>",
    '<s> logger . info ( "<STR_LIT>" , count ) <EOL> raise ValueError ( f"<STR_LIT>" ) </s>',
    "<s> @ property <EOL> def value ( self ) : <EOL> return self . _value </s>",
    "<s> async def fetch ( url ) : <EOL> async with session . get ( url ) as r : <EOL> return await r . json ( ) </s>",
    "<s> while True : <EOL> line = f . readline ( ) <EOL> if not line : <EOL> break </s>",
    "<s> 数据 = { } <EOL> 数据 [ '<STR_LIT:key>' ] = <NUM_LIT:100> <EOL> print ( 数据 ) </s>",
    "<s> lambda_ = lambda x : x + <NUM_LIT:1> <EOL> assert lambda_ ( <NUM_LIT:1> ) == <NUM_LIT:2> </s>",
    "<s> return '<STR_LIT:\\n>' . join ( lines ) + '<STR_LIT>' </s>",
    "<s> parser . add_argument ( '<STR_LIT>' , type = int , default = <NUM_LIT:0> ) </s>",
    "<s> del self . cache [ key ] <EOL> self . size -= <NUM_LIT:1> <EOL> return None </s>",
]

# Raw documents: source text, with the characters a normalised corpus never has.
RAW_DOCS = [
    'def f():\n\treturn "a\\tb"\r\n',
    "# café ☕ and 🐍\nx = 'naïve'  # two  spaces\n\n\n",
    "s = '<s> and </s> and <EOL> are text here'\r\nprint(s)",
    "class 数据:\n    pass\n",
    "   leading spaces\ttabs\t\ttrailing   ",
    "emoji = '👩\u200d💻🏳️\u200d🌈'\nvalue = 1_000_000\n",
    *DOCS,  # normalised lines are just text to a raw tokenizer
]


def write_corpus(path: Path, docs: list[str], fmt: str = "codexglue", literals: str = "") -> Path:
    """A corpus directory as the corpus stage writes it, from documents given in full."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "corpus.json").write_text(json.dumps({"config": {"format": fmt, "literals": literals}}))
    n = len(docs)
    for split, part in (("train", docs), ("dev", docs[: n // 2]), ("test", docs[n // 2 :])):
        (path / f"{split}.txt").write_text("".join(encode_document(d, fmt) + "\n" for d in part), encoding="utf-8")
    return path


def train(data: Path, out: Path, vocab_size: int = VOCAB, **kw) -> dict:
    cfg = build_config(TokenizerConfig, {"data": str(data), "out": str(out), "vocab_size": vocab_size, **kw})
    return train_tokenizer(cfg)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tok")
    train(write_corpus(base / "data", DOCS), base / "tok", min_frequency=1)
    return base / "tok"


@pytest.fixture(scope="module")
def raw_tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("rawtok")
    train(write_corpus(base / "data", RAW_DOCS, "raw"), base / "tok", vocab_size=RAW_VOCAB, min_frequency=1)
    return base / "tok"


def test_vocabulary_has_exact_size_and_fixed_special_ids(tok_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dir)  # no code of ours
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.is_fast and len(tok) == VOCAB
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS
    meta = tokenizer_meta(tok_dir)
    assert meta["vocab_size"] == VOCAB and meta["n_docs"] == len(DOCS) and meta["format"] == "codexglue"
    assert meta["fingerprint"] == tokenizer_fingerprint(tok_dir)


def test_every_special_and_literal_token_is_one_id(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    tokens = SPECIAL_TOKENS + MARKER_TOKENS + load_literals(None).tokens()
    assert len(tokens) == 238
    for t in tokens:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, t
        assert tok.decode(ids, skip_special_tokens=False) == t
        # Also inside text, and whatever the neighbours are.
        assert ids[0] in tok.encode(f"x{t}y = '{t}' {t}", add_special_tokens=False)


def test_a_space_before_an_added_token_costs_no_token(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    for t in MARKER_TOKENS + load_literals(None).tokens():
        (spaced,) = tok.encode(" " + t, add_special_tokens=False)
        (bare,) = tok.encode(t, add_special_tokens=False)
        assert spaced != bare and tok.decode([spaced]) == " " + t
    ids = tok.encode("x <EOL> y <NUM_LIT:0>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[1:3] == [" <EOL>", "Ġy"]
    assert len(ids) == 4


def test_literal_tokens_are_not_special(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(DOCS[0], add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == ' if __name__ == "<STR_LIT:__main__>" : <EOL> main ( ) '
    assert tok.encode("x", add_special_tokens=True) == tok.encode("x", add_special_tokens=False)


def test_normalised_documents_round_trip_exactly(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    for doc in DOCS:
        ids = tok.encode(doc, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == doc
        assert tok.unk_token_id not in ids


def test_encode_documents_matches_encode_and_adds_missing_boundaries(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert encode_documents(tok, DOCS, "codexglue") == [tok.encode(d, add_special_tokens=False) for d in DOCS]
    bare = "def f ( ) : <EOL> pass"  # a py150 line without <s> ... </s>, as CodeXGLUE's loader accepts
    (ids,) = encode_documents(tok, [bare], "codexglue")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids[1:-1] == tok.encode(bare, add_special_tokens=False)


def test_raw_documents_round_trip_exactly(raw_tok_dir: Path) -> None:
    tok = load_tokenizer(raw_tok_dir)
    assert len(tok) == RAW_VOCAB and tokenizer_meta(raw_tok_dir)["n_added_tokens"] == 0
    encoded = encode_documents(tok, RAW_DOCS, "raw")
    for doc, ids in zip(RAW_DOCS, encoded):
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.bos_token_id not in ids[1:-1] and tok.eos_token_id not in ids[1:-1]  # `<s>` in source is text
        assert tok.decode(ids[1:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False) == doc
        assert tok.decode(tok.encode(doc, add_special_tokens=False)) == doc


def test_literal_list_comes_from_the_flag_then_the_corpus(tmp_path: Path) -> None:
    lits = tmp_path / "lits.json"
    lits.write_text(json.dumps({"str": ["__main__", "key"], "num": ["0"]}))
    data = write_corpus(tmp_path / "data", DOCS, literals=str(lits))
    train(data, tmp_path / "from_corpus", vocab_size=530, min_frequency=1)
    tok = load_tokenizer(tmp_path / "from_corpus")
    assert tokenizer_meta(tmp_path / "from_corpus")["n_added_tokens"] == 2 * (4 + 3)  # each bare and spaced
    assert len(tok.encode("<NUM_LIT:0>", add_special_tokens=False)) == 1
    assert len(tok.encode("<NUM_LIT:1>", add_special_tokens=False)) > 1
    flag = tmp_path / "flag.json"
    flag.write_text(json.dumps({"str": [], "num": ["1"]}))
    train(data, tmp_path / "from_flag", vocab_size=530, min_frequency=1, literals=str(flag))
    tok = load_tokenizer(tmp_path / "from_flag")
    assert len(tok.encode("<NUM_LIT:1>", add_special_tokens=False)) == 1
    assert len(tok.encode("<NUM_LIT:0>", add_special_tokens=False)) > 1
    for doc in DOCS:
        assert tok.decode(tok.encode(doc, add_special_tokens=False)) == doc


def test_fingerprint_follows_content(tmp_path: Path, tok_dir: Path) -> None:
    data = write_corpus(tmp_path / "data", DOCS)
    train(data, tmp_path / "same", min_frequency=1)
    train(data, tmp_path / "other", vocab_size=VOCAB - 10, min_frequency=1)
    assert tokenizer_fingerprint(tmp_path / "same") == tokenizer_fingerprint(tok_dir)
    assert tokenizer_fingerprint(tmp_path / "other") != tokenizer_fingerprint(tok_dir)


def test_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", DOCS)
    with pytest.raises(UserError, match="no corpus.json; build the corpus"):
        train(tmp_path / "nowhere", tmp_path / "tok")
    (data / "train.txt").unlink()
    with pytest.raises(UserError, match="train.txt: missing; build the corpus"):
        train(data, tmp_path / "tok")
    (data / "train.txt").write_text("\n\n")
    with pytest.raises(UserError, match="train.txt: no documents"):
        train(data, tmp_path / "tok")
    write_corpus(data, DOCS)
    with pytest.raises(UserError, match="yields only .* lower --vocab_size"):
        train(data, tmp_path / "tok", vocab_size=20_000)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"str": [f"s{i}" for i in range(400)], "num": []}))
    with pytest.raises(ConfigError, match="vocab_size: 960 cannot hold .*; use at least 1068"):
        train(data, tmp_path / "tok", literals=str(big))
    with pytest.raises(ConfigError, match="literals: cannot read"):
        train(data, tmp_path / "tok", literals=str(tmp_path / "missing.json"))


def test_load_tokenizer_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope is not a directory; train one with `distil-codegpt tokenizer"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no loadable tokenizer .*distil-codegpt tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(UserError, match="has no tokenizer.json"):
        tokenizer_fingerprint(tmp_path / "empty")
