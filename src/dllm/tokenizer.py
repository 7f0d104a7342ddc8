"""Text <-> token ids, read from the model file or a tokenizer file; chat prompts.

Root only: other ranks never touch text. Two kinds of serialized tokenizer (docs/format.md):

- "sentencepiece": a SentencePiece ``tokenizer.model`` proto (Llama 1/2, TinyLlama, Mistral).
  llama2.c ``tokenizer.bin`` files and GGUF "llama" vocabularies are converted into this kind
  by ``sentencepiece_model``: the same pieces, scores and types as a BPE model, so the
  SentencePiece library encodes exactly as llama2.c's and llama.cpp's BPE merge loops do.
- "tokenizers": a Hugging Face ``tokenizer.json`` (Llama 3's byte-level BPE), read by the
  ``tokenizers`` package (an optional extra, ``pip install 'dllm[convert]'``).
"""
import json
import re
import struct

from .checks import read_file
from .errors import DllmError

KINDS = ("sentencepiece", "tokenizers")
SPACE = "\u2581"   # SentencePiece's visible space, "▁"

# SentencePiece piece types (sentencepiece_model.proto ModelProto.SentencePiece.Type); GGUF's
# tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """A tokenizer of one of KINDS, built from its serialized bytes (ModelFile.tokenizer())."""

    def __init__(self, kind, blob):
        if kind == "sentencepiece":
            self._impl = _SentencePiece(blob)
        elif kind == "tokenizers":
            self._impl = _HFTokenizer(blob)
        else:
            raise DllmError(f"unsupported tokenizer kind {kind!r} (dllm reads "
                            f"{' and '.join(KINDS)})")
        self.kind, self.blob = kind, bytes(blob)

    @classmethod
    def from_file(cls, path):
        """A tokenizer file of any supported format: SentencePiece tokenizer.model, llama2.c
        tokenizer.bin (converted to SentencePiece) or Hugging Face tokenizer.json."""
        return cls(*read_tokenizer_file(path))

    @property
    def vocab_size(self):
        return self._impl.vocab_size

    @property
    def bos_id(self):
        return self._impl.bos_id

    @property
    def eos_id(self):
        return self._impl.eos_id

    def piece_to_id(self, piece):
        """Id of a piece or special token ("<|eot_id|>"), or None when absent."""
        return self._impl.piece_to_id(piece)

    def id_to_piece(self, token_id):
        """The piece (as the vocabulary spells it: "▁the", "<s>") of an id."""
        return self._impl.id_to_piece(int(token_id))

    def encode(self, text, bos=True):
        ids = self._impl.encode(text)
        return [self.bos_id] + ids if bos and self.bos_id >= 0 else ids

    def decode(self, ids):
        """Text of ids; special (control) tokens decode to nothing."""
        return self._impl.decode([int(i) for i in ids])


class _SentencePiece:
    def __init__(self, blob):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(bytes(blob))
        except Exception as exc:  # sentencepiece raises bare RuntimeError/OSError on bad protos
            raise DllmError(f"the tokenizer cannot be read: not a valid SentencePiece model "
                            f"({str(exc).splitlines()[0].split(']')[-1].strip() or 'corrupt'})"
                            ) from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def piece_to_id(self, piece):
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.IdToPiece(i) else i

    def id_to_piece(self, token_id):
        return self.sp.IdToPiece(token_id)

    def encode(self, text):
        return self.sp.EncodeAsIds(text)

    def decode(self, ids):
        return self.sp.DecodeIds(ids)


class _HFTokenizer:
    # Names of special tokens, for tokenizer.json files whose post-processor does not say.
    BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>")
    EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>")

    def __init__(self, blob):
        try:
            import tokenizers
        except ImportError:
            raise DllmError("this tokenizer (tokenizer.json) needs the 'tokenizers' package: "
                            "pip install 'dllm[convert]'") from None
        try:
            text = bytes(blob).decode()
            self.tok = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise DllmError(f"tokenizer.json cannot be read: {str(exc).splitlines()[0]}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        bos = _leading_special_token(json.loads(text).get("post_processor"))
        self.bos_id = self._first_id((bos,) if bos else self.BOS_NAMES)
        self.eos_id = self._first_id(self.EOS_NAMES)

    def _first_id(self, names):
        ids = [self.tok.token_to_id(n) for n in names]
        return next((i for i in ids if i is not None), -1)

    def piece_to_id(self, piece):
        return self.tok.token_to_id(piece)

    def id_to_piece(self, token_id):
        return self.tok.id_to_token(token_id)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


def _leading_special_token(processor):
    """The special token a tokenizer.json post-processor puts first (BOS), or None."""
    if not processor:
        return None
    if processor.get("type") == "Sequence":
        found = [_leading_special_token(p) for p in processor.get("processors", [])]
        return next((f for f in found if f), None)
    if processor.get("type") == "TemplateProcessing":
        first = (processor.get("single") or [{}])[0]
        return first.get("SpecialToken", {}).get("id")
    return None


class TextStream:
    """Turns a growing list of ids into newly printable text, holding back a trailing
    partial UTF-8 character (byte-fallback tokens arrive one byte at a time)."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.printed = tokenizer.decode(self.ids)

    def push(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new


# --- reading tokenizer files ------------------------------------------------------------

def read_tokenizer_file(path):
    """(kind, bytes) of a tokenizer file, its format told by its content: JSON ->
    "tokenizers"; a valid llama2.c tokenizer.bin -> converted to "sentencepiece"; anything
    else is taken as a SentencePiece proto (checked when loaded)."""
    blob = read_file(path, "tokenizer file", text=False)
    if blob[:1] == b"{":
        return "tokenizers", blob
    parsed = parse_llama2c_tokenizer(blob)
    if parsed is not None:
        return "sentencepiece", llama2c_to_sentencepiece(*parsed)
    return "sentencepiece", blob


def parse_llama2c_tokenizer(blob):
    """(pieces as bytes, scores) of a llama2.c tokenizer.bin, or None when blob is not one.

    Layout (llama2.c tokenizer.py export): int32 max_token_length, then per token a float32
    score, an int32 length and that many bytes, to the end of the file."""
    if len(blob) < 4:
        return None
    (max_len,) = struct.unpack_from("<i", blob, 0)
    pieces, scores, offset = [], [], 4
    while offset < len(blob):
        if offset + 8 > len(blob):
            return None
        score, n = struct.unpack_from("<fi", blob, offset)
        offset += 8
        if not 0 < n <= max_len or offset + n > len(blob):
            return None
        pieces.append(blob[offset:offset + n])
        scores.append(score)
        offset += n
    return (pieces, scores) if pieces else None


_BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")


def llama2c_to_sentencepiece(pieces, scores):
    """A SentencePiece BPE proto with the vocabulary of a llama2.c tokenizer.bin.

    The export wrote "▁" as a space and BOS/EOS as "\\n<s>\\n"/"\\n</s>\\n"; undo both, and
    give every piece the type llama2.c's encoder implies: "<unk>" unknown, <s>/</s> control,
    "<0xXX>" byte fallback, the rest normal pieces merged by score."""
    entries = []
    for raw, score in zip(pieces, scores):
        if raw in (b"\n<s>\n", b"\n</s>\n"):
            entries.append((raw.strip().decode(), score, CONTROL))
        elif raw == b"<unk>":
            entries.append(("<unk>", score, UNKNOWN))
        elif _BYTE_PIECE.fullmatch(raw):
            entries.append((raw.decode(), score, BYTE))
        else:
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                raise DllmError(f"tokenizer.bin piece {len(entries)} is not UTF-8: "
                                f"{raw!r}") from None
            entries.append((text.replace(" ", SPACE), score, NORMAL))
    return sentencepiece_model(entries)


# --- writing SentencePiece protos ---------------------------------------------------------

def sentencepiece_model(pieces, add_dummy_prefix=True, remove_extra_whitespaces=False,
                        precompiled_charsmap=b"", bos_id=None, eos_id=None):
    """Serialize a SentencePiece BPE ModelProto (sentencepiece_model.proto) from
    pieces [(text, score, type)], with the normalizer llama2.c and llama.cpp assume:
    no normalization, whitespace kept, "▁" prefix. unk is the UNKNOWN piece; bos/eos the
    control pieces at bos_id/eos_id when given, else <s> and </s> (-1 when absent)."""
    texts = [p[0] for p in pieces]
    if len(set(texts)) != len(texts):
        dup = next(t for t in texts if texts.count(t) > 1)
        raise DllmError(f"tokenizer vocabulary has the piece {dup!r} twice")
    unknown = [i for i, p in enumerate(pieces) if p[2] == UNKNOWN]
    if len(unknown) != 1:
        raise DllmError(f"tokenizer vocabulary needs exactly one unknown piece, "
                        f"has {len(unknown)}")
    control = {p[0]: i for i, p in enumerate(pieces) if p[2] == CONTROL}

    def special(given, default):
        ok = given is not None and 0 <= given < len(pieces) and pieces[given][2] == CONTROL
        return pieces[given][0] if ok else default
    bos_piece, eos_piece = special(bos_id, "<s>"), special(eos_id, "</s>")
    proto = b"".join(_pb_bytes(1, _pb_bytes(1, text.encode()) + _pb_float(2, score) +
                               _pb_int(3, kind)) for text, score, kind in pieces)
    trainer = (_pb_int(3, 2)                                    # model_type = BPE
               + _pb_int(4, len(pieces))                        # vocab_size
               + _pb_int(35, any(p[2] == BYTE for p in pieces))  # byte_fallback
               + _pb_int(40, unknown[0])                        # unk_id
               + _pb_int(41, control.get(bos_piece, -1))        # bos_id
               + _pb_int(42, control.get(eos_piece, -1))        # eos_id
               + _pb_int(43, -1)                                # pad_id
               + _pb_bytes(45, pieces[unknown[0]][0].encode())  # unk_piece
               + _pb_bytes(46, bos_piece.encode()) + _pb_bytes(47, eos_piece.encode()))
    normalizer = (_pb_bytes(1, b"identity") + _pb_bytes(2, precompiled_charsmap)
                  + _pb_int(3, add_dummy_prefix) + _pb_int(4, remove_extra_whitespaces)
                  + _pb_int(5, True))                           # escape_whitespaces
    return proto + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def _pb_varint(value):
    value &= (1 << 64) - 1          # negative int32 -> 10-byte two's complement, as protobuf
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_int(field, value):
    return _pb_varint(field << 3) + _pb_varint(int(value))


def _pb_float(field, value):
    return _pb_varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field, data):
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


# --- chat templates ---------------------------------------------------------------------

CHAT_TEMPLATES = ("llama2", "llama3")


def detect_chat_template(jinja):
    """Which of CHAT_TEMPLATES a Jinja chat template (tokenizer_config.json, GGUF
    tokenizer.chat_template) implements, or None."""
    if not jinja:
        return None
    if "<|start_header_id|>" in jinja:
        return "llama3"
    if "[INST]" in jinja:
        return "llama2"
    return None


def chat_prompt_ids(tokenizer, template, messages):
    """Token ids of a conversation ending with a user turn, ready for the reply.

    messages: [(role, text)], roles "system" (first only), "user", "assistant" alternating.
    llama2: Meta's chat_completion format, each exchange "<s>[INST] user [/INST] answer </s>"
    with the system prompt in <<SYS>> inside the first user turn. llama3: Meta's dialog
    format, "<|start_header_id|>role<|end_header_id|>\\n\\ntext<|eot_id|>" per message.
    """
    if template == "llama2":
        return _llama2_chat(tokenizer, messages)
    if template == "llama3":
        return _llama3_chat(tokenizer, messages)
    raise DllmError(f"unknown chat template {template!r}; dllm knows "
                    f"{', '.join(CHAT_TEMPLATES)}")


def chat_stop_ids(tokenizer, template):
    """Token ids that end the assistant's turn."""
    names = ("<|eot_id|>", "<|end_of_text|>") if template == "llama3" else ()
    ids = {tokenizer.piece_to_id(n) for n in names} | {tokenizer.eos_id}
    return {i for i in ids if i is not None and i >= 0}


def _llama2_chat(tokenizer, messages):
    system = messages[0][1] if messages and messages[0][0] == "system" else None
    turns = [m for m in messages if m[0] != "system"]
    if system is not None and turns:
        turns[0] = ("user", f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0][1]}")
    _check_alternating(turns)
    ids = []
    for i in range(0, len(turns) - 1, 2):
        ids += tokenizer.encode(f"[INST] {turns[i][1].strip()} [/INST] "
                                f"{turns[i + 1][1].strip()} ", bos=True) + [tokenizer.eos_id]
    return ids + tokenizer.encode(f"[INST] {turns[-1][1].strip()} [/INST]", bos=True)


def _llama3_chat(tokenizer, messages):
    special = {n: tokenizer.piece_to_id(n) for n in
               ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    missing = [n for n, i in special.items() if i is None]
    if missing:
        raise DllmError(f"the llama3 chat template needs the token {missing[0]}, which this "
                        f"tokenizer lacks")
    _check_alternating([m for m in messages if m[0] != "system"])

    def header(role):
        return ([special["<|start_header_id|>"]] + tokenizer.encode(role, bos=False)
                + [special["<|end_header_id|>"]] + tokenizer.encode("\n\n", bos=False))

    ids = [special["<|begin_of_text|>"]]
    for role, text in messages:
        ids += header(role) + tokenizer.encode(text.strip(), bos=False) + [special["<|eot_id|>"]]
    return ids + header("assistant")


def _check_alternating(turns):
    roles = [r for r, _ in turns]
    expected = ["user", "assistant"] * len(turns)
    if not roles or roles != expected[:len(roles)] or roles[-1] != "user":
        raise DllmError("a chat must alternate user and assistant turns and end with the user")
