"""Text <-> token ids with SentencePiece, read from the model file or a tokenizer.model path.

Root only: other ranks never touch text.
"""
from pathlib import Path

from .errors import DllmError


class Tokenizer:
    """A SentencePiece model. kind must be "sentencepiece"; blob is the serialized model."""

    def __init__(self, kind, blob):
        if kind != "sentencepiece":
            raise DllmError(f"unsupported tokenizer kind {kind!r} (dllm reads sentencepiece)")
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(blob)
        except Exception as exc:  # sentencepiece raises bare RuntimeError/OSError on bad protos
            raise DllmError(f"tokenizer cannot be read: {str(exc).splitlines()[0]}") from None
        self.kind, self.blob = kind, blob

    @classmethod
    def from_file(cls, path):
        path = Path(path)
        if not path.is_file():
            raise DllmError(f"tokenizer file not found: {path}")
        return cls("sentencepiece", path.read_bytes())

    @property
    def vocab_size(self):
        return self.sp.GetPieceSize()

    @property
    def bos_id(self):
        return self.sp.bos_id()

    @property
    def eos_id(self):
        return self.sp.eos_id()

    def encode(self, text, bos=True):
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] + ids if bos and self.bos_id >= 0 else ids

    def decode(self, ids):
        return self.sp.DecodeIds([int(i) for i in ids])


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
