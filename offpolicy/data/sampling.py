"""Sample strategies: which groups of experiences the buffer hands to the trainer, and which it deletes.

A strategy never sees tensors. The buffer describes each group (all rows sharing a ``group_id``: the K
responses to one task) by a :class:`GroupMeta` and asks ``strategy.select(groups, n, now_version)``; the
strategy answers with a :class:`Selection`: the groups to return (exactly ``n`` rows, or none), the groups
to delete afterwards, and the returned groups to tag ``replayed``. Whole groups only, so group-relative
advantages always see all K responses.

Strategies (``SAMPLE_STRATEGIES``; build one with :func:`make_strategy`):

- ``fifo``: oldest first, each group used once.
- ``staleness(max_staleness)``: fifo over versions ``>= now - max_staleness``; older groups are deleted.
- ``priority(decay, use_count_limit)``: Trinity-RFT's linear-decay replay queue, priority
  ``version - decay * use_count``, highest first; a group is deleted after ``use_count_limit`` uses.
- ``mix(p, window)``: ReMix (arXiv 2507.06892): a fraction ``p`` replayed at random from groups already
  trained on whose version is in ``[now - window, now - 1]``, the rest fresh (never used, newest first).
- ``expert_mix(p)``: a fraction ``p`` drawn at random from expert groups (reused, never deleted), the rest
  policy groups in fifo order.

Only ``expert_mix`` returns expert groups; the others ignore them. All randomness comes from the
strategy's own ``random.Random(seed)``, whose state is in ``state_dict()``; a call that returns nothing
(not enough data yet) leaves that state untouched, so polling does not change later draws.
"""

from __future__ import annotations

import difflib
import inspect
import random
from typing import Any, Iterable, NamedTuple, Protocol, Sequence


class GroupMeta(NamedTuple):
    """What a strategy knows about one group (read from metadata columns, no tensors)."""

    key: str  # the group_id
    seq: int  # insertion order of the group's first row: smaller is older
    size: int  # rows in the group
    version: int  # policy version that generated it (one version per group; ``put`` checks)
    use_count: int  # times the group has been returned by ``sample``
    expert: bool
    batch_index: int = -1  # explorer batch that generated it (one per group; ``put`` checks); -1: unknown


class Selection(NamedTuple):
    """A strategy's answer. ``take`` holds exactly ``n`` rows or is empty (then nothing is returned).

    ``remove`` may name taken groups (used up after this call) and untaken ones (unusable: stale, out of
    the window); the buffer records a removed group as ``used`` if it was ever returned, else ``dropped``.
    """

    take: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    replayed: tuple[str, ...] = ()


class SampleStrategy(Protocol):
    def select(self, groups: Sequence[GroupMeta], n: int, now_version: int) -> Selection: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------- helpers


def oldest_first(groups: Iterable[GroupMeta]) -> list[GroupMeta]:
    return sorted(groups, key=lambda g: g.seq)


def policy_groups(groups: Iterable[GroupMeta]) -> list[GroupMeta]:
    return [g for g in groups if not g.expert]


def keys(groups: Iterable[GroupMeta]) -> tuple[str, ...]:
    return tuple(g.key for g in groups)


def fill(ordered: Sequence[GroupMeta], n: int) -> list[GroupMeta] | None:
    """Walk ``ordered`` and take each group that still fits until exactly ``n`` rows; None if short.

    Groups of unequal sizes (a sample whose reward faulted is split off into a group of its own) can defeat
    the walk although some groups sum to ``n``: then the first such groups in ``ordered`` are taken, and
    None (wait for more data) if there are none. Raises ValueError when groups of one size K hold ``n`` rows
    or more (``n`` is not a multiple of K), which waiting for more data would not fix.
    """
    chosen, rows = [], 0
    if n == 0:
        return chosen
    for g in ordered:
        if rows + g.size <= n:
            chosen.append(g)
            rows += g.size
        if rows == n:
            return chosen
    if sum(g.size for g in ordered) >= n:
        exact = exact_subset(ordered, n)
        if exact is not None:
            return exact
        sizes = sorted({g.size for g in ordered})
        if len(sizes) == 1:
            raise ValueError(f"cannot take exactly n={n} rows from whole groups of sizes {sizes}; "
                             "n must be a sum of group sizes (a multiple of the group size K)")
    return None


def exact_subset(ordered: Sequence[GroupMeta], n: int) -> list[GroupMeta] | None:
    """The groups of ``ordered`` that sum to exactly ``n`` rows, preferring earlier ones (each group is taken
    if the rest can still be made from the groups after it); None if no choice sums to ``n``."""
    mask = (1 << (n + 1)) - 1
    reach = [0] * len(ordered) + [1]  # reach[i]: bit s set if some groups of ordered[i:] sum to s rows
    for i in range(len(ordered) - 1, -1, -1):
        reach[i] = (reach[i + 1] | reach[i + 1] << ordered[i].size) & mask
    if not reach[0] >> n & 1:
        return None
    chosen, left = [], n
    for i, g in enumerate(ordered):
        if left >= g.size and reach[i + 1] >> (left - g.size) & 1:
            chosen.append(g)
            left -= g.size
    return chosen


def nearest(ordered: Sequence[GroupMeta], target: int, limit: int) -> list[GroupMeta]:
    """Take groups in order while each one brings the row count closer to ``target`` (never above ``limit``)."""
    chosen, rows = [], 0
    for g in ordered:
        if rows + g.size <= limit and abs(rows + g.size - target) < abs(rows - target):
            chosen.append(g)
            rows += g.size
    return chosen


# --------------------------------------------------------------------------------------------- base class


class Strategy:
    """Holds the seeded generator and its state; subclasses implement :meth:`_select`."""

    def __init__(self, *, seed: int = 0):
        self.rng = random.Random(seed)

    def select(self, groups: Sequence[GroupMeta], n: int, now_version: int) -> Selection:
        """The buffer's entry point. Groups are sorted oldest first before ``_select`` sees them, so the
        answer does not depend on the order the storage listed them in."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        before = self.rng.getstate()
        try:
            sel = self._select(oldest_first(groups), n, now_version)
        except BaseException:
            self.rng.setstate(before)
            raise
        if not sel.take:
            self.rng.setstate(before)  # nothing returned: the next poll draws as if this one never ran
        return sel

    def _select(self, groups: list[GroupMeta], n: int, now_version: int) -> Selection:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if k != "rng" and not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def _check_fraction(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")


# ------------------------------------------------------------------------------------------- strategies


class Fifo(Strategy):
    """Oldest groups first (insertion order); each group is used once and then deleted."""

    def _select(self, groups, n, now_version):
        chosen = fill(policy_groups(groups), n)
        return Selection(take=keys(chosen), remove=keys(chosen)) if chosen else Selection()


class Staleness(Strategy):
    """Fifo restricted to ``version >= now_version - max_staleness``; each group used once.

    Groups older than the bound are deleted (fate ``dropped``, counted in ``stats().dropped``) rather
    than kept: ``now_version`` only grows, so they can never become eligible again and would only hold
    capacity. The pipeline's admission control keeps the explorer from producing them in the first
    place, so a non-zero ``dropped`` counter means that control is looser than this bound.
    """

    def __init__(self, *, max_staleness: int = 1, seed: int = 0):
        super().__init__(seed=seed)
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness

    def _select(self, groups, n, now_version):
        bound = now_version - self.max_staleness
        policy = policy_groups(groups)
        stale = keys(g for g in policy if g.version < bound)
        chosen = fill([g for g in policy if g.version >= bound], n) or []
        return Selection(take=keys(chosen), remove=keys(chosen) + stale)


class Priority(Strategy):
    """Trinity-RFT's linear-decay replay queue: priority ``version - decay * use_count``, highest first.

    Ties go to the older group. A group is deleted once it has been used ``use_count_limit`` times
    (``None``: never; it then leaves only by eviction). Defaults are Trinity's (decay 2, limit 3).
    """

    def __init__(self, *, decay: float = 2.0, use_count_limit: int | None = 3, seed: int = 0):
        super().__init__(seed=seed)
        if use_count_limit is not None and use_count_limit < 1:
            raise ValueError(f"use_count_limit must be >= 1 or None, got {use_count_limit}")
        self.decay = decay
        self.use_count_limit = use_count_limit

    def priority(self, g: GroupMeta) -> float:
        return g.version - self.decay * g.use_count

    def _select(self, groups, n, now_version):
        ranked = sorted(policy_groups(groups), key=lambda g: -self.priority(g))  # stable: older first on ties
        chosen = fill(ranked, n)
        if not chosen:
            return Selection()
        limit = self.use_count_limit
        used_up = [g for g in chosen if limit is not None and g.use_count + 1 >= limit]
        return Selection(take=keys(chosen), remove=keys(used_up))


class Mix(Strategy):
    """ReMix's mixed batch: about ``p * n`` rows replayed, the rest fresh.

    - fresh: groups never returned before (``use_count == 0``), newest version first ("version == now,
      or the newest available"), oldest first within a version;
    - replay: groups already trained on whose version is in ``[now - window, now - 1]`` (the last
      ``window`` policies, N in the paper), drawn uniformly at random; tagged ``replayed``.

    The replay share is the number of whole groups closest to ``p * n``; while the history holds fewer
    rows (early steps) fresh groups fill the gap. If fresh groups cannot fill the rest, nothing is
    returned (the trainer waits for the explorer rather than over-replaying). Groups stay in the buffer
    after use and are deleted once their version falls out of the window, or at once when ``p == 0``
    (after :meth:`reincarnate`: the historical store is dropped).
    """

    def __init__(self, *, p: float = 0.5, window: int = 2, seed: int = 0):
        super().__init__(seed=seed)
        _check_fraction(p)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.p = p
        self.window = window
        self._reincarnated = False

    def _select(self, groups, n, now_version):
        low = now_version - self.window
        policy = policy_groups(groups)
        expired = keys(g for g in policy if g.version < low or (self.p == 0 and g.use_count > 0))
        live = [g for g in policy if g.version >= low]
        history = [g for g in live if g.use_count > 0 and g.version < now_version]
        fresh = sorted((g for g in live if g.use_count == 0), key=lambda g: -g.version)  # stable: old first
        order, target = self.rng.sample(history, len(history)), round(self.p * n)
        if len({g.size for g in live}) > 1:
            target = min(target, sum(g.size for g in history))  # a short history: fresh groups fill the gap
            replay, rest = _ragged_mix(order, fresh, n, target, max(g.size for g in live))
        else:
            replay = nearest(order, target, n)
            rest = fill(fresh, n - sum(g.size for g in replay))
        if rest is None:
            return Selection(remove=expired)
        return Selection(take=keys(replay + rest), remove=expired, replayed=keys(replay))

    def replay_groups(self, n_groups: int, group_size: int, history_rows: int | None = None) -> int:
        """Groups the next ``select`` replays for a batch of ``n_groups`` groups of ``group_size`` rows
        (when the history holds ``history_rows``), so the explorer can generate just the fresh rest."""
        target, limit = round(self.p * n_groups * group_size), n_groups * group_size
        if history_rows is not None:
            limit = min(limit, history_rows)
        g = 0
        while (g + 1) * group_size <= limit and abs((g + 1) * group_size - target) < abs(g * group_size - target):
            g += 1
        return g

    def reincarnate(self) -> None:
        """ReMix policy reincarnation: replay nothing from now on and drop the history at the next select."""
        self.p = 0.0
        self._reincarnated = True

    @property
    def reincarnated(self) -> bool:
        """Whether :meth:`reincarnate` was called (in this process or in the run a checkpoint restored)."""
        return self._reincarnated

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reincarnated": self.reincarnated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The random state, and whether the run had reincarnated; ``p`` stays this run's setting (a resume
        may change it). A checkpoint from before the flag holds ``p``: 0 there, with a nonzero setting here,
        was a reincarnation."""
        super().load_state_dict(state)
        if state.get("reincarnated", state.get("p") == 0.0 and self.p != 0.0):
            self.reincarnate()


def _ragged_mix(order: list[GroupMeta], fresh: list[GroupMeta], n: int, target: int,
                largest: int) -> tuple[list[GroupMeta], list[GroupMeta] | None]:
    """Mix's replay and fresh groups when groups differ in size (a sample whose reward faulted is a group of
    its own): the replay share closest to ``target`` rows, less than a group away from it, that the fresh
    groups complement to exactly ``n``; ``([], None)`` if there is none."""
    for rows in sorted(range(max(0, target - largest + 1), min(n, target + largest - 1) + 1),
                       key=lambda r: (abs(r - target), r)):
        replay = exact_subset(order, rows)
        if replay is None:
            continue
        try:
            rest = fill(fresh, n - rows)
        except ValueError:
            continue
        if rest is not None:
            return replay, rest
    return [], None


class ExpertMix(Strategy):
    """About ``p * n`` rows from expert groups (``expert=True``, e.g. an SFT set put in the buffer),
    drawn uniformly at random and reused indefinitely (never deleted by this strategy); the rest are
    policy groups in fifo order, each used once. Too few expert rows: policy groups fill the gap."""

    def __init__(self, *, p: float = 0.25, seed: int = 0):
        super().__init__(seed=seed)
        _check_fraction(p)
        self.p = p

    def _select(self, groups, n, now_version):
        experts = [g for g in groups if g.expert]
        expert = nearest(self.rng.sample(experts, len(experts)), round(self.p * n), n)
        policy = fill(policy_groups(groups), n - sum(g.size for g in expert))
        if policy is None:
            return Selection()
        return Selection(take=keys(expert + policy), remove=keys(policy))


# --------------------------------------------------------------------------------------------- registry

SAMPLE_STRATEGIES: dict[str, type] = {
    "fifo": Fifo,
    "staleness": Staleness,
    "priority": Priority,
    "mix": Mix,
    "expert_mix": ExpertMix,
}


def register_strategy(name: str, cls: type) -> type:
    """Add a user strategy class under ``name``; refuses a name that is taken. Returns ``cls``."""
    if name in SAMPLE_STRATEGIES:
        raise ValueError(f"sample strategy {name!r} is already registered; pick another name")
    SAMPLE_STRATEGIES[name] = cls
    return cls


def _hint(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_strategy(name: str, **params: Any) -> SampleStrategy:
    """Build ``SAMPLE_STRATEGIES[name](**params)``, naming any unknown strategy or parameter first."""
    if name not in SAMPLE_STRATEGIES:
        valid = sorted(SAMPLE_STRATEGIES)
        raise ValueError(f"unknown sample strategy {name!r}{_hint(name, valid)}; valid: {valid}")
    cls = SAMPLE_STRATEGIES[name]
    valid = [p.name for p in inspect.signature(cls).parameters.values()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key in params:
        if key not in valid:
            raise ValueError(f"sample strategy {name!r}: unknown parameter {key!r}{_hint(key, valid)}; "
                             f"valid: {valid}")
    return cls(**params)
