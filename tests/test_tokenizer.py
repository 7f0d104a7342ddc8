"""Tokenizers: llama2.c tokenizer.bin and GGUF vocabularies converted to SentencePiece encode
as the originals (and as an independent llama2.c-style BPE encoder written here); GGUF
byte-level BPE vocabularies and tokenizer.json (Llama 3) through `tokenizers`; chat prompts.

Tiny tokenizers are trained in the test (sentencepiece, tokenizers); the real vocabularies
of ../shared are checked when present.
"""
import io
import json
import struct
import sys

import numpy as np
import pytest

from dllm.config import ModelConfig
from dllm.convert import convert
from dllm.errors import DllmError
from dllm.modelfile import ModelFile
from dllm.tokenizer import (TextStream, Tokenizer, chat_prompt_ids, chat_stop_ids,
                            read_tokenizer_file)

from conftest import SHARED, random_weights
from test_convert import write_gguf, write_hf, write_llama2c

spm = pytest.importorskip("sentencepiece")
TEXTS = ["Once upon a time", "I believe the meaning of life is", "", " leading space",
         "two  spaces\tand a tab\n\nnew paragraph", "Ünïcödé 日本 🙂 bytes", "Lily's 123 x"]
WORDS = ("once upon a time there was little girl named lily she loved to play outside in the "
         "park with her friends one day saw big red ball and wanted it but was too high").split()
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, rng.integers(4, 14))).capitalize() + "." for _ in range(n)]
    return lines + ["Lily's mom said, \"Let's go!\" Ben: 42 apples; café."] * 20


@pytest.fixture(scope="module")
def sp_model():
    """A SentencePiece BPE model like Llama's (byte fallback, identity normalizer)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, model_type="bpe", vocab_size=320,
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2)
    return out.getvalue()


def llama2c_export(sp):
    """tokenizer.bin as karpathy/llama2.c tokenizer.py writes it."""
    tokens, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        tokens.append(piece.replace("\u2581", " ").encode())
        scores.append(sp.get_score(i))
    out = [struct.pack("<i", max(len(t) for t in tokens))]
    out += [struct.pack("<fi", s, len(t)) + t for t, s in zip(tokens, scores)]
    return b"".join(out)


def read_llama2c_vocab(blob):
    (offset, pieces, scores) = (4, [], [])
    while offset < len(blob):
        score, n = struct.unpack_from("<fi", blob, offset)
        pieces.append(blob[offset + 8:offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    return pieces, scores


def llama2c_encode(pieces, scores, text):
    """llama2.c run.c's encode(), in Python: BOS, a dummy-prefix space, one token per UTF-8
    character (byte fallback: byte + 3), then merge the best-scoring adjacent pair while any
    pair is in the vocabulary."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        text = " " + text
    for ch in text:
        b = ch.encode()
        tokens += [lookup[b]] if b in lookup else [byte + 3 for byte in b]
    while True:
        best = None
        for i in range(1, len(tokens) - 1):     # BOS ("\n<s>\n") never merges
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if merged is not None and (best is None or scores[merged] > best[0]):
                best = (scores[merged], i, merged)
        if best is None:
            return tokens
        _, i, merged = best
        tokens[i:i + 2] = [merged]


def check_same_encoding(ours, original, texts=TEXTS):
    for text in texts:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text)) == original.decode(original.encode(text))


# --- llama2.c tokenizer.bin ------------------------------------------------------------------

def test_tokenizer_bin_converts_to_an_equivalent_sentencepiece_model(sp_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    (tmp_path / "tokenizer.bin").write_bytes(llama2c_export(sp))
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    ours = Tokenizer.from_file(tmp_path / "tokenizer.bin")
    original = Tokenizer.from_file(tmp_path / "tokenizer.model")
    assert (ours.kind, ours.vocab_size, ours.bos_id, ours.eos_id) == ("sentencepiece", 320, 1, 2)
    check_same_encoding(ours, original, TEXTS + corpus(40, seed=1))
    pieces, scores = read_llama2c_vocab(llama2c_export(sp))
    for text in TEXTS + corpus(40, seed=2):
        assert ours.encode(text) == llama2c_encode(pieces, scores, text), text


@pytest.mark.parametrize("name", ["tinystories-tokenizer", "llama2-tokenizer"])
def test_real_tokenizer_bin_matches_its_tokenizer_model(name):
    folder = SHARED / "models" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (../shared holds the real tokenizers)")
    ours = Tokenizer.from_file(folder / "tokenizer.bin")
    original = Tokenizer.from_file(folder / "tokenizer.model")
    valid = (SHARED / "models" / "tinystories-tokenizer" / "valid.txt").read_text()
    check_same_encoding(ours, original, TEXTS + [valid[:5000]])
    if name == "llama2-tokenizer":      # karpathy/llama2.c test.c's expectation
        assert ours.encode("I believe the meaning of life is") == \
            [1, 306, 4658, 278, 6593, 310, 2834, 338]


def test_tok512_bin_of_stories260k():
    path = SHARED / "models" / "stories260K" / "tok512.bin"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    tok = Tokenizer.from_file(path)
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    pieces, scores = read_llama2c_vocab(path.read_bytes())
    valid = (SHARED / "models" / "tinystories-tokenizer" / "valid.txt").read_text()
    for text in [valid[:1000]] + TEXTS:
        assert tok.encode(text) == llama2c_encode(pieces, scores, text)


# --- GGUF vocabularies ---------------------------------------------------------------------

def piece_type(sp, i):
    """SentencePiece's piece type number, as llama.cpp writes tokenizer.ggml.token_type."""
    return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1


def gguf_spm_vocab(sp):
    def add(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        w.add_token_types([piece_type(sp, i) for i in range(sp.get_piece_size())])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_chat_template("{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
    return add


def test_gguf_llama_vocabulary_becomes_the_same_sentencepiece(sp_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      vocab_size=320, max_seq_len=16)
    write_gguf(tmp_path / "m.gguf", random_weights(cfg, 0), cfg, vocab=gguf_spm_vocab(sp))
    convert(tmp_path / "m.gguf", tmp_path / "m.h5", "f32", log=lambda m: None)
    with ModelFile(tmp_path / "m.h5") as mf:
        ours = Tokenizer(*mf.tokenizer())
        assert mf.chat_template() == "llama2"
    check_same_encoding(ours, Tokenizer("sentencepiece", sp_model), TEXTS + corpus(30, seed=3))


@pytest.fixture(scope="module")
def bpe_json():
    """A byte-level BPE tokenizer.json like Llama 3's (split regex, ByteLevel, specials)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return tok.to_str()


def test_gguf_byte_level_vocabulary_becomes_the_same_tokenizer_json(bpe_json, tmp_path):
    doc = json.loads(bpe_json)
    vocab = sorted(doc["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in doc["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      vocab_size=len(vocab), max_seq_len=16, bos_id=0, eos_id=1)
    write_gguf(tmp_path / "m.gguf", random_weights(cfg, 0), cfg, vocab=add)
    convert(tmp_path / "m.gguf", tmp_path / "m.h5", "f32", log=lambda m: None)
    with ModelFile(tmp_path / "m.h5") as mf:
        kind, blob = mf.tokenizer()
    ours, original = Tokenizer(kind, blob), Tokenizer("tokenizers", bpe_json.encode())
    assert kind == "tokenizers" and ours.bos_id == original.bos_id == 0
    check_same_encoding(ours, original, TEXTS + corpus(30, seed=4))
    assert ours.encode("hi<|eot_id|>", bos=False)[-1] == 4     # specials stay whole


# --- Hugging Face tokenizer.json and chat ----------------------------------------------------

def test_hf_tokenizer_json_and_llama3_chat(bpe_json, tmp_path):
    tok = Tokenizer("tokenizers", bpe_json.encode())
    assert (tok.bos_id, tok.eos_id, tok.piece_to_id("<|eot_id|>")) == (0, 1, 4)
    ids = chat_prompt_ids(tok, "llama3", [("system", "Be brief."), ("user", " Hi there ")])
    header = lambda role: [2] + tok.encode(role, bos=False) + [3] + tok.encode("\n\n", bos=False)
    assert ids == ([0] + header("system") + tok.encode("Be brief.", bos=False) + [4]
                   + header("user") + tok.encode("Hi there", bos=False) + [4] + header("assistant"))
    assert chat_stop_ids(tok, "llama3") == {1, 4}
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      vocab_size=tok.vocab_size, max_seq_len=64, bos_id=0, eos_id=1)
    folder = write_hf(tmp_path / "hf", random_weights(cfg, 0), cfg,
                      extra_config={"bos_token_id": 0, "eos_token_id": [1, 4]})
    (folder / "tokenizer.json").write_text(bpe_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}"}))
    convert(folder, tmp_path / "m.h5", "q40", log=lambda m: None)
    with ModelFile(tmp_path / "m.h5") as mf:
        assert mf.tokenizer()[0] == "tokenizers" and mf.chat_template() == "llama3"
        assert "start_header_id" in mf.h5["tokenizer"].attrs["chat_template_jinja"]


def test_tokenizer_json_without_the_tokenizers_package(bpe_json, tmp_path, monkeypatch):
    """A Llama 3 folder with only tokenizer.json converts without `tokenizers`: the JSON is
    embedded as it is, its vocabulary counted from the JSON (as tokenizers counts it)."""
    from dllm.converters.common import tokenizer_json_tokens
    size = Tokenizer("tokenizers", bpe_json.encode()).vocab_size
    assert len(tokenizer_json_tokens(bpe_json.encode())) == size
    monkeypatch.setitem(sys.modules, "tokenizers", None)      # import tokenizers fails
    with pytest.raises(DllmError, match="needs the 'tokenizers' package"):
        Tokenizer("tokenizers", bpe_json.encode())
    for vocab, embedded in ((size, True), (size + 1, False)):
        cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                          vocab_size=vocab, max_seq_len=64, bos_id=0, eos_id=1)
        folder = write_hf(tmp_path / f"hf{vocab}", random_weights(cfg, 0), cfg)
        (folder / "tokenizer.json").write_text(bpe_json)
        logged = []
        convert(folder, tmp_path / "m.h5", "q40", chat_template="llama3", log=logged.append)
        with ModelFile(tmp_path / "m.h5") as mf:
            if embedded:
                assert mf.tokenizer() == ("tokenizers", bpe_json.encode())
                assert mf.chat_template() == "llama3"
                assert any("not installed" in m and f"its {size} tokens were counted" in m
                           for m in logged), logged
            else:
                assert mf.tokenizer() is None
                assert any(f"has {size} tokens but the model's vocabulary is {size + 1}" in m
                           for m in logged), logged


def test_llama3_chat_template_needs_the_llama3_header_tokens(sp_model, tmp_path):
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      vocab_size=320, max_seq_len=64)
    folder = write_hf(tmp_path / "hf", random_weights(cfg, 0), cfg)
    (folder / "tokenizer.model").write_bytes(sp_model)
    with pytest.raises(DllmError, match=r"--chat-template llama3 needs the token "
                                        r"<\|begin_of_text\|>, which this tokenizer lacks"):
        convert(folder, tmp_path / "m.h5", "q40", chat_template="llama3", log=lambda m: None)
    assert not (tmp_path / "m.h5").exists()
    # detected from the source's Jinja, not asked for: dropped with a warning
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' }}"}))
    logged = []
    convert(folder, tmp_path / "m.h5", "q40", log=logged.append)
    with ModelFile(tmp_path / "m.h5") as mf:
        assert mf.tokenizer()[0] == "sentencepiece" and mf.chat_template() is None
    assert any("chat template is Llama 3's, but its tokenizer lacks" in m for m in logged)


def test_llama2_chat_prompt(sp_model):
    tok = Tokenizer("sentencepiece", sp_model)
    ids = chat_prompt_ids(tok, "llama2", [("system", "S"), ("user", "a"), ("assistant", "b"),
                                          ("user", "c")])
    assert ids == (tok.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\na [/INST] b ") + [tok.eos_id]
                   + tok.encode("[INST] c [/INST]"))
    with pytest.raises(DllmError, match="alternate"):
        chat_prompt_ids(tok, "llama2", [("user", "a"), ("user", "b")])
    with pytest.raises(DllmError, match="lacks"):
        chat_prompt_ids(tok, "llama3", [("user", "a")])


def test_generate_chat_end_to_end(sp_model, tmp_path):
    import subprocess
    import sys
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      vocab_size=320, max_seq_len=64)
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    write_llama2c(tmp_path / "m.bin", random_weights(cfg, 0), cfg)
    convert(tmp_path / "m.bin", tmp_path / "chat.h5", "q40", chat_template="llama2",
            log=lambda m: None)
    convert(tmp_path / "m.bin", tmp_path / "plain.h5", "q40", log=lambda m: None)
    run = lambda model, *args: subprocess.run(      # noqa: E731
        [sys.executable, "-m", "dllm.generate", "--model", str(model), "--steps", "4",
         "--chat", "--no-stop", *args], capture_output=True, text=True, timeout=60, input="hi\n")
    one = run(tmp_path / "chat.h5", "--prompt", "Hello", "--system", "Be nice")
    stdin = run(tmp_path / "chat.h5")
    plain = run(tmp_path / "plain.h5", "--prompt", "Hello")
    assert one.returncode == 0 and stdin.returncode == 0, one.stderr + stdin.stderr
    assert len(one.stdout.strip()) > 0 and "Traceback" not in one.stderr
    assert plain.returncode == 1 and "no chat template" in plain.stderr
    assert "Traceback" not in plain.stderr


# --- files and errors ------------------------------------------------------------------------

def test_tokenizer_files_by_content_and_bad_input(sp_model, bpe_json, tmp_path):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    (tmp_path / "a.model").write_bytes(sp_model)
    (tmp_path / "b.bin").write_bytes(llama2c_export(sp))
    (tmp_path / "c.json").write_text(bpe_json)
    kinds = [read_tokenizer_file(tmp_path / n)[0] for n in ("a.model", "b.bin", "c.json")]
    assert kinds == ["sentencepiece", "sentencepiece", "tokenizers"]
    (tmp_path / "bad.model").write_bytes(b"\x0a\x05junk!" * 3)
    with pytest.raises(DllmError, match="cannot be read"):
        Tokenizer.from_file(tmp_path / "bad.model")
    with pytest.raises(DllmError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(DllmError, match="unsupported tokenizer kind"):
        Tokenizer("bpe", b"")


def test_text_stream_holds_back_partial_characters(sp_model):
    tok = Tokenizer("sentencepiece", sp_model)
    ids = tok.encode("日本 ok")
    stream = TextStream(tok, ids[:1])
    text = "".join(stream.push(t) for t in ids[1:])
    assert text == "日本 ok" and "\ufffd" not in text
