"""Source checkpoint readers, one module per format, each with its own name table:

| module      | source                                   | wq/wk rows            |
|-------------|------------------------------------------|-----------------------|
| hf          | Hugging Face folder (safetensors)        | rotate-half: permuted |
| gguf        | llama.cpp GGUF (table types kept as stored)| interleaved          |
| llama2c     | Karpathy llama2.c .bin (v0 legacy, v1)   | interleaved           |
| synthetic   | random Q4_0 weights of a real shape      | -                     |

Each returns a ``common.Checkpoint`` (config, a generator of tensors read lazily, tokenizer,
chat template); ``common.write_checkpoint`` writes it. ``dllm.convert`` is the command line.
Optional packages (safetensors, gguf, tokenizers) are imported only here.
"""
from pathlib import Path

from ..errors import DllmError

FORMATS = ("hf", "gguf", "llama2c")


def detect_format(source):
    """The format of a source path, by content: a folder with config.json is HF, a file
    starting with "GGUF" is GGUF, a llama2.c header that fits the file size is llama2.c."""
    from .gguf import is_gguf
    from .hf import is_hf_folder
    from .llama2c import is_llama2c
    path = Path(source)
    if not path.exists():
        raise DllmError(f"{path} does not exist")
    if path.is_dir():
        if is_hf_folder(path):
            return "hf"
        raise DllmError(f"{path} is a folder without config.json: not a Hugging Face model")
    if not path.is_file():      # a FIFO or device: reading it could block or never end
        raise DllmError(f"{path} is not a regular file")
    try:
        if is_gguf(path):
            return "gguf"
        if is_llama2c(path):
            return "llama2c"
    except OSError as exc:
        raise DllmError(f"{path} cannot be read: {exc.strerror or exc}") from None
    raise DllmError(f"{path}: unknown checkpoint format (dllm converts Hugging Face folders, "
                    f"GGUF files and llama2.c .bin files)")


def open_checkpoint(source, fmt=None, tokenizer_path=None):
    """Open `source` as a common.Checkpoint (fmt: one of FORMATS, detected when None)."""
    fmt = fmt or detect_format(source)
    if fmt in ("gguf", "llama2c"):
        _check_file(Path(source), "GGUF" if fmt == "gguf" else "llama2.c")
    if fmt == "hf":
        from .hf import is_hf_folder, read_hf
        if not Path(source).exists():
            raise DllmError(f"{source} does not exist")
        if not is_hf_folder(Path(source)):
            raise DllmError(f"{source} is not a Hugging Face model folder (no config.json)")
        return read_hf(source)
    if fmt == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise DllmError("reading GGUF needs the 'gguf' package: "
                            "pip install 'dllm[convert]'") from None
        from .gguf import read_gguf
        return read_gguf(str(source))
    if fmt == "llama2c":
        from .llama2c import read_llama2c
        return read_llama2c(source, tokenizer_path)
    raise DllmError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _check_file(path, kind):
    """--format gguf/llama2c name a file: say so in one line before any reader opens it."""
    if not path.exists():
        raise DllmError(f"{path} does not exist")
    if path.is_dir():
        raise DllmError(f"{path} is a folder, not a {kind} file")
    if not path.is_file():
        raise DllmError(f"{path} is not a regular file (a {kind} checkpoint is one)")
