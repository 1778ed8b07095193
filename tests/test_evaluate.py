"""Line-completion evaluation: CodeXGLUE's EM/ES, decoding (stops, batching, truncation, raw mode), perf, end to end.

Expected values never come from the code under test: metrics are recomputed with an LCS written here, decoding is
checked against a rigged model whose output is known in advance and against a plain greedy loop without KV cache.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distil_codegpt.config import EvaluateConfig, TrainConfig, UserError, build_config
from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.run import run_train
from distil_codegpt.evaluate import (
    StopIds,
    complete,
    disk_mb,
    fuzz_ratio,
    latency,
    line_metrics,
    perplexity,
    post_process,
    print_evaluation,
    run_evaluate,
)
from distil_codegpt.evaluate.completion import encode_inputs
from distil_codegpt.model.families import count_params

# ---------------------------------------------------------------- an independent scorer


def lcs(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for ca in a:
        prev_diag, row[0] = 0, 0
        for j, cb in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if ca == cb else max(row[j], row[j - 1])
    return row[-1]


def ref_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ratio from its definition: 100 * 2 * LCS / total, rounded half to even, exactly."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(Fraction(200 * lcs(a, b), len(a) + len(b)))


def ref_literals(code: str) -> str:
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return re.sub(r"<(?:STR|NUM|CHAR)_LIT:(.*?)>", r"\1", code, flags=re.S)


def ref_scores(preds: list[str], gts: list[str]) -> tuple[float, float]:
    pairs = [(ref_literals(p.strip()), ref_literals(g)) for p, g in zip(preds, gts)]
    em = sum(p.split() == g.split() for p, g in pairs) / len(pairs) * 100
    return em, sum(ref_ratio(p, g) for p, g in pairs) / len(pairs)


# ---------------------------------------------------------------- metrics


def test_post_process_literals() -> None:
    assert post_process("if __name__ == '<STR_LIT:__main__>' :") == "if __name__ == '__main__' :"
    assert post_process('x = <NUM_LIT> + <NUM_LIT:1> ; c = "<STR_LIT>" + <CHAR_LIT>') == 'x = 0 + 1 ; c = "" + '
    assert post_process("<STR_LIT:a> <STR_LIT:b>") == "a b"  # non-greedy: two literals, not one


def test_fuzz_ratio_rounds_per_pair_like_fuzzywuzzy() -> None:
    assert fuzz_ratio("a", "abcdefghijklmno") == ref_ratio("a", "abcdefghijklmno") == 12  # 12.5 rounds to even
    assert fuzz_ratio("abc", "abcdefghijklm") == 38  # 37.5 -> 38
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("", "x") == 0 and fuzz_ratio("x", "") == 0
    for a, b in [("self . x", "self . y"), ("return None", "return"), ("( a , b )", "[ a , b ]"), ("kitten", "sit")]:
        assert fuzz_ratio(a, b) == ref_ratio(a, b), (a, b)


def test_line_metrics_hand_cases() -> None:
    preds = [
        "if __name__ == '__main__' :",
        "x = 0",
        'print ( "" )',
        "a  b",
        "",
        "  foo ( x )  ",
    ]
    gts = [
        "if __name__ == '<STR_LIT:__main__>' :",
        "x = <NUM_LIT>",
        'print ( "<STR_LIT>" )',
        "a b",
        "return x",
        "foo ( y )",
    ]
    m = line_metrics(preds, gts)
    em, es = ref_scores(preds, gts)
    assert m["n"] == 6
    assert m["exact_match"] == pytest.approx(em) == pytest.approx(4 / 6 * 100)  # literals and whitespace match
    assert m["edit_sim"] == pytest.approx(es)
    assert ref_ratio("a  b", "a b") == 86 and ref_ratio("", "return x") == 0
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        line_metrics(["a", "b"], ["a"])


# ---------------------------------------------------------------- a rigged model: a bigram table


def tid(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def bigram_model(tok, table: dict[int, int], default: int, n_positions: int = 64) -> GPT2LMHeadModel:
    """Emits table[last token], or `default` after any other token: a chain the test knows in advance.

    All blocks are zero, so the residual stream is the token embedding; embeddings are one-hot "classes" (0 for
    tokens outside the table) and the LM head maps each class to its successor with a large margin.
    """
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=32,
        n_layer=1,
        n_head=2,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        wte, head = model.transformer.wte.weight, model.lm_head.weight
        wte[:, 0] = 1.0
        head[default, 0] = 10.0
        for cls, (src, dst) in enumerate(table.items(), start=1):
            wte[src, 0], wte[src, cls] = 0.0, 1.0
            head[dst, cls] = 10.0
    return model.eval()


@pytest.fixture(scope="module")
def tok(tiny_data: dict):
    return load_tokenizer(tiny_data["tok"])


def test_stop_ids_from_the_vocabulary(tok) -> None:
    stops = StopIds.of(tok)
    assert stops.eol == {tok.convert_tokens_to_ids("<EOL>"), tok.convert_tokens_to_ids(" <EOL>")}
    assert tid(tok, "\n") in stops.newline and all(set(tok.decode([i])) & {"\n", "\r"} for i in stops.newline)
    assert stops.eos == tok.eos_token_id and stops.pad == tok.pad_token_id


def test_each_row_stops_at_its_own_eol(tok) -> None:
    a, b, c, d, e = (tid(tok, t) for t in (" if", " self", " return", " None", " pass"))
    eol, x = tid(tok, " <EOL>"), tid(tok, " x")
    model = bigram_model(tok, {a: b, b: c, c: eol, d: d, e: eol, x: eol}, default=x)
    inputs = ["<s> import os <EOL> if", "<s> y = None", "<s> def f ( ) : pass", "<s> z", "<s> import"]
    for batch in (1, 4, 8):
        out = complete(model, tok, inputs, batch_size=batch, max_new_tokens=5, progress=False)
        assert out == ["self return", "None None None None None", "", "x", "x"], batch
    assert complete(model, tok, ["<s> if"], beam=3, max_new_tokens=5, progress=False) == ["self return"]


def test_truncation_keeps_the_last_tokens(tok) -> None:
    a, b, d, x = (tid(tok, t) for t in (" if", " self", " None", " x"))
    model = bigram_model(tok, {a: b, b: tid(tok, " <EOL>"), d: d}, default=x, n_positions=64)
    long = "<s>" + " None" * 300 + " if"  # 302 tokens, context 64: only the tail survives
    ids = encode_inputs(tok, [long], 64 - 8)[0]
    assert len(ids) == 56 and ids[-1] == a and ids[0] == d
    assert complete(model, tok, [long], max_new_tokens=8, progress=False) == ["self"]


def test_raw_mode_stops_at_the_line_break(tok) -> None:
    text = "def f():"
    last = tok.encode(text, add_special_tokens=False)[-1]
    x, nl, y = tid(tok, "x"), tid(tok, "\n"), tid(tok, " y")
    model = bigram_model(tok, {last: x, x: nl, nl: y}, default=y)
    assert encode_inputs(tok, [text], 60)[0][0] == tok.bos_token_id  # raw input: bos in front
    assert tok.encode("<s> " + text, add_special_tokens=False)[-1] == last
    # raw: stops at the newline token; normalised: runs on past it ("x\n y y y"), the text is cut at the break
    assert complete(model, tok, [text, "<s> " + text], max_new_tokens=6, progress=False) == ["x", "x"]
    eos_model = bigram_model(tok, {last: x, x: tok.eos_token_id}, default=y)
    assert complete(eos_model, tok, [text], max_new_tokens=6, progress=False) == ["x"]


# ---------------------------------------------------------------- a trained tiny model


@pytest.fixture(scope="module")
def trained(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "model"
    values = {
        "data": str(tiny_data["data"]),
        "tokenizer": str(tiny_data["tok"]),
        "out": str(out),
        "seq_len": 64,
        "batch_size": 8,
        "max_steps": 40,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "save_every": 0,
        "tensorboard": False,
    }
    run_train(build_config(TrainConfig, values))
    return out


def greedy_reference(model: GPT2LMHeadModel, tok, text: str, max_new: int) -> str:
    """Plain greedy decoding: full forward pass per token, no cache, no padding."""
    stop = {tok.convert_tokens_to_ids("<EOL>"), tok.convert_tokens_to_ids(" <EOL>"), tok.eos_token_id}
    ids = tok.encode(text, add_special_tokens=False)[-(model.config.n_positions - max_new) :]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
    return tok.decode(new).split("\n")[0].strip()


def test_batched_equals_batch_one_and_plain_greedy(tiny_data: dict, trained: Path, tok) -> None:
    model = GPT2LMHeadModel.from_pretrained(trained).eval()
    inputs = [ex.input for ex in read_examples(tiny_data["data"] / "line_completion" / "test.json")[:8]]
    lengths = [len(ids) for ids in encode_inputs(tok, inputs, 10_000)]
    assert len(set(lengths)) > 4 and max(lengths) > 256 - 12  # mixed lengths, some truncated
    one = complete(model, tok, inputs, batch_size=1, max_new_tokens=12, progress=False)
    eight = complete(model, tok, inputs, batch_size=8, max_new_tokens=12, progress=False)
    assert eight == one
    assert one == [greedy_reference(model, tok, x, 12) for x in inputs]
    assert len(set(one)) > 1  # the model reads its context
    beam = complete(model, tok, inputs, batch_size=4, beam=2, max_new_tokens=12, progress=False)
    assert len(beam) == 8 and not any("\n" in p for p in beam)


def test_perf_numbers(tiny_data: dict, trained: Path, tok) -> None:
    model = GPT2LMHeadModel.from_pretrained(trained).eval()
    assert disk_mb(trained) == pytest.approx((trained / "model.safetensors").stat().st_size / 1e6)
    assert disk_mb("microsoft/CodeGPT-small-py") is None
    lat = latency(model, tok, ["<s> import os", "<s> def f", "<s> x ="], 3, max_new_tokens=5)
    assert 0 < lat["p50"] <= lat["p95"]
    assert latency(model, tok, ["<s> x"], 0) == {"p50": None, "p95": None}
    uniform = bigram_model(tok, {}, default=0)
    uniform.lm_head.weight.data.zero_()  # every logit 0: perplexity is the vocabulary size
    ppl = perplexity(uniform, tok, tiny_data["data"] / "test.txt", seq_len=64, max_tokens=1000)
    assert ppl["perplexity"] == pytest.approx(len(tok), rel=1e-5)
    assert ppl["tokens"] == 15 * 63 + 39  # 15 full windows of 64 and a tail of 40, each predicting all but its first


# ---------------------------------------------------------------- end to end


def eval_cfg(tiny_data: dict, model: Path, out: Path, **kw) -> EvaluateConfig:
    values = {
        "model": str(model),
        "test": str(tiny_data["data"] / "line_completion" / "test.json"),
        "out": str(out),
        "limit": 20,
        "max_new_tokens": 16,
        "latency_samples": 3,
        "batch_size": 8,
        "device": "cpu",
        **kw,
    }
    return build_config(EvaluateConfig, values)


def test_run_evaluate_end_to_end(tiny_data: dict, trained: Path, tmp_path: Path, capsys) -> None:
    cfg = eval_cfg(tiny_data, trained, tmp_path / "a", tokens=str(tiny_data["data"] / "test.txt"))
    metrics = run_evaluate(cfg)
    preds = (tmp_path / "a" / "predictions.txt").read_text(encoding="utf-8").split("\n")
    assert preds[-1] == "" and len(preds[:-1]) == 20
    gts = [ex.gt for ex in read_examples(cfg.test)[:20]]
    em, es = ref_scores(preds[:-1], gts)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    keys = "exact_match edit_sim n params size_mb disk_mb gpu_mem_mb samples_per_s latency_ms_p50 latency_ms_p95"
    for key in keys.split() + "perplexity model test beam batch_size device threads".split():
        assert key in saved, key
    assert saved["n"] == 20 and saved["exact_match"] == pytest.approx(em) and saved["edit_sim"] == pytest.approx(es)
    assert saved["gpu_mem_mb"] is None and saved["samples_per_s"] > 0 and saved["perplexity"] > 1
    assert saved["latency_ms_p50"] <= saved["latency_ms_p95"]
    model = GPT2LMHeadModel.from_pretrained(trained)
    assert saved["params"] == count_params(model) and saved["size_mb"] == count_params(model) * 4 / 1e6
    assert metrics == saved
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["stage"] == "evaluate" and run["metrics"]["edit_sim"] == saved["edit_sim"]
    print_evaluation(metrics, cfg.out)
    assert "EM" in capsys.readouterr().out

    again = run_evaluate(eval_cfg(tiny_data, trained, tmp_path / "b", batch_size=3, latency_samples=0))
    assert (tmp_path / "b" / "predictions.txt").read_text() == (tmp_path / "a" / "predictions.txt").read_text()
    assert again["perplexity"] is None and again["latency_ms_p50"] is None


def test_bad_input_is_one_clear_error(tiny_data: dict, tok, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bigram_model(tok, {}, default=0).save_pretrained(bare)
    with pytest.raises(UserError, match="has no tokenizer"):
        run_evaluate(eval_cfg(tiny_data, bare, tmp_path / "o"))
    with pytest.raises(UserError, match="no such line-completion file"):
        run_evaluate(eval_cfg(tiny_data, bare, tmp_path / "o", test=str(tmp_path / "missing.json")))


def test_context_option_uses_only_the_first_positions(tiny_data: dict, trained: Path, tok, tmp_path: Path) -> None:
    """--context N: inputs cut to N - max_new_tokens tokens, as for a model whose context were N."""
    n = 24
    metrics = run_evaluate(eval_cfg(tiny_data, trained, tmp_path / "c", context=n, latency_samples=0))
    model = GPT2LMHeadModel.from_pretrained(trained).eval()
    assert model.config.n_positions > n
    model.config.n_positions = n
    inputs = [ex.input for ex in read_examples(tiny_data["data"] / "line_completion" / "test.json")[:20]]
    expected = complete(model, tok, inputs, max_new_tokens=16, progress=False)
    assert (tmp_path / "c" / "predictions.txt").read_text().splitlines() == expected
    full = run_evaluate(eval_cfg(tiny_data, trained, tmp_path / "f", latency_samples=0))
    assert full["n"] == metrics["n"] == 20
    assert (tmp_path / "f" / "predictions.txt").read_text() != (tmp_path / "c" / "predictions.txt").read_text()
