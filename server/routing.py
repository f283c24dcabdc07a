"""Routing per model: which served version answers a request that names none, and with what probability.

Configured in the model-level `config.pbtxt` parameters (Triton's `parameters` map, so Triton-shaped
configs stay valid):

    parameters { key: "routing"              value { string_value: "split" } }   # latest|split|shadow|bandit
    parameters { key: "routing.weights"      value { string_value: "1:0.95,2:0.05" } }  # split
    parameters { key: "routing.shadow"       value { string_value: "2" } }       # shadow: the challenger
    parameters { key: "routing.shadow_rate"  value { string_value: "0.5" } }     # shadow: share scored (1)
    parameters { key: "routing.bandit_floor" value { string_value: "0.05" } }    # bandit: least share (0.05)
    parameters { key: "routing.seed"         value { string_value: "7" } }       # the draws' seed (random)
    parameters { key: "routing.promote"      value { string_value: "true" } }    # promote on live evidence

A request that names a version always gets it (route "explicit"). The choice on the hot path is one
draw against a precomputed cumulative weight table (`RouteTable`): microseconds. The bandit's table is
recomputed from the live join's quality after every join round (`Router.update_bandit`), never per
request. A routing config that is wrong makes the model's load fail with the reason, as any config error.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxgate.server.model import ModelVersion
from onnxgate.server.modelspec import ConfigError
from onnxgate.server.pb import model_config_pb2 as mc

log = logging.getLogger(__name__)

LATEST = "latest"
SPLIT = "split"
SHADOW = "shadow"
BANDIT = "bandit"
EXPLICIT = "explicit"  # logged for a request that named its version
PINNED = "pinned"  # logged while a rollback or a live promotion pins the version (every route collapses to it)
KINDS = (LATEST, SPLIT, SHADOW, BANDIT)
KEYS = (
    "routing",
    "routing.weights",
    "routing.shadow",
    "routing.shadow_rate",
    "routing.bandit_floor",
    "routing.seed",
    "routing.promote",
)
BANDIT_DRAWS = 4000  # Monte Carlo draws per version for P(best): the share's error is ~1/sqrt(4000) = 1.6%


@dataclass(frozen=True)
class RoutingConfig:
    kind: str = LATEST
    weights: tuple[tuple[int, float], ...] = ()  # split: (version, share), shares summing to 1
    shadow: int | None = None
    shadow_rate: float = 1.0
    bandit_floor: float = 0.05
    seed: int | None = None
    promote: bool = False  # split/bandit/shadow: a challenger significantly better on live evidence is pinned


def routing_config(name: str, config: mc.ModelConfig | None) -> RoutingConfig:
    """The routing parameters of a model-level config; ConfigError says which one is wrong and why."""
    if config is None:
        return RoutingConfig()
    params = {
        k: v.string_value.strip() for k, v in config.parameters.items() if k == "routing" or k.startswith("routing.")
    }
    where = f"model {name!r}: config parameter"
    for key in params:
        if key not in KEYS:
            raise ConfigError(f"{where} {key!r} is not a routing parameter; known: {', '.join(KEYS)}")
    kind = params.get("routing", "") or LATEST
    if kind not in KINDS:
        raise ConfigError(f"{where} 'routing' is {kind!r}; expected one of {', '.join(KINDS)}")

    def number(key: str, default: float, low: float, high: float) -> float:
        text = params.get(key)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{where} {key!r} is {text!r}, not a number") from None
        if not low <= value <= high:
            raise ConfigError(f"{where} {key!r} is {value}; it must be within [{low}, {high}]")
        return value

    seed_text = params.get("routing.seed")
    seed = None
    if seed_text:
        try:
            seed = int(seed_text)
        except ValueError:
            raise ConfigError(f"{where} 'routing.seed' is {seed_text!r}, not an integer") from None
    promote_text = params.get("routing.promote", "").lower()
    if promote_text not in ("", "true", "false"):
        raise ConfigError(f"{where} 'routing.promote' is {promote_text!r}; expected 'true' or 'false'")
    if promote_text == "true" and kind not in (SPLIT, BANDIT, SHADOW):
        raise ConfigError(
            f"{where} 'routing.promote' needs routing 'split', 'bandit' or 'shadow' (routing is {kind!r}): a "
            "challenger is compared on the live traffic it answered or scored"
        )
    weights: tuple[tuple[int, float], ...] = ()
    shadow = None
    if kind == SPLIT:
        weights = _weights(where, params.get("routing.weights", ""))
    elif params.get("routing.weights"):
        raise ConfigError(f"{where} 'routing.weights' is only read with routing 'split' (routing is {kind!r})")
    if kind == SHADOW:
        text = params.get("routing.shadow", "")
        if not text.isdigit():
            raise ConfigError(f"{where} 'routing.shadow' must name the shadow version (an integer), got {text!r}")
        shadow = int(text)
    elif params.get("routing.shadow"):
        raise ConfigError(f"{where} 'routing.shadow' is only read with routing 'shadow' (routing is {kind!r})")
    return RoutingConfig(
        kind=kind,
        weights=weights,
        shadow=shadow,
        shadow_rate=number("routing.shadow_rate", 1.0, 0.0, 1.0),
        bandit_floor=number("routing.bandit_floor", 0.05, 0.0, 0.5),
        seed=seed,
        promote=promote_text == "true",
    )


def _weights(where: str, text: str) -> tuple[tuple[int, float], ...]:
    if not text:
        raise ConfigError(f"{where} 'routing.weights' is missing: routing 'split' needs e.g. '1:0.95,2:0.05'")
    out: dict[int, float] = {}
    for entry in text.split(","):
        version, sep, share = entry.strip().partition(":")
        try:
            number, weight = int(version), float(share)
        except ValueError:
            number, weight = -1, -1.0
        if not sep or number < 0 or not weight >= 0 or number in out:
            raise ConfigError(
                f"{where} 'routing.weights' entry {entry.strip()!r} of {text!r}: expected VERSION:WEIGHT, a "
                "version once, a weight >= 0"
            )
        out[number] = weight
    total = sum(out.values())
    if total <= 0:
        raise ConfigError(f"{where} 'routing.weights' {text!r}: the weights sum to 0")
    return tuple((v, w / total) for v, w in sorted(out.items()))  # shares: weights need not sum to 1


def check_versions(name: str, config: RoutingConfig, served: Sequence[int]) -> None:
    """The versions the routing names must be served (the version policy keeps them)."""
    named = [v for v, _ in config.weights] + ([config.shadow] if config.shadow is not None else [])
    missing = sorted(set(named) - set(served))
    if missing:
        raise ConfigError(
            f"model {name!r}: routing {config.kind!r} names version(s) {', '.join(map(str, missing))}, which "
            f"are not served (served: {', '.join(map(str, sorted(served))) or 'none'}; see version_policy)"
        )
    if config.kind == BANDIT and len(served) * config.bandit_floor > 1:
        raise ConfigError(
            f"model {name!r}: routing.bandit_floor {config.bandit_floor} for {len(served)} versions exceeds 1 in all"
        )


@dataclass(frozen=True)
class RouteTable:
    """What a draw picks from: replaced whole (one attribute assignment), never changed in place."""

    route: str
    versions: tuple[ModelVersion, ...]
    cumulative: tuple[float, ...]  # the last is 1.0
    propensities: tuple[float, ...]

    @classmethod
    def of(cls, route: str, versions: Sequence[ModelVersion], shares: Sequence[float]) -> RouteTable:
        total = float(sum(shares))
        props = tuple(s / total for s in shares)
        cumulative = tuple(float(c) for c in np.cumsum(props))
        return cls(route, tuple(versions), (*cumulative[:-1], 1.0), props)


@dataclass
class RouteStats:
    """Counters of one model, kept across reloads (the metrics are counters); the event loop writes them."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (version, route) -> requests
    shadow_runs: Counter[str] = field(default_factory=Counter)  # shadow version -> runs
    shadow_disagreements: Counter[str] = field(default_factory=Counter)
    shadow_dropped: int = 0
    posterior_mean: dict[str, float] = field(default_factory=dict)  # bandit: version -> Beta mean
    rollbacks: int = 0
    last_rollback: tuple[str, str, str] | None = None  # (from, to, reason)
    promotions: int = 0  # live promotions (routing.promote)


class Router:
    """One model's routing: built at each load from its config and served versions."""

    def __init__(
        self,
        name: str,
        config: RoutingConfig,
        versions: Mapping[int, ModelVersion],
        previous: Router | None = None,
        *,
        keep_pin: bool = False,
        promoted: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.versions = dict(versions)
        self.stats: RouteStats = previous.stats if previous is not None else RouteStats()
        same = previous is not None and previous.config == config
        # a seeded generator per process (and per model): reproducible tests, independent models
        self._rng: random.Random = previous._rng if same and previous is not None else random.Random(config.seed)
        self._shadow_rng = random.Random(None if config.seed is None else config.seed + 1)
        # a rollback's version, served as 'latest' until the operator changes the model's config.pbtxt
        self.pinned: int | None = previous.pinned if keep_pin and previous is not None else None
        # (new, replaced): a promotion the live evidence is watching (server/experiments.py), until a
        # rollback or the next promotion
        self.watch: tuple[int, int] | None = promoted or (previous.watch if previous is not None else None)
        self.bandit_weights: dict[int, float] = dict(previous.bandit_weights) if same and previous else {}
        self.shadow: ModelVersion | None = None
        self.table = self._build()

    def _build(self) -> RouteTable:
        c = self.config
        numbers = sorted(self.versions)
        if not numbers:  # nothing loaded: Repository.route answers before drawing
            return RouteTable(LATEST, (), (), ())
        if c.kind == SHADOW and c.shadow is not None:
            self.shadow = self.versions.get(c.shadow)
        if self.pinned in self.versions:  # a rollback or a live promotion: every route serves the pin
            if self.shadow is not None and self.shadow.version == self.pinned:
                self.shadow = None
            return RouteTable.of(PINNED, [self.versions[self.pinned]], [1.0])
        if c.kind == SPLIT:
            pairs = [(self.versions[v], w) for v, w in c.weights if v in self.versions and w > 0]
            if pairs:
                return RouteTable.of(SPLIT, [v for v, _ in pairs], [w for _, w in pairs])
        if c.kind == BANDIT and len(numbers) > 1:
            weights = self.bandit_weights
            known = [weights.get(v) for v in numbers]
            if any(w is None for w in known):  # no evidence yet: every version alike
                shares = [1.0 / len(numbers)] * len(numbers)
            else:
                shares = [float(w) for w in known if w is not None]
            return RouteTable.of(BANDIT, [self.versions[v] for v in numbers], shares)
        chosen = numbers[-1]
        if self.shadow is not None and self.shadow.version == chosen:
            self.shadow = None  # a version never shadows itself
        return RouteTable.of(LATEST, [self.versions[chosen]], [1.0])

    # -- hot path ------------------------------------------------------------------------------------
    def choose(self) -> tuple[ModelVersion, str, float]:
        t = self.table
        if len(t.versions) == 1:
            version, prop = t.versions[0], t.propensities[0]
        else:
            i = bisect.bisect_right(t.cumulative, self._rng.random())
            i = min(i, len(t.versions) - 1)
            version, prop = t.versions[i], t.propensities[i]
        self.stats.requests[(version.version_str, t.route)] += 1
        return version, t.route, prop

    def shadow_for(self, champion: ModelVersion) -> ModelVersion | None:
        """The version to shadow this request with (the share drawn), or None."""
        shadow = self.shadow
        if shadow is None or shadow is champion:
            return None
        rate = self.config.shadow_rate
        if rate < 1.0 and self._shadow_rng.random() >= rate:
            return None
        return shadow

    # -- control (the joiner's thread, the repository's lock) ---------------------------------------
    def shares(self) -> dict[str, float]:
        t = self.table
        return {v.version_str: p for v, p in zip(t.versions, t.propensities, strict=True)}

    def champion(self) -> int | None:
        """The incumbent a challenger must beat: under `split` the version with the largest weight (ties:
        the older), otherwise the newest served version (what `latest` would serve)."""
        if self.config.kind == SPLIT:
            routed = [(w, -v) for v, w in self.config.weights if v in self.versions and w > 0]
            if routed:
                return -max(routed)[1]
        return max(self.versions, default=None)

    def challengers(self) -> list[int]:
        """The versions that answered live traffic next to the champion (split: weight > 0; bandit: all)."""
        champion = self.champion()
        if self.config.kind == SPLIT:
            return [v for v, w in self.config.weights if v in self.versions and w > 0 and v != champion]
        if self.config.kind == BANDIT:
            return [v for v in sorted(self.versions) if v != champion]
        return []

    def pin(self, version: int) -> None:
        self.pinned = version
        self.table = self._build()

    def update_bandit(self, counts: Mapping[int, tuple[float, float]], floor: float | None = None) -> None:
        """Thompson sampling's split from (successes, failures) per version: P(version is best) under
        Beta(1 + s, 1 + f) posteriors by Monte Carlo (seeded), then `floor + (1 - k floor) P(best)` so
        that each of k versions keeps at least the floor."""
        if self.config.kind != BANDIT:
            return
        numbers = sorted(self.versions)
        if len(numbers) < 2:
            return
        floor = self.config.bandit_floor if floor is None else floor
        rng = np.random.default_rng(None if self.config.seed is None else self.config.seed + 2)
        a = np.array([1.0 + counts.get(v, (0.0, 0.0))[0] for v in numbers])
        b = np.array([1.0 + counts.get(v, (0.0, 0.0))[1] for v in numbers])
        draws = rng.beta(a[:, None], b[:, None], size=(len(numbers), BANDIT_DRAWS))
        best = np.bincount(np.argmax(draws, axis=0), minlength=len(numbers)) / BANDIT_DRAWS
        shares = floor + (1.0 - len(numbers) * floor) * best
        self.stats.posterior_mean = {str(v): float(x / (x + y)) for v, x, y in zip(numbers, a, b, strict=True)}
        self.bandit_weights = {v: float(s) for v, s in zip(numbers, shares, strict=True)}
        self.table = self._build()
