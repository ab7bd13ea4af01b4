"""Prometheus metrics of the server and engine, named by metric_names."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from inferd.outputs import EngineStats
from inferd.server import metric_names as n

# Buckets dense where serving SLOs sit, so P99 from histogram_quantile is useful.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)


SWAP_RESULTS = ("ok", "refused", "rolled_back")


class Metrics:
    """The server's own counters and histograms, plus collectors read at scrape time: the
    engine's load (`engine_stats()`: EngineStats, or None while no model is serving), the audit
    log's progress and the GPUs."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None] = lambda: None, audit=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(n.REQUESTS_TOTAL, "Requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram(n.TIME_TO_FIRST_TOKEN, "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(n.TIME_PER_OUTPUT_TOKEN, "Time per output token after the first", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(n.E2E_LATENCY, "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(n.PROMPT_TOKENS, "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(n.GENERATION_TOKENS, "Tokens generated", registry=r)
        self.load_attempts = Counter(n.MODEL_LOAD_ATTEMPTS, "Model load attempts", registry=r)
        self.load_failures = Counter(n.MODEL_LOAD_FAILURES, "Model load failures", registry=r)
        self.swaps = Counter(n.MODEL_SWAPS, "In-place weight swaps, by result (ok, refused, rolled_back)", ["result"], registry=r)
        for result in SWAP_RESULTS:  # every series exists from start-up at 0: increase() and alerts see the first one
            self.swaps.labels(result)
        self.swap_pause = Gauge(n.MODEL_SWAP_PAUSE, "The last in-place swap's pause (drain start to resume)", registry=r)
        self.ready = Gauge(n.MODEL_READY, "1 once the model is loaded and a warm-up generation ran", registry=r)
        self.build_info = Gauge(
            n.BUILD_INFO,
            "1 for the model and runtime this server serves",
            ["model", "model_version", "runtime_version"],
            registry=r,
        )
        self.rate_limited = Counter(n.RATE_LIMITED, "Requests refused with 429", ["reason"], registry=r)
        for reason in ("rate", "concurrency", "queue", "anonymous"):  # exported at 0 from the start, so rate() has a series
            self.rate_limited.labels(reason)
        r.register(EngineCollector(engine_stats))
        if audit is not None:
            r.register(AuditCollector(audit))
        gpu = GpuCollector()
        if gpu.available:
            r.register(gpu)

    def set_build_info(self, model: str, info: dict) -> None:
        """One series, for what serves now (a swap replaces it)."""
        self.build_info.clear()
        self.build_info.labels(model, info["model_version"] or "", info["runtime_version"]).set(1)


class EngineCollector:
    """The serving engine's queues, KV cache, prefix cache (and its host tier) and speculative
    drafts, read from its `stats()` at scrape time; zeros while no model is serving (every series
    exists from the start)."""

    FIELDS = (
        (n.REQUESTS_RUNNING, "Requests being generated", "running"),
        (n.REQUESTS_WAITING, "Requests queued in the engine", "waiting"),
        (n.KV_CACHE_USAGE, "Fraction of KV-cache blocks in use", "kv_cache_usage"),
        (n.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
        (n.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
        (n.HOST_KV_CACHE_HITS, "KV blocks copied back from the host tier instead of computed", "host_cache_hits"),
        (n.HOST_KV_CACHE_BLOCKS, "KV blocks the host tier holds", "host_cache_blocks"),
        (n.HOST_KV_CACHE_CAPACITY, "KV blocks the host tier can hold (0: off)", "host_cache_capacity_blocks"),
        (n.HOST_KV_CACHE_BYTES, "Bytes of KV blocks the host tier holds", "host_cache_bytes"),
        (n.SPEC_DECODE_DRAFT_TOKENS, "Draft tokens speculative decoding verified", "spec_draft_tokens"),
        (n.SPEC_DECODE_ACCEPTED_TOKENS, "Draft tokens the target model accepted", "spec_accepted_tokens"),
        (n.SPEC_DECODE_PAUSED_STEPS, "Plain decode steps while the speculation gate held back", "spec_paused_steps"),
    )

    def __init__(self, engine_stats: Callable[[], EngineStats | None]):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats() or EngineStats()
        for name, doc, field in self.FIELDS:
            yield GaugeMetricFamily(name, doc, value=getattr(stats, field))


class AuditCollector:
    """The audit log's ring depth, records written and records dropped, at scrape time."""

    def __init__(self, audit):
        self.audit = audit

    def collect(self):
        yield GaugeMetricFamily(n.AUDIT_RING_DEPTH, "Audit records waiting to be written", value=self.audit.depth)
        yield GaugeMetricFamily(n.AUDIT_RECORDS, "Audit records written", value=self.audit.written)
        yield GaugeMetricFamily(
            n.AUDIT_DROPPED, "Audit records that could not be written (must stay 0)", value=self.audit.dropped
        )


class GpuCollector:
    """NVML readings at scrape time; absent (not an error) on a host without an NVIDIA GPU.
    On Hopper and newer, GPM gives SM activity and DRAM bandwidth utilisation."""

    def __init__(self):
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.available = bool(self.handles)
        except Exception:
            self.handles = []
        self._gpm_prev: dict[int, object] = {}

    def _gpm(self, i, handle):
        nv = self.nvml
        try:
            if not nv.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return None
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(handle, sample)
            prev, self._gpm_prev[i] = self._gpm_prev.get(i), sample
            if prev is None:
                return None
            mg = nv.c_nvmlGpmMetricsGet_t()
            mg.version = nv.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = 2
            mg.sample1, mg.sample2 = prev, sample
            mg.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
            mg.metrics[1].metricId = nv.NVML_GPM_METRIC_DRAM_BW_UTIL
            nv.nvmlGpmMetricsGet(mg)
            return mg.metrics[0].value / 100.0, mg.metrics[1].value / 100.0
        except Exception:
            return None

    def collect(self):
        nv = self.nvml
        fams = {
            name: GaugeMetricFamily(name, doc, labels=["gpu"])
            for name, doc in (
                (n.GPU_UTILIZATION, "GPU utilisation (fraction of time a kernel ran)"),
                (n.GPU_MEMORY_USED, "GPU memory used"),
                (n.GPU_MEMORY_TOTAL, "GPU memory total"),
                (n.GPU_TEMPERATURE, "GPU temperature"),
                (n.GPU_POWER, "GPU power draw"),
                (n.GPU_SM_ACTIVITY, "SM activity (GPM, Hopper+)"),
                (n.GPU_DRAM_BANDWIDTH, "DRAM bandwidth utilisation (GPM, Hopper+)"),
                (n.GPU_ECC_ERRORS, "Uncorrected ECC errors since the driver loaded (volatile)"),
            )
        }
        for i, h in enumerate(self.handles):
            label = [str(i)]
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                fams[n.GPU_UTILIZATION].add_metric(label, nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
                fams[n.GPU_MEMORY_USED].add_metric(label, mem.used)
                fams[n.GPU_MEMORY_TOTAL].add_metric(label, mem.total)
                fams[n.GPU_TEMPERATURE].add_metric(label, nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                fams[n.GPU_POWER].add_metric(label, nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
            except Exception:
                continue
            try:  # absent where ECC is off or not supported
                ecc = nv.nvmlDeviceGetTotalEccErrors(h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
                fams[n.GPU_ECC_ERRORS].add_metric(label, ecc)
            except Exception:
                pass
            gpm = self._gpm(i, h)
            if gpm is not None:
                fams[n.GPU_SM_ACTIVITY].add_metric(label, gpm[0])
                fams[n.GPU_DRAM_BANDWIDTH].add_metric(label, gpm[1])
        yield from (f for f in fams.values() if f.samples)
