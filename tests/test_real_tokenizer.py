"""A real teacher's own tokenizer end to end (as SmolLM2's: `<|endoftext|>` between documents, chat tokens as bos/eos,
byte-level BPE whose tokens may hold a line break in the middle): raw shards, prompts, line-end stopping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from distil_codegpt.config import CorpusConfig, EvaluateConfig, build_config
from distil_codegpt.data.corpus import build_corpus
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer, raw_framing, tokenizer_fingerprint
from distil_codegpt.evaluate.completion import StopIds, encode_inputs, finish
from distil_codegpt.model.presets import preset_config

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    def g(self):\n        return [1, 2]\n"


def smollm_like_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """No pre-split on newlines, so merges such as `):\\n` and `\\n\\n    ` exist, as in SmolLM2's vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CODE] * 50, trainer)
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
