"""The `dllm` command (console script) and `python -m dllm`: one command, a verb per tool.

    dllm generate --prompt "Once upon a time"      # = python -m dllm.generate ...
    mpirun -n 4 dllm bench --preset llama2-7b --layers 4
    dllm --version

Each verb runs that module's own main with the remaining arguments, so every flag, exit
status and error line is the module's (usage errors exit 2).
"""
import importlib
import sys

from . import __version__

VERBS = {"generate": "text from a prompt, or a chat",
         "eval": "perplexity and MMLU",
         "bench": "per-token inference and sync time, tables and plots",
         "convert": "a checkpoint (HF, GGUF, llama2.c) to a dllm model file",
         "inspect": "what is inside a model file",
         "plan": "calibrate, search and check layer placements",
         "serve": "an OpenAI-compatible HTTP server (the serve extra)",
         "train": "data- and tensor-parallel training",
         "link": "run a job over an emulated, shaped network (root)"}

# verbs whose main is not in the module of their name (packages)
MODULES = {"serve": "dllm.serve.__main__", "train": "dllm.train.run"}


def usage():
    verbs = "\n".join(f"  {verb:9s} {what}" for verb, what in VERBS.items())
    return (f"usage: dllm VERB [ARGS...]   (dllm VERB --help for a verb's flags)\n\n"
            f"verbs:\n{verbs}\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"dllm {__version__}")
        return 0
    if argv[0] not in VERBS:
        print(f"dllm: error: unknown verb {argv[0]!r}; one of {', '.join(VERBS)} (see --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(MODULES.get(argv[0], f"dllm.{argv[0]}"))
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
