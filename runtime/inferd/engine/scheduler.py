"""Continuous batching: requests join and leave between steps.

Each step is either a prefill step (prompt chunks of several sequences, at most
max_num_batched_tokens tokens; a long prompt is split over several steps) or a decode step (one
token for every running sequence). When the KV cache runs out during decode, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the front of the queue,
to be recomputed later (its full blocks are usually still in the prefix cache).

Sharing between tenants: a free place in the batch goes to the waiting sequence of the highest
priority class and, within it, of the tenant with the fewest sequences running (counted in
sequences, so one request with n=8 weighs eight); a victim of preemption is taken from the lowest
class and the tenant holding the most. The waiting queue is bounded: a request that would overfill
it is refused (QueueFull) before any of its sequences is queued.
"""

from __future__ import annotations

from collections import Counter, deque

from inferd.config import EngineConfig
from inferd.engine.block_manager import BlockManager
from inferd.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


class QueueFull(Exception):
    """The waiting queue cannot take a request's sequences; nothing of it was queued."""


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int):
        self.max_model_len = max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_waiting = config.max_num_waiting
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.add_all([seq])

    def add_all(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences together, or none of them when the queue has no room."""
        if len(self.waiting) + len(seqs) > self.max_num_waiting:
            raise QueueFull(f"{len(self.waiting)} sequences are waiting (max_num_waiting {self.max_num_waiting})")
        self.waiting.extend(seqs)

    def _running_per_tenant(self) -> Counter:
        return Counter(s.tenant for s in self.running)

    def _next_waiting(self, held: Counter) -> Sequence:
        """The waiting sequence that gets the next place in the batch (see the module docstring);
        `held` counts each tenant's running sequences. Ties go to the earliest in the queue, where
        preempted sequences are put back."""
        return min(self.waiting, key=lambda s: (-s.priority, held[s.tenant]))

    def _victim(self, candidates: list[Sequence] | None = None) -> Sequence:
        """The running sequence (of `candidates`, default all) to preempt: lowest class, then the
        tenant holding the most sequences, then the newest (whose recomputation costs least)."""
        held = self._running_per_tenant()
        order = {id(s): i for i, s in enumerate(self.running)}
        return max(candidates or self.running, key=lambda s: (-s.priority, held[s.tenant], order[id(s)]))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Pick this step's sequences. Returns (sequences, is_prefill)."""
        while True:
            batch = self._schedule_prefill()
            if batch:
                return batch, True
            batch = self._schedule_decode()
            if batch:
                return batch, False
            if all(self._at_max_tokens(s) for s in self.running):
                return [], False  # nothing, or only sequences whose last token ends them
            # Only partially prefilled sequences are left and none fits: free one of them.
            self._preempt(self._victim([s for s in self.running if not self._at_max_tokens(s)]))

    def _schedule_prefill(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        batch: list[Sequence] = []
        bm = self.block_manager
        # Sequences in the middle of a chunked prefill continue first, then new ones are admitted.
        for seq in [s for s in self.running if len(s) - s.num_computed_tokens > 1]:
            if budget == 0:
                break
            chunk = min(len(seq) - seq.num_computed_tokens, budget)
            if not bm.can_allocate(bm.blocks_needed(seq, seq.num_computed_tokens + chunk)):
                break
            bm.grow(seq, seq.num_computed_tokens + chunk)
            seq.num_scheduled_tokens = chunk
            budget -= chunk
            batch.append(seq)
        room = self.waiting and len(self.running) < self.max_num_seqs
        held = self._running_per_tenant() if room else Counter()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting(held)
            if seq.has_pending_token:
                break  # preempted in this very schedule with its last token still on the device
            bm.allocate_prompt(seq)
            chunk = min(len(seq) - seq.num_computed_tokens, budget)
            if not bm.can_allocate(bm.blocks_needed(seq, seq.num_computed_tokens + chunk)):
                bm.free(seq)
                break
            bm.grow(seq, seq.num_computed_tokens + chunk)
            seq.num_scheduled_tokens = chunk
            seq.status = SequenceStatus.RUNNING
            budget -= chunk
            self.waiting.remove(seq)
            self.running.append(seq)
            held[seq.tenant] += 1
            batch.append(seq)
        return batch

    def _at_max_tokens(self, seq: Sequence) -> bool:
        """The engine applies stop rules one step late (overlapped with the next step); a
        sequence that has all its tokens (the last one maybe still pending), or fills the context,
        is not scheduled again meanwhile."""
        return seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len

    def _schedule_decode(self) -> list[Sequence]:
        bm = self.block_manager
        block_size = bm.block_size
        batch: list[Sequence] = []
        for seq in list(self.running):
            n = len(seq.token_ids)
            if seq.status != SequenceStatus.RUNNING or n - seq.num_computed_tokens != 1 or self._at_max_tokens(seq):
                continue
            if n > len(seq.block_table) * block_size:  # the new token starts a block (1 step in block_size)
                while not bm.can_allocate(bm.blocks_needed(seq, n)):
                    victim = self._victim()
                    self._preempt(victim)
                    if victim in batch:  # already given this step's token: it no longer runs
                        batch.remove(victim)
                        victim.num_scheduled_tokens = 0
                    if victim is seq:
                        break
                if seq.status != SequenceStatus.RUNNING:
                    continue  # preempted itself; the blocks it freed may let later ones run
                bm.grow(seq, n)
            seq.num_scheduled_tokens = 1
            batch.append(seq)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def hold_waiting(self) -> deque[Sequence]:
        """Take the waiting sequences aside so that no new one starts (a weight swap drains)."""
        held, self.waiting = self.waiting, deque()
        return held

    def preempt_all(self, held: deque[Sequence]) -> int:
        """Put every running sequence back in the queue, in order, before the `held` ones (a
        weight swap: their K/V came from the old weights). Returns how many were running."""
        running = list(self.running)
        for seq in reversed(running):
            self._preempt(seq)
        self.waiting.extend(s for s in held if not s.is_finished)
        return len(running)

    def advance(self, batch: list[Sequence], complete: list[int]) -> None:
        """Move the sequences of a step that is now launched forward: the tokens it computes
        count as computed, and each row in `complete` (its prompt done) gets a pending token, the
        sampled token the device holds at that row until the engine reads it. The next step can
        be scheduled, and launched, before that happens."""
        rows = {i: j for j, i in enumerate(complete)}
        for i, seq in enumerate(batch):
            if seq.status == SequenceStatus.FINISHED:
                continue  # stopped (or aborted) since it was scheduled: its token is dropped
            self.block_manager.mark_computed(seq, seq.num_scheduled_tokens)
            seq.num_scheduled_tokens = 0
            j = rows.get(i)
            if j is not None:
                seq.append_token(PENDING_TOKEN)
                seq.pending_row = j

    def receive(self, seq: Sequence, row: int, token: int) -> bool:
        """The token sampled at `row` of the step in flight has reached the host: it replaces the
        sequence's pending token. False when the sequence no longer waits for that row (it
        stopped, or was aborted, after the step was scheduled): the token is dropped."""
        if seq.is_finished or seq.pending_row != row:
            return False
        seq.token_ids[-1] = token
        seq.pending_row = None
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        # Stop rules run one step late: the sequence may have been preempted back to the queue
        # by the step scheduled in between.
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
