"""Tensor parallelism across processes: one per GPU (per process on the CPU), started by the
engine itself, so `inferd serve` and `LLM(...)` need no launcher.

Rank 0 is the engine's own process: it runs the scheduler and, for each step, sends every worker
the step's inputs before running the same `ModelRunner.launch` itself. The workers run that step
on their shard; the collectives inside the model (one all-reduce after attention, one after the
MLP, the embedding's and the head's) keep the ranks in step, and rank 0 broadcasts the sampled
tokens, which a worker's next step may read on the device (pending tokens).

How inputs travel: one `multiprocessing` pipe per worker, carrying a pickled list of `StepSeq`s
(the few fields `launch` reads: the step's tokens, block table, positions). nano-vllm writes into
shared memory and sets an event; rank 0 here launches step N+1 before it waits for step N (the
overlapped engine loop), so a single shared buffer would need an acknowledgement to be rewritten
safely, which a pipe gives for free: it is ordered, it buffers, and its far end closing is how
either side learns the other is gone (a worker exits when rank 0 dies; rank 0 gets a broken pipe
when a worker dies). A decode step's message is a few kilobytes.

A worker that dies must not leave rank 0 waiting forever on a collective: rank 0 checks the
workers before each step and while it waits for a step's tokens (NCCL kernels would otherwise
wait forever on the missing rank), gloo raises when a peer's connection closes, and every
collective has the process group's timeout as the last resort. The error names the rank and its
exit code; the engine then fails like any engine error (the server's /health stops being ready
and the process exits non-zero)."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time

import torch

from inferd.config import EngineConfig
from inferd.engine.model_runner import ModelRunner, StepHandle, release_cuda_graphs
from inferd.layers.distributed import check_no_group, destroy_tensor_parallel, init_tensor_parallel
from inferd.models.config import ModelConfig

log = logging.getLogger("inferd.tensor_parallel")


class WorkerDiedError(RuntimeError):
    pass


def check_tensor_parallel(config: EngineConfig, model_cfg: ModelConfig) -> None:
    """Refuse a size the model cannot be split into. KV heads are split, never replicated: a size
    above the number of KV heads is refused (the 8B and 70B Llama shapes have 8)."""
    tp = config.tensor_parallel_size
    heads = {"num_attention_heads": model_cfg.num_attention_heads, "num_key_value_heads": model_cfg.num_key_value_heads}
    for field, n in heads.items():
        if n % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} does not divide the model's {field} ({n}): "
                f"choose a tensor_parallel_size that divides {n}"
            )
    if tp > 1 and config.device != "cpu":
        count = torch.cuda.device_count()
        first = torch.device(config.device).index or 0
        if first + tp > count:
            raise ValueError(
                f"tensor_parallel_size {tp} needs {tp} GPUs from {config.device}, this host has {count}: "
                "lower tensor_parallel_size or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
            )


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """Rank r runs on the r-th GPU after the configured one."""
    if config.device == "cpu":
        return config
    first = torch.device(config.device).index or 0
    return dataclasses.replace(config, device=f"cuda:{first + rank}")


class _Window:
    """The tokens of a sequence one step reads, indexed as the whole sequence's token list."""

    __slots__ = ("tokens", "offset", "length")

    def __init__(self, tokens: list[int], offset: int, length: int):
        self.tokens, self.offset, self.length = tokens, offset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.tokens[i.start - self.offset : i.stop - self.offset]
        return self.tokens[(i % self.length) - self.offset]


@dataclasses.dataclass(slots=True)
class StepParams:
    """The sampling parameters a step reads on every rank (prompt scoring runs the head, a
    collective, on all of them); sampling itself is rank 0's."""

    prompt_logprobs: object
    top_logprobs: int


@dataclasses.dataclass(slots=True)
class StepSeq:
    """What `ModelRunner.launch` reads of a Sequence, small enough to send every step: a copy
    (the Sequence's fields keep their one writer, on rank 0)."""

    token_ids: _Window
    num_computed_tokens: int
    num_scheduled_tokens: int
    num_prompt_tokens: int
    block_table: list[int]
    pending_row: int | None
    params: StepParams

    @classmethod
    def of(cls, seq, is_prefill: bool) -> StepSeq:
        n = len(seq.token_ids)
        start = seq.num_computed_tokens if is_prefill else n - 1
        # A prefill chunk's window ends one token past the chunk: prompt scoring reads it.
        end = min(start + seq.num_scheduled_tokens + 1, n) if is_prefill else n
        return cls(
            _Window(seq.token_ids[start:end], start, n),
            seq.num_computed_tokens,
            seq.num_scheduled_tokens,
            seq.num_prompt_tokens,
            list(seq.block_table),
            seq.pending_row,
            StepParams(getattr(seq.params, "prompt_logprobs", None), getattr(seq.params, "top_logprobs", 0)),
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def has_pending_token(self) -> bool:
        return self.pending_row is not None


def worker_main(
    rank: int,
    size: int,
    config: EngineConfig,
    model_cfg: ModelConfig,
    max_model_len: int,
    init_method: str,
    conn,
    inherited=(),
    runner_cls=ModelRunner,
):
    """A worker's whole life: join the group, load this rank's shard, run the steps rank 0 sends
    until it sends None or goes away. `inherited`: rank 0's pipe ends a forked worker holds
    copies of, closed so that rank 0's death reaches this worker as the end of its pipe."""
    from inferd.store.source import open_model

    for end in inherited:
        end.close()
    _die_with_parent()
    if config.device == "cpu":
        # A forked child must not enter the OpenMP pool its parent used: it would wait forever
        # for threads that were not forked (the PyTorch DataLoader's workers do the same).
        torch.set_num_threads(1)

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(levelname)s %(name)s: %(message)s")
    config = rank_config(config, rank)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_tensor_parallel(rank, size, init_method, device)
    source = open_model(config.model, config.model_key_file)
    if runner_cls is ModelRunner:
        runner = runner_cls(config, model_cfg, max_model_len, source.iter_tensors(), source.weight_bytes())
    else:
        runner = runner_cls(config, model_cfg, max_model_len, iter(()))
    conn.send("ready")
    prev: StepHandle | None = None
    last_event = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # rank 0 is gone: its half of the group cannot be torn down with it
            os._exit(1)
        if msg is None:
            break
        seqs, is_prefill = msg
        prev = runner.launch(seqs, is_prefill, prev)
        if runner.is_cuda:
            # Host staging buffers are reused every other step: wait for the step before this one.
            event = torch.cuda.Event()
            event.record()
            if last_event is not None:
                last_event.synchronize()
            last_event = event
    if last_event is not None:
        last_event.synchronize()
    release_cuda_graphs(runner)
    destroy_tensor_parallel()


def start_method(device: str) -> str:
    """CUDA cannot be used in a forked child; on the CPU, fork starts a worker in a fraction of
    spawn's time (no second import of torch). INFERD_TP_START_METHOD=spawn runs the CPU with the
    CUDA path's method (the tests of its shutdown)."""
    if device != "cpu":
        return "spawn"
    method = os.environ.get("INFERD_TP_START_METHOD", "fork")
    if method not in ("fork", "spawn"):
        raise ValueError(f"INFERD_TP_START_METHOD={method!r}: use 'fork' or 'spawn'")
    return method


def _die_with_parent() -> None:
    """End this worker when rank 0's process is gone, wherever the worker is blocked (a collective
    waiting for rank 0 would otherwise wait for the group's timeout). Polled, because the kernel's
    PR_SET_PDEATHSIG fires when the parent's *thread* ends, and engines are built in threads."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="inferd-tp-parent-watch", daemon=True).start()


class TensorParallelRunner:
    """Rank 0's `ModelRunner`, which first hands each step to the workers. Everything else
    (the KV cache's size, the sampler) is rank 0's runner's."""

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, max_model_len: int, weights, weight_bytes, runner_cls):
        check_no_group()
        size = config.tensor_parallel_size
        self._dir = tempfile.mkdtemp(prefix="inferd-tp-")
        init_method = f"file://{os.path.join(self._dir, 'rendezvous')}"
        method = start_method(config.device)
        ctx = mp.get_context(method)
        self.workers, self.conns = [], []
        for rank in range(1, size):
            recv, send = ctx.Pipe(duplex=True)
            inherited = [*self.conns, send] if method == "fork" else []
            proc = ctx.Process(
                target=worker_main,
                args=(rank, size, config, model_cfg, max_model_len, init_method, recv, inherited, runner_cls),
                name=f"inferd-tp-{rank}",
                daemon=True,
            )
            proc.start()
            recv.close()
            self.workers.append(proc)
            self.conns.append(send)
        self._closed = False
        self.join_timeout_s = 30.0
        self.runner_device_type = "cpu" if config.device == "cpu" else "cuda"
        atexit.register(self.close)
        try:
            config0 = rank_config(config, 0)
            device = torch.device(config0.device)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            init_tensor_parallel(0, size, init_method, device)
            self.runner = runner_cls(config0, model_cfg, max_model_len, weights, weight_bytes)
            for conn in self.conns:
                self._recv_ready(conn)
        except BaseException as e:
            self.close()
            self._raise_if_dead(e)
            raise
        log.info("tensor parallel: %d ranks ready", size)

    def __getattr__(self, name):
        if name == "runner":  # not built yet
            raise AttributeError(name)
        return getattr(self.runner, name)

    def _recv_ready(self, conn) -> None:
        if conn.recv() != "ready":
            raise RuntimeError("a tensor-parallel worker sent something else than 'ready'")

    def check_workers(self) -> None:
        for rank, proc in enumerate(self.workers, start=1):
            if proc.exitcode is not None:
                raise WorkerDiedError(
                    f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}: "
                    "the engine cannot continue without it (see that rank's log for why)"
                )

    def _raise_if_dead(self, cause: BaseException) -> None:
        # A peer's death shows up on rank 0 as whatever its collective or pipe raised.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                self.check_workers()
            except WorkerDiedError as e:
                raise e from cause
            if not isinstance(cause, (OSError, EOFError, RuntimeError)):
                return
            time.sleep(0.05)

    def launch(self, seqs, is_prefill: bool, prev: StepHandle | None = None) -> StepHandle:
        try:
            self.check_workers()
            msg = ([StepSeq.of(s, is_prefill) for s in seqs], is_prefill)
            for conn in self.conns:
                conn.send(msg)
            return self.runner.launch(seqs, is_prefill, prev)
        except WorkerDiedError:
            raise
        except Exception as e:
            self._raise_if_dead(e)
            raise

    def collect(self, handle: StepHandle):
        if handle.event is not None:
            # Polled, not waited on: a step whose collectives wait for a dead rank never ends.
            while not handle.event.query():
                self.check_workers()
                time.sleep(50e-6)
        return self.runner.collect(handle)

    def close(self) -> None:
        """Stop every rank, at most `join_timeout_s` per worker before it is killed; again is a
        no-op. Rank 0 leaves the group while the workers leave it (NCCL's teardown may wait for
        its peers), after dropping its CUDA graphs (NCCL's teardown waits for those)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        died = any(proc.exitcode not in (0, None) for proc in self.workers)
        runner = self.__dict__.get("runner")
        if runner is not None:
            release_cuda_graphs(runner, wait=not died)
        # A group whose peer died is aborted: a normal teardown would wait for the dead rank.
        destroy_tensor_parallel(abort=died)
        if runner is not None and not died and hasattr(runner, "close"):
            runner.close()  # its KV cache and weights: the card's memory is free for the next engine
        for proc in self.workers:
            proc.join(timeout=self.join_timeout_s)
            if proc.is_alive():
                log.warning("tensor-parallel worker %s (pid %s) did not stop: killing it", proc.name, proc.pid)
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        try:
            os.unlink(os.path.join(self._dir, "rendezvous"))
        except OSError:
            pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


def make_runner(
    config: EngineConfig,
    model_cfg: ModelConfig,
    max_model_len: int,
    weights,
    weight_bytes,
    given_weights: bool,
    runner_cls: type = ModelRunner,
):
    """The engine's runner: a plain `ModelRunner` on one rank. `runner_cls`: a subclass that makes
    its own weights (the benchmarks' random shards, built on each GPU); every rank runs one."""
    check_tensor_parallel(config, model_cfg)
    if config.tensor_parallel_size == 1:
        return runner_cls(config, model_cfg, max_model_len, weights, weight_bytes)
    if given_weights and runner_cls is ModelRunner:
        raise ValueError(
            "tensor_parallel_size > 1 loads the weights from the model directory in every rank: "
            "do not pass weights= (save them to the directory instead)"
        )
    return TensorParallelRunner(config, model_cfg, max_model_len, weights, weight_bytes, runner_cls)
