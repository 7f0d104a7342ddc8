"""The server's figures in Prometheus' text exposition format (GET /metrics). Root only.

Counters and histograms are updated by the engine thread; /metrics reads them from the
HTTP thread (plain ints and lists: a reading may be one token stale, never torn).
"""
import collections
import time

# Histogram buckets, seconds: inter-token latencies of a Pi cluster reach seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0     # seconds of tokens behind the tokens/s gauge


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value):
        for i, edge in enumerate(BUCKETS):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name, help_text):
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{edge}"}} {count}'
                for edge, count in zip(BUCKETS, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}",
                f"{name}_count {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self.requests = collections.Counter()     # by outcome: "ok", "error", "rejected"
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.preemptions = 0
        self.iterations = 0
        self.ttft, self.itl = Histogram(), Histogram()
        self.recent = collections.deque()         # monotonic times of recent tokens

    def token(self, seq, now):
        """A token of seq was sampled at `now` (time.monotonic())."""
        if seq.last_token_time is None:
            self.ttft.observe(now - seq.arrival)
        else:
            self.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        self.generated_tokens += 1
        self.recent.append(now)

    def tokens_per_second(self):
        now = time.monotonic()
        while self.recent and self.recent[0] < now - RATE_WINDOW:
            self.recent.popleft()
        return len(self.recent) / RATE_WINDOW

    def render(self, snapshot):
        """The exposition text; snapshot: Scheduler.snapshot()."""
        queued, running, used, free, block_size, live = snapshot
        gauges = [("dllm_queue_depth", "requests waiting to run", queued),
                  ("dllm_running_sequences", "sequences in the running batch", running),
                  ("dllm_kv_blocks_used", "KV cache blocks held by sequences", used),
                  ("dllm_kv_blocks_free", "KV cache blocks free", free),
                  ("dllm_kv_block_size", "positions per KV cache block", block_size),
                  ("dllm_kv_live_tokens", "positions the running sequences have written or "
                   "are writing", live),
                  ("dllm_tokens_per_second", f"tokens generated per second over the last "
                   f"{RATE_WINDOW:.0f} s", round(self.tokens_per_second(), 3))]
        counters = [("dllm_generated_tokens_total", "tokens generated", self.generated_tokens),
                    ("dllm_prompt_tokens_total", "prompt tokens admitted", self.prompt_tokens),
                    ("dllm_preemptions_total", "sequences preempted for KV blocks",
                     self.preemptions),
                    ("dllm_iterations_total", "engine iterations (forwards)", self.iterations)]
        out = []
        for name, help_text, value in gauges:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help_text, value in counters:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        out += ["# HELP dllm_requests_total requests answered, by outcome",
                "# TYPE dllm_requests_total counter"]
        out += [f'dllm_requests_total{{outcome="{k}"}} {v}'
                for k, v in sorted(self.requests.items())]
        out += self.ttft.lines("dllm_time_to_first_token_seconds",
                               "from arrival to the first generated token")
        out += self.itl.lines("dllm_inter_token_latency_seconds",
                              "between consecutive tokens of a sequence")
        return "\n".join(out) + "\n"
