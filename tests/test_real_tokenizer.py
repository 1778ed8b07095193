"""A real teacher's own tokenizer end to end (as SmolLM2's: `<|endoftext|>` between documents, chat tokens as bos/eos,
byte-level BPE whose tokens may hold a line break in the middle): raw shards, prompts, line-end stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from distil_codegpt.config import CorpusConfig, EvaluateConfig, build_config
from distil_codegpt.data.corpus import build_corpus
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer, raw_framing, tokenizer_fingerprint
from distil_codegpt.evaluate.completion import StopIds, encode_inputs, finish, is_raw
from distil_codegpt.model.presets import preset_config

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    def g(self):\n        return [1, 2]\n"


def smollm_like_tokenizer(path: Path, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """No pre-split on newlines, so merges such as `):\\n` and `\\n\\n    ` exist, as in SmolLM2's vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts or [CODE] * 50, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.pad_token = fast.eos_token
    fast.save_pretrained(path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def teacher_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smol-tok")
    smollm_like_tokenizer(path)
    return path


def test_documents_are_framed_by_the_separator_not_chat_tokens(teacher_tok):
    tok = load_tokenizer(teacher_tok)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    assert raw_framing(tok) == ([sep], [])
    ids = encode_inputs(tok, [CODE], 1000)[0]
    assert ids[0] == sep and tok.bos_token_id not in ids
    assert tok.decode(ids[1:]) == CODE


def test_raw_shards_use_the_teachers_tokenizer(teacher_tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(f"X{i} = {i}\n" + CODE)
    data = tmp_path / "data"
    build_corpus(build_config(CorpusConfig, {"out": str(data), "src": [str(src)], "format": "raw", "workers": 1}))
    shard_dir = ensure_shards(data, teacher_tok, ("train",))
    shard = TokenShard(shard_dir, "train")
    assert shard.header["tokenizer_fingerprint"] == tokenizer_fingerprint(teacher_tok)
    tok = load_tokenizer(teacher_tok)
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    tokens = np.asarray(shard.tokens)
    starts = np.asarray(shard.doc_starts())
    assert (tokens[starts] == sep).all() and (tokens == sep).sum() == shard.n_docs
    assert tok.bos_token_id not in tokens and tok.eos_token_id not in tokens


def test_line_ends_inside_a_token(teacher_tok):
    tok = load_tokenizer(teacher_tok)
    stops = StopIds.of(tok)
    ids = tok.encode("x):\n\n    return y\n", add_special_tokens=False)
    assert any("\n" in tok.decode([i]) and tok.decode([i]) != "\n" for i in ids)  # a merged token holds the break
    assert finish(tok, ids, True, stops) == "x):"
    inner = tok.encode("):\n    return", add_special_tokens=False)
    assert finish(tok, inner, True, stops) == "):"
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    assert (
        sep in stops.for_mode(True)
        and finish(tok, [*tok.encode("a + b", add_special_tokens=False), sep], True, stops) == "a + b"
    )


def test_evaluate_a_llama_teacher_with_its_own_tokenizer(teacher_tok, tmp_path):
    from distil_codegpt.data.line_completion import LineExample, write_examples
    from distil_codegpt.evaluate.metrics import line_metrics
    from distil_codegpt.evaluate.run import run_evaluate

    tok = load_tokenizer(teacher_tok)
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama", len(tok)))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    examples = [LineExample(CODE[:k], CODE[k:].split("\n", 1)[0]) for k in (4, 15, 40, 60)]
    examples = [e for e in examples if e.gt.strip()]
    write_examples(tmp_path / "test.json", examples)
    cfg = build_config(
        EvaluateConfig,
        {
            "model": str(tmp_path / "m"),
            "test": str(tmp_path / "test.json"),
            "out": str(tmp_path / "eval"),
            "latency_samples": 0,
            "max_new_tokens": 8,
        },
    )
    metrics = run_evaluate(cfg)
    preds = (tmp_path / "eval" / "predictions.txt").read_text().split("\n")[: len(examples)]
    ref = line_metrics(preds, [e.gt for e in examples])
    assert metrics["edit_sim"] == pytest.approx(ref["edit_sim"]) and metrics["n"] == len(examples)


def test_line_end_ids_are_the_bare_newlines_and_the_ends(teacher_tok):
    tok = load_tokenizer(teacher_tok)
    stops = StopIds.of(tok)
    texts = {i: tok.decode([i]) for i in range(len(tok))}
    carrying = [i for i in stops.newline if texts[i].split("\n", 1)[0].strip()]  # `):\n`: code before the break
    bare = [i for i in stops.newline if not texts[i].split("\n", 1)[0].strip()]  # `\n`, `\n\n    `
    assert carrying and len(bare) >= 3
    ends = set(stops.line_end(True))
    assert set(bare) <= ends and not set(carrying) & ends
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")} <= ends
    assert ends - set(bare) == set(stops.ends) | {tok.eos_token_id}


def line_end_one_at_a_time(model, tok, text: str, max_new: int, rule: str) -> str:
    """The line-end rule written out: full forward passes, no cache, the probabilities summed in Python."""
    stops, raw = StopIds.of(tok), is_raw(text)
    ids = encode_inputs(tok, [text], model.config.max_position_embeddings - max_new)[0]
    ends, stop = set(stops.line_end(raw)), set(stops.for_mode(raw))
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            p = model(input_ids=torch.tensor([ids + new])).logits[0, -1].softmax(-1).tolist()
            p_end = sum(p[i] for i in ends if i < len(p))
            best_other = max((i for i in range(len(p)) if i not in ends), key=lambda i: p[i])
            bar = 0.5 if rule == "majority" else p[best_other]
            nxt = max(ends, key=lambda i: p[i]) if p_end > bar else max(range(len(p)), key=lambda i: p[i])
            new.append(nxt)
            if nxt in stop:
                break
    return finish(tok, new, raw, stops)


STEPS = 150


def stdlib_code() -> tuple[str, str]:
    """(train, held out): real Python of varied shape, from this interpreter's own library."""
    import argparse, textwrap, string, ast, json.decoder, shlex  # noqa: E401, I001

    texts = [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string, ast, json.decoder, argparse)]
    return "".join(texts), Path(shlex.__file__).read_text(encoding="utf-8")


def test_line_end_rules_equal_the_rules_written_out(tmp_path):
    """A tiny Llama trained briefly on code whose line breaks the tokenizer merges with the next indentation: greedy
    by the summed line-end probability (batched, and through the serving engine) equals each rule written out."""
    from distil_codegpt.engines.base import TorchEngine
    from distil_codegpt.evaluate.completion import complete, engine_complete

    code, held_out = stdlib_code()
    tok = smollm_like_tokenizer(tmp_path / "tok", [code])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama", len(tok)))
    stream = torch.tensor(tok.encode(code, add_special_tokens=False))
    windows = stream[: len(stream) // 32 * 32].view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        batch = windows[torch.randint(len(windows), (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    rng = np.random.default_rng(0)
    cuts = sorted(rng.choice(np.arange(200, len(held_out)), 40, replace=False).tolist())
    inputs = [held_out[:k] for k in cuts if held_out[k - 1] != "\n"]
    max_new = 10
    plain = complete(model, tok, inputs, batch_size=8, max_new_tokens=max_new, progress=False)
    engine = TorchEngine(model, tok, Path("."), cache_slots=1)
    got = {}
    for rule in ("mass", "majority"):
        expected = [line_end_one_at_a_time(model, tok, x, max_new, rule) for x in inputs]
        for batch in (1, 8):
            kw = {"batch_size": batch, "max_new_tokens": max_new, "progress": False, "line_end": rule}
            assert complete(model, tok, inputs, **kw) == expected, (rule, batch)
        assert engine_complete(engine, tok, inputs, max_new, progress=False, line_end=rule) == expected, rule
        got[rule] = expected
    # the rules only ever end a line sooner, "mass" soonest: each completion is a prefix of the next
    for short, long in ((got["mass"], got["majority"]), (got["majority"], plain)):
        assert all(b.startswith(a) for a, b in zip(short, long))
    assert sum(len(a) < len(b) for a, b in zip(got["mass"], got["majority"])) >= 3
    assert sum(len(m) == len(p) > 0 for m, p in zip(got["mass"], plain)) >= 3
