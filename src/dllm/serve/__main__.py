"""python -m dllm.serve: an OpenAI-compatible server over the MPI ranks.

    mpirun -n 2 python -m dllm.serve --model m.h5 [--host 127.0.0.1] [--port 8000]

Root runs the HTTP server (uvicorn, in a thread) and the scheduler; every rank runs the
engine loop on its main thread: one forward per iteration of root's plan
(dllm.serve.engine), or with --parallel pipeline, the plans passing through the stages,
several in flight (dllm.serve.stages). Root prints "dllm.serve: listening on
http://HOST:PORT" on stderr once it serves (--port 0 picks a free port). docs/serving.md
has the API, the options and the figures.
"""
import re
import socket
import sys
import threading
from pathlib import Path

from ..cli import (ArgumentParser, add_engine_options, add_fault_options, entry, load_model,
                   model_loaded, run, use_fault_options)
from ..checks import check_paths
from ..errors import DllmError
from ..kvcache import BLOCK_SIZE

PROG = "dllm.serve"
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def memory_size(text):
    """argparse type of --kv-memory: bytes, or a number with K, M or G (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(text)
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


memory_size.__name__ = "memory size (e.g. 512M)"


def build_parser(is_root=True):
    p = ArgumentParser(prog=f"python -m {PROG}", is_root=is_root,
                       description="Serve a model over the MPI ranks with OpenAI's HTTP API.")
    add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-name", default=None,
                   help="the model's id in the API (default: the file's name without .h5)")
    p.add_argument("--max-running", type=int, default=16,
                   help="sequences in the running batch at most (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting at most; more are answered 429 (default 64)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks per rank (default: --max-running whole contexts, "
                        "or what --kv-memory holds)")
    p.add_argument("--kv-block-size", type=int, default=BLOCK_SIZE, metavar="POSITIONS",
                   help=f"positions per KV cache block (default {BLOCK_SIZE}, as vLLM's; "
                        "smaller blocks waste less of the last block of each sequence)")
    p.add_argument("--kv-memory", type=memory_size, default=None, metavar="SIZE",
                   help="KV cache memory per rank, e.g. 512M (instead of --kv-blocks)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="prompt tokens an iteration prefills beside the decoding rows, in "
                        "whole --prefill-chunk chunks (default: one chunk)")
    p.add_argument("--batching", default="exact", choices=("exact", "fast"),
                   help="'exact': every row of a batch computed as it is alone, so batching "
                        "changes no token (default); 'fast': one matmul over all rows of an "
                        "iteration, the weights unpacked once (more tokens/s where compute "
                        "binds; rows round by float32 ulps with their neighbours)")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes (default 1048576)")
    add_fault_options(p)
    return p


def main(argv=None):
    return run(_main, argv, PROG)


def _main(comm, argv):
    from . import engine, stages
    args = build_parser(comm.is_root).parse_args(argv)
    comm.from_root(check_paths, args)
    if args.kv_blocks is not None and args.kv_memory is not None:
        raise DllmError("give --kv-blocks or --kv-memory, not both")
    if args.kv_block_size < 1:
        raise DllmError(f"--kv-block-size must be at least 1, got {args.kv_block_size}")
    use_fault_options(comm, args)
    model = load_model(comm, args)
    comm.from_root(require_tokenizer, model)
    pool = comm.agree(engine.make_pool, comm, model, args.kv_blocks, args.kv_memory,
                      args.max_running, args.kv_block_size)
    scheduler = comm.root_only(start_server, args, model, pool)
    model_loaded(comm)
    serve = stages.run if args.parallel == "pipeline" else engine.run
    serve(comm, model, pool, scheduler, merged=args.batching == "fast")
    return 0


def require_tokenizer(model):
    if model.tokenizer is None:
        raise DllmError("this model file has no tokenizer: pass --tokenizer PATH")


def start_server(args, model, pool):
    """Root: the scheduler, and the HTTP server listening in a thread of its own."""
    from .api import ServerState, make_app
    from .chat import ChatFormat
    from .metrics import Metrics
    from .scheduler import Scheduler
    try:
        import uvicorn
    except ImportError:
        raise DllmError("dllm.serve needs its extra: pip install 'dllm[serve]'") from None
    path = Path(args.model) if args.model else None
    metrics = Metrics()
    scheduler = Scheduler(pool.n_blocks, model.max_seq_len, model.prefill_chunk,
                          args.max_running, args.max_queue, args.prefill_tokens,
                          block_size=pool.block_size,
                          metrics=metrics)
    name, jinja = stored_chat_template(model.path)
    state = ServerState(scheduler, model.tokenizer, ChatFormat(model.tokenizer, name, jinja),
                        metrics, args.model_name or (path.stem if path else "tinystories-1m"),
                        model.max_seq_len, args.api_key, args.max_body)
    sock = listen(args.host, args.port)
    config = uvicorn.Config(make_app(state), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="dllm-http", daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    mode = "pipeline stages" if args.parallel == "pipeline" else "rank(s)"
    print(f"{PROG}: listening on http://{host}:{port} ({model.comm.size} {mode}, "
          f"{pool.n_blocks} KV blocks of {pool.block_size} per rank, "
          f"{pool.nbytes / 2 ** 20:.1f} MiB)", file=sys.stderr, flush=True)
    return scheduler


def listen(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DllmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(1024)
    return sock


def stored_chat_template(path):
    """(template name, Jinja source) stored with the model's tokenizer (either may be None)."""
    from ..modelfile import ModelFile
    with ModelFile(path) as mf:
        name = mf.chat_template()
        jinja = (mf.h5["tokenizer"].attrs.get("chat_template_jinja")
                 if "tokenizer" in mf.h5 else None)
    if isinstance(jinja, bytes):
        jinja = jinja.decode()
    return name, jinja or None


if __name__ == "__main__":
    entry(_main, PROG)
