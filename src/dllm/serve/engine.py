"""The engine loop every rank runs: receive root's plan, run one forward of it.

    root:   plan = scheduler.next_plan()   (waits while idle)
    all:    bcast plan                     (the other ranks sleep-poll: root may idle long)
    all:    forward of the plan's rows over the paged KV cache
    root:   scheduler.complete(plan, logits): sample, send tokens to the clients

A plan of None ends the loop on every rank.
"""
from ..kvcache import BLOCK_SIZE, BlockPool, PagedStep, blocks_for_memory, check_pool


def make_pool(comm, model, kv_blocks=None, kv_memory=None, max_running=1,
              block_size=BLOCK_SIZE):
    """Every rank's BlockPool of its own layers and cached kv heads (model.layers,
    model.shard), of the same number of blocks on every rank (the block tables are root's):
    --kv-blocks, else as many as --kv-memory bytes hold on the rank with the most of them,
    else max_running whole contexts. Collective. Scheme star: root's pool holds every kv
    head, the other ranks' none (they cache nothing)."""
    c, heads, layers = model.config, model.shard.n_cache_kv_heads, len(model.layers)
    if kv_blocks is None and kv_memory is not None:
        fits = comm.allgather(blocks_for_memory(layers, heads, c.head_dim, kv_memory,
                                                block_size))
        kv_blocks = min(n for n in fits if n is not None)
    if kv_blocks is None:
        kv_blocks = max_running * -(-model.max_seq_len // block_size)
    check_pool(kv_blocks, model.max_seq_len, block_size)
    return BlockPool(layers, heads, c.head_dim, kv_blocks, block_size)


def run(comm, model, pool, scheduler=None, merged=False):
    """Serve until root's scheduler says stop. Collective: every rank calls it, root with
    its scheduler. merged: --batching fast (kvcache.PagedStep)."""
    while True:
        plan = scheduler.next_plan() if comm.is_root else None
        with comm.unbounded():       # idle waits for requests last as long as they last
            plan = comm.bcast_when_ready(plan)
        if plan is None:
            return
        step = PagedStep(pool, plan.segments, model.head_kv, model.kernels, merged)
        wants_logits = any(kind is not None for _, _, _, kind in plan.segments)
        logits = model.forward(plan.tokens, 0, logits="plan" if wants_logits else None,
                               step=step)
        if comm.is_root:
            scheduler.complete(plan, logits)
