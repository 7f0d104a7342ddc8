"""Chat prompts: the model's stored Jinja chat template rendered with jinja2, as Hugging
Face's apply_chat_template does; else dllm's built-in Llama 2 / Llama 3 formats. Root only.

The rendered text holds special tokens as text ("<s>", "<|im_start|>", "<|eot_id|>"); they
are cut out and mapped to their ids, and only the text between them goes through the
tokenizer, so a user's message cannot smuggle in a control token by encoding.
"""
import re

from ..errors import DllmError
from ..tokenizer import chat_prompt_ids, chat_stop_ids

# Candidate special tokens in a rendered template: <|...|>, <s>, </s>, <...> of one word.
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<[A-Za-z_]{1,20}>")
STOP_PIECES = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>")


class ChatFormat:
    """How this model's conversations become prompt ids, and which ids end a reply."""

    def __init__(self, tokenizer, template_name, jinja_source):
        self.tokenizer, self.name = tokenizer, template_name
        self.template = None
        if jinja_source:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self.template = env.from_string(jinja_source)
            except TemplateError as exc:
                raise DllmError(f"the model's chat template is not valid Jinja: {exc}") from None
        stops = {tokenizer.piece_to_id(p) for p in STOP_PIECES} | {tokenizer.eos_id}
        if template_name in ("llama2", "llama3"):
            stops |= chat_stop_ids(tokenizer, template_name)
        self.stop_ids = frozenset(i for i in stops if i is not None and i >= 0)

    @property
    def available(self):
        return self.template is not None or self.name in ("llama2", "llama3")

    def prompt_ids(self, messages):
        """messages: [{"role", "content"}] (checked by the API) -> prompt token ids."""
        if self.template is not None:
            return self._render(messages)
        if self.name in ("llama2", "llama3"):
            return chat_prompt_ids(self.tokenizer, self.name,
                                   [(m["role"], m["content"]) for m in messages])
        raise DllmError("this model has no chat template: use /v1/completions, or "
                        "reconvert it with python -m dllm.convert ... --chat-template")

    def _render(self, messages):
        from jinja2.exceptions import TemplateError
        tok = self.tokenizer
        bos = _piece(tok, tok.bos_id)
        eos = _piece(tok, tok.eos_id)
        try:
            text = self.template.render(messages=messages, bos_token=bos, eos_token=eos,
                                        add_generation_prompt=True)
        except TemplateError as exc:
            raise DllmError(f"the chat template refused these messages: {exc}") from None
        return encode_with_specials(tok, text)


def encode_with_specials(tokenizer, text):
    """Ids of text in which special tokens appear as their text."""
    ids, at = [], 0
    for match in _SPECIAL.finditer(text):
        special = tokenizer.piece_to_id(match.group())
        if special is None or not _is_special(tokenizer, special):
            continue
        if match.start() > at:
            ids += tokenizer.encode(text[at:match.start()], bos=False)
        ids.append(special)
        at = match.end()
    if at < len(text):
        ids += tokenizer.encode(text[at:], bos=False)
    return ids


def _is_special(tokenizer, token_id):
    """A control token (it decodes to nothing), not a piece that merely looks like one."""
    return tokenizer.decode([token_id]) == ""


def _piece(tokenizer, token_id):
    return "" if token_id is None or token_id < 0 else tokenizer.id_to_piece(token_id)


def _raise(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)
