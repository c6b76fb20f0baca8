"""``ReplicasBackend``: one engine over N replicas of the same model and flags (``%vllm_load MODEL --replicas N``).

A model that fits on one GPU (or a few) runs fastest on a big allocation as independent copies: tensor parallelism
pays for every token in all-reduces, replicas do not share anything. vLLM's offline API has no data parallelism
(``LLM(data_parallel_size > 1)`` is refused), so this back-end composes other back-ends (each replica is a
``LocalBackend`` here, with its own GPUs or cores) and is itself one back-end of the contract: the ``Engine`` above
it, the magics, the journal and the panel see one engine.

- **Work stealing.** A batch is cut into small shares handed out round-robin; each replica is kept just full
  enough to saturate it (its ``max_num_seqs`` running, one share waiting) and takes the next share as requests
  end, so a faster replica does more. Results keep the prompts' order (the ``Engine`` puts them by index) and are
  journaled as each ends.
- **Streams** go to the least-loaded replica; a chat (a prompt made by the chat template) goes to the replica its
  conversation's beginning hashes to, whose prefix cache holds it.
- **A replica that dies** (its EngineCore killed, out of memory, its job cancelled) loses nothing: the requests it
  had not finished go to the others, each prompt's result is still one; the run's footer says in one line what
  happened. When every replica has died, the rest fail with one line.
- **Replicas as Slurm jobs** (``--slurm "OPTIONS" --replicas N``: one ``SlurmBackend`` each) join as each job's
  server becomes ready: a batch starts on the first, the others take shares as they come; a job that ends leaves,
  and one that is back (requeued, ready again) takes shares again.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..engine.lora import Adapter
from ..engine.requests import PromptRejected, Run, aborted, first_line
from ..errors import EngineDiedError, EngineStartError, VllmNotebookError
from ..prepare import scoped_env
from .base import Backend

#: Requests a replica takes at a time (fewer for a small batch, so every replica gets some).
SHARE = 32
#: Chat prompts whose conversation is remembered (``ReplicasBackend.chat_prompt``).
CHATS_KEPT = 256
#: What a replica runs at once when its own limit is unknown (vLLM's default ``max_num_seqs``).
DEFAULT_RUNNING = 256


class _Share:
    """One replica's part of a run, as a ``Run`` the replica's back-end can serve: its requests under their own
    indices 0..n-1. What the replica puts on ``q`` goes to the run's queue under the run's indices, and tells the
    spread which requests ended."""

    def __init__(self, run: Run, indices: list[int], member: int, spread: _Spread):
        self.indices, self.member, self._spread, self._run = indices, member, spread, run
        self.rids = [run.rids[g] for g in indices]
        self.loras = [run.loras[g] for g in indices]
        self.params = run.params
        self.rid_set = set(self.rids)
        self.open = set(range(len(indices)))  # requests of this share that have not ended
        self.q = self  # the replica's back-end puts (i, output) here
        self.sends_left = 0

    def put(self, item) -> None:
        i, out = item
        if i not in self.open:
            return
        if isinstance(out, BaseException) and not isinstance(out, PromptRejected) and self._spread.lost(self, out):
            return  # the replica died: this request goes to another one (``_Spread.share_done``)
        if getattr(out, "finished", False) and aborted(out) and self._spread.cut(self, self.indices[i]):
            return  # the replica's server ended it (shutting down): it goes to another one, as above
        self._run.q.put((self.indices[i], out))
        if isinstance(out, BaseException) or getattr(out, "finished", False):
            self.open.discard(i)
            made = 0 if isinstance(out, BaseException) else sum(len(c.token_ids) for c in out.outputs)
            self._spread.ended(self, self.indices[i], made)


class _Spread:
    """One run's prompts spread over the live replicas with work stealing (see the module's text)."""

    def __init__(self, backend: ReplicasBackend, items: list, params: Any, run: Run):
        self.b, self.items, self.params, self.run = backend, items, params, run
        self.todo: list[int] = list(range(len(items)))
        self.flying: dict[int, set[int]] = {k: set() for k in range(len(backend.members))}
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.redone: dict[int, int] = {}  # replica index -> its unfinished requests given to the others
        self.recut: set[int] = set()  # requests a replica aborted on its own, redone elsewhere (once each)
        self.shy: set[int] = set()  # replicas that did so: given no more of this run while another serves

    # ------------------------------------------------------------ what the shares report
    def ended(self, share: _Share, g: int, tokens: int = 0) -> None:
        self.flying[share.member].discard(g)
        self.b.carry(share.member, -1)
        self.b.served[share.member] += 1
        self.b.tokens[share.member] += tokens
        self.wake.set()

    def lost(self, share: _Share, exc: BaseException) -> bool:
        """A request's error: True when it is its replica's death (the request is then redone elsewhere)."""
        member = self.b.members[share.member]
        if share.member in self.b.deaths and not member.alive:
            return True  # told once already: each of its requests need not read its log again
        if member.alive and not isinstance(member.translate(exc), EngineDiedError):
            return False
        self.b.died(share.member, exc)
        return True

    def cut(self, share: _Share, g: int) -> bool:
        """Request ``g`` ended aborted though the run did not ask (its replica's server is going: a job cancelled
        or at its time limit answers ``finish_reason="abort"`` before its connections break). True: it is redone
        on another replica, once; an abort that comes again is the request's result."""
        if self.run.stopping or g in self.recut:
            return False
        self.recut.add(g)
        self.shy.add(share.member)
        return True

    def share_done(self, share: _Share) -> None:
        """Every coroutine of ``share`` has returned: what it left open goes back to the front of the queue."""
        left = sorted(share.indices[i] for i in share.open)
        share.open.clear()
        if left:
            for g in left:
                self.flying[share.member].discard(g)
            self.b.carry(share.member, -len(left))
            self.redone[share.member] = self.redone.get(share.member, 0) + len(left)
            self.todo[:0] = left
        self.wake.set()

    # ------------------------------------------------------------ handing out
    def _launch(self, k: int, indices: list[int]) -> None:
        member = self.b.members[k]
        share = _Share(self.run, indices, k, self)
        self.flying[k].update(indices)
        self.b.carry(k, len(indices))
        sends = member.sends([self.items[g] for g in indices], self.params, share)
        share.sends_left = len(sends)
        for j, coro in sends:
            task = asyncio.ensure_future(self._guard(share, j, coro))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _guard(self, share: _Share, j: int, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - a request's error, or the replica's death
            share.put((j, exc))
        finally:
            share.sends_left -= 1
            if share.sends_left == 0:
                self.share_done(share)

    def _pick_one(self, live: list[int]) -> int:
        """The replica for a run of one prompt: a chat's by its conversation's beginning, else the least loaded."""
        chat = self.b.conversation_of(self.items[0])
        if chat is not None:
            return live[int(hashlib.sha256(chat).hexdigest(), 16) % len(live)]
        return min(live, key=lambda k: self.b.load[k])

    async def go(self) -> None:
        try:
            while self.todo or any(self.flying.values()):
                live = [k for k in self.b.live() if k not in self.shy] or self.b.live()
                if not live and not self.b.waiting():
                    self._fail_the_rest()
                    return
                if len(self.items) == 1 and self.todo and live:
                    self._launch(self._pick_one(live), [self.todo.pop(0)])
                share = max(1, min(SHARE, -(-len(self.todo) // (2 * len(live))))) if self.todo and live else 0
                handed = True
                while self.todo and handed:  # round-robin, a share at a time, while someone has room
                    handed = False
                    for k in sorted(live, key=lambda k: self.b.load[k]):
                        if self.todo and self.b.load[k] + min(share, len(self.todo)) <= self.b.room(k):
                            n = min(share, len(self.todo))
                            self._launch(k, self.todo[:n])
                            del self.todo[:n]
                            handed = True
                self.wake.clear()
                try:  # woken by a request's end or a replica's death; every second, a replica that became ready
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            raise
        finally:
            if self.redone:
                self.run.notes.append(self.b.redone_note(self.redone))

    def _fail_the_rest(self) -> None:
        error = EngineDiedError(f"every replica of engine '{self.b.name}' has died "
                                f"({self.b.death_reason()}); run %vllm_load again to start them")
        for g in self.todo:
            self.run.q.put((g, error))
        self.todo.clear()


class ReplicasBackend(Backend):
    """N replicas (back-ends of one kind, one configuration) as one back-end (see the module's text)."""

    kind = "replicas"
    summarised_on_load = True

    def __init__(self, members: Sequence[Backend], envs: Sequence[dict[str, str]], key: tuple = (),
                 log_path: str = "", plan: dict | None = None, places: Sequence[str] = (), how: str = "",
                 start_groups: Sequence[Sequence[int]] = ()):
        self.members = list(members)
        self.how = how  # what the replicas are, for people (else their back-ends' kind)
        self.start_groups = [list(g) for g in start_groups]  # replicas that start together (``start``)
        super().__init__(key, log_path, plan)
        first = self.members[0]  # the replicas are of one kind: they say what the whole is
        self.outlives_kernel, self.holds_devices_here = first.outlives_kernel, first.holds_devices_here
        self.summarised_on_load = first.summarised_on_load
        self.envs = [dict(e) for e in envs]
        self.places = list(places) or [f"replica {k + 1}" for k in range(len(self.members))]
        self.load = [0] * len(self.members)  # requests in flight on each replica, over every run
        self.served = [0] * len(self.members)  # requests each replica has ended
        self.tokens = [0] * len(self.members)  # their output tokens
        self.busy_s = [0.0] * len(self.members)  # seconds each replica had requests in flight
        self._busy_since = [0.0] * len(self.members)
        self.deaths: dict[int, str] = {}  # replica index -> why it died
        self._chats: dict[str, bytes] = {}  # a chat prompt -> its conversation (``chat_prompt``), the latest kept

    # ---------------------------------------------------------------- what the engine is
    def _first(self) -> Backend:
        live = self.live()
        return self.members[live[0] if live else 0]

    def live(self) -> list[int]:
        """The replicas that take requests now."""
        return [k for k, m in enumerate(self.members) if m.alive and m.ready]

    def waiting(self) -> list[int]:
        """The replicas that will take requests once ready (a job in the queue, or loading)."""
        return [k for k, m in enumerate(self.members) if m.alive and not m.ready]

    @property
    def alive(self) -> bool:
        return any(m.alive for m in self.members)

    @property
    def ready(self) -> bool:
        return bool(self.live())

    @property
    def facts(self) -> dict[str, Any]:
        """A serving replica's facts (they share one configuration), with what was set on the whole."""
        return {**self._first().facts, **self.__dict__.get("_set_facts", {}), "replicas": len(self.members)}

    @facts.setter
    def facts(self, value: dict) -> None:  # what differs from the replicas' own facts is kept (a Hub id for a path)
        own = self._first().facts if self.__dict__.get("members") else {}
        kept = self.__dict__.setdefault("_set_facts", {})
        kept.update({k: v for k, v in value.items() if own.get(k) != v and k != "replicas"})

    @property
    def model(self) -> str:
        return str(self.facts.get("model") or self.members[0].model)

    @property
    def tokenizer(self):
        return self._first().tokenizer

    def state(self) -> str | None:
        live, waiting = len(self.live()), len(self.waiting())
        if live == len(self.members) or not (live or waiting):
            return None
        return f"{live} of {len(self.members)} replicas serving" + (f", {waiting} starting" if waiting else "")

    def place(self) -> str:
        kind = self.how or self.members[0].kind
        return f"{len(self.members)} replicas" + (f" ({kind})" if kind != "local" else "")

    def room(self, k: int) -> int:
        """Requests replica ``k`` takes at once: what it runs, and a share waiting behind them."""
        running = self.members[k].facts.get("max_num_seqs") or DEFAULT_RUNNING
        return int(running) + SHARE

    def rows(self) -> list[tuple[str, Any]]:
        rows = self._first().rows()
        state = {k: self._state_of(k) for k in range(len(self.members))}
        rows.insert(1, ("replicas", "; ".join(f"{self.places[k]} ({state[k]})" for k in range(len(self.members)))))
        return rows

    def title(self) -> str:
        return f"vLLM engine, {len(self.members)} replicas"

    def parts(self) -> list[dict[str, Any]]:
        """Each replica for ``%vllm_status``: where, state, requests in flight and ended, and its log."""
        return [{"replica": k + 1, "where": self.places[k], "state": self._state_of(k),
                 "in flight": self.load[k], "served": self.served[k], "tokens/s": self.tokens_per_s(k),
                 "log": m.log_path}
                for k, m in enumerate(self.members)]

    def carry(self, k: int, n: int) -> None:
        """Replica ``k`` takes ``n`` more requests (fewer when negative); its busy time counts while it has any."""
        before, self.load[k] = self.load[k], self.load[k] + n
        if before <= 0 < self.load[k]:
            self._busy_since[k] = time.monotonic()
        elif before > 0 >= self.load[k]:
            self.busy_s[k] += time.monotonic() - self._busy_since[k]

    def tokens_per_s(self, k: int) -> int | None:
        """Replica ``k``'s output tokens a second while it had requests (None before it has served any)."""
        busy = self.busy_s[k] + (time.monotonic() - self._busy_since[k] if self.load[k] > 0 else 0.0)
        return round(self.tokens[k] / busy) if self.tokens[k] and busy > 0 else None

    def _state_of(self, k: int) -> str:
        m = self.members[k]
        if m.alive and m.ready:
            return "serving"
        if m.alive:
            return m.state() or "starting"
        return f"died ({self.deaths.get(k) or m.state() or 'stopped'})"

    # ---------------------------------------------------------------- start
    def start(self, progress: Callable[[str, float], None] | None = None) -> None:
        """Start the replicas: the groups of ``start_groups`` at once (replicas on nodes or cards of their own),
        each group's one after another (on a shared card each one's memory check must see the others' memory
        taken; in this process each starts in its own environment). If one fails, or Ctrl-C comes, those started
        are stopped and the error says which replica."""
        n = len(self.members)
        for k, member in enumerate(self.members):
            member.loop, member.name = self.loop, f"{self.name}[{k + 1}]"
        started: list[int] = []
        failed: list[tuple[int, BaseException]] = []
        give_up = threading.Event()
        changed = threading.Event()  # a group ended or failed: the waiting thread looks at once
        ended: list[int] = []
        t0 = time.monotonic()

        def start_group(group: list[int]) -> None:
            try:
                start_members(group)
            finally:
                ended.append(1)
                changed.set()

        def start_members(group: list[int]) -> None:
            for k in group:
                if give_up.is_set():
                    return
                report = None
                if progress is not None:
                    def report(phase: str, seconds: float, k: int = k) -> None:
                        progress(f"replica {k + 1} of {n} ({self.places[k]}): {phase}", time.monotonic() - t0)
                try:
                    with scoped_env(self.envs[k]):
                        self.members[k].start(report)
                except BaseException as exc:  # noqa: BLE001 - said below, once the others are stopped
                    failed.append((k, exc))
                    give_up.set()
                    return
                started.append(k)

        groups = [list(g) for g in self.start_groups] or [list(range(n))]
        if len(groups) == 1:
            start_members(groups[0])  # in this thread: Ctrl-C reaches the replica's own start
        else:
            threads = [threading.Thread(target=start_group, args=(g,), daemon=True,
                                        name=f"vllm-notebook:{self.name}:start") for g in groups]
            for t in threads:
                t.start()
            try:
                while len(ended) < len(threads):
                    if give_up.is_set():  # one failed: the others need not finish loading
                        for m in self.members:
                            m.abandon_start()
                    changed.wait(1.0)  # a bounded wait: Ctrl-C is seen within it on any Python
                    changed.clear()
                for t in threads:
                    t.join()
            except KeyboardInterrupt:
                give_up.set()
                for m in self.members:
                    m.abandon_start()
                for t in threads:
                    t.join()
                failed.insert(0, (-1, VllmNotebookError("load interrupted")))
        if failed:
            for k in reversed(started):
                self.members[k].close()
                self.members[k].stop()
            k, exc = failed[0]
            if k < 0 or isinstance(exc, KeyboardInterrupt):
                raise VllmNotebookError(f"load interrupted; the {len(started)} replica(s) started were stopped") \
                    from None
            raise EngineStartError(f"replica {k + 1} of {n} ({self.places[k]}) failed to start: "
                                   f"{first_line(exc) if not isinstance(exc, VllmNotebookError) else exc}") from None
        first = self.members[0]
        self.adapters, self.vllm_version = first.adapters, first.vllm_version
        self.load_seconds = time.monotonic() - t0

    # ---------------------------------------------------------------- deaths
    def died(self, k: int, exc: BaseException) -> None:
        if k not in self.deaths:
            self.deaths[k] = first_line(self.members[k].translate(exc)) or type(exc).__name__

    def death_reason(self) -> str:
        return "; ".join(f"{self.places[k]}: {why}" for k, why in sorted(self.deaths.items())) or "stopped"

    def redone_note(self, redone: dict[int, int]) -> str:
        parts = []
        for k, n in sorted(redone.items()):
            m = self.members[k]
            what = "died ({})".format(_short(self.deaths.get(k) or m.state() or "stopped")) \
                if k in self.deaths or not m.alive else "aborted requests on its own"
            parts.append(f"replica {k + 1} ({self.places[k]}) {what}: its {n:,} unfinished request(s) went to the "
                         f"other replicas")
        return "; ".join(parts)

    def check_usable(self) -> None:
        """One replica taking requests is enough; before that (jobs in the queue), wait for the first as one
        engine would (``check_usable`` of a waiting replica: its progress line, Ctrl-C, ``--no-wait``)."""
        while not self.live():
            waiting = self.waiting()
            if not waiting:
                raise EngineDiedError(f"every replica of engine '{self.name}' has died ({self.death_reason()}); "
                                      f"run %vllm_load again to start them")
            try:
                self.members[waiting[0]].check_usable()
            except EngineDiedError:
                continue  # that one will not come: the next
            if not self.live():
                time.sleep(0.2)

    def translate(self, exc: BaseException) -> BaseException:
        return self._first().translate(exc)

    # ---------------------------------------------------------------- sampling and prompts (one configuration)
    def sampling(self, base: Any = None, overrides: dict[str, Any] | None = None) -> Any:
        return self._first().sampling(base, overrides)

    def default_sampling(self) -> dict[str, Any]:
        return self._first().default_sampling()

    def chat_prompt(self, messages: Sequence[dict]) -> dict:
        """The model's prompt for ``messages``, noted with its conversation (its system prompt and first message,
        which every later turn repeats), so that each turn goes to the replica whose prefix cache holds it."""
        prompt = self._first().chat_prompt(messages)
        opening = [m for m in messages if m.get("role") == "system"][:1] + \
            [m for m in messages if m.get("role") == "user"][:1]
        key = _prompt_key(prompt)
        if key is not None:
            self._chats[key] = repr([(m.get("role"), m.get("content")) for m in opening]).encode()
            while len(self._chats) > CHATS_KEPT:
                self._chats.pop(next(iter(self._chats)))
        return prompt

    def conversation_of(self, prompt) -> bytes | None:
        """The conversation a chat prompt belongs to (from ``chat_prompt``), or None."""
        key = _prompt_key(prompt)
        return self._chats.get(key) if key is not None else None

    def sampling_record(self, params: Any) -> dict[str, Any]:
        return self._first().sampling_record(params)

    def identity(self) -> dict[str, Any]:
        return {**self._first().identity(), "replicas": len(self.members)}

    def where(self) -> dict[str, Any]:
        return {**self.members[0].where(), "replicas": list(self.places)}

    # ---------------------------------------------------------------- requests
    def prepare(self, params: Any, stream: bool) -> Any:
        return self._first().prepare(params, stream)

    def sends(self, items: list, params: Any, run: Run) -> list[tuple[int, Any]]:
        return [(0, _Spread(self, list(items), params, run).go())]

    async def request(self, i: int, prompt, params, rid: str, q: queue.Queue, lora: Adapter | None = None) -> Any:
        live = self.live()
        if not live:  # on the event loop: no waiting here (``check_usable`` waits, before a run)
            raise EngineStartError(f"no replica of engine '{self.name}' is ready") if self.waiting() else \
                EngineDiedError(f"every replica of engine '{self.name}' has died ({self.death_reason()})")
        k = min(live, key=lambda k: self.load[k])
        return await self.members[k].request(i, prompt, params, rid, q, lora)

    def abort(self, run: Run, pending: list[str]) -> None:
        for k in self.live():
            self.members[k].abort(run, pending)

    def token_ids(self, text: str, special: bool = True) -> list[int]:
        return self._first().token_ids(text, special)

    def tokens_in_flight(self, run: Run) -> int | None:
        counts = [self.members[k].tokens_in_flight(run) for k in self.live()]
        return None if any(c is None for c in counts) else sum(counts)

    def refresh_usage(self) -> None:
        for k in self.live():
            self.members[k].refresh_usage()
        self.usage = self._first().usage

    async def _each(self, call: Callable[[Backend], Any]) -> None:
        """``await call(replica)`` for every serving replica, one after another."""
        for k in self.live():
            await call(self.members[k])

    async def add_lora(self, adapter: Adapter) -> None:
        await self._each(lambda m: m.add_lora(adapter))

    async def remove_lora(self, adapter: Adapter) -> None:
        await self._each(lambda m: m.remove_lora(adapter))

    # ---------------------------------------------------------------- sleep mode
    def can_sleep(self) -> bool:
        return all(self.members[k].can_sleep() for k in self.live())

    async def sleep(self, level: int) -> None:
        await self._each(lambda m: m.sleep(level))

    async def wake(self, level: int) -> None:
        await self._each(lambda m: m.wake(level))

    # ---------------------------------------------------------------- stop
    def close(self) -> None:
        for m in self.members:
            m.close()

    def stop(self) -> str:
        for m in self.members:
            m.stop()
        return f"unloaded engine '{self.name}' ({self.model}, {len(self.members)} replicas)"


def _prompt_key(prompt) -> str | None:
    """A chat prompt's content, to find its conversation again (None for a plain prompt)."""
    if not isinstance(prompt, dict):
        return None
    ids = prompt.get("prompt_token_ids")
    return repr(list(ids)) if ids else repr(prompt.get("prompt") or prompt.get("messages"))


def _short(why: str) -> str:
    return why if len(why) <= 120 else why[:117] + "…"
