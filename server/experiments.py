"""Live experiments driven by the live join: the bandit's split, and rollback after a promotion.

The joiner (server/join.py) calls `Experiments.on_round(snapshot)` from its thread after each round:
- the split each bandit model's Router draws from is recomputed from the joined feedback per version,
  never per request;
- a promoted version (a newer version became the latest while the one it replaced still serves) is
  watched: once its live accuracy over the quality window is significantly worse than the replaced
  version's, the router pins the replaced version for every route (until the model's config.pbtxt
  changes), the decision is appended to `<model>/decisions.jsonl` (outcome "rolled back") and the
  metrics say so;
- with `routing.promote = "true"` (split or bandit routing; shadow below), a challenger whose live accuracy is
  significantly better than the champion's (the same test, one-sided the other way) is pinned as the
  version answering every request that names none (until the model's config.pbtxt changes), the decision
  is appended (outcome "promoted"), and the promoted version is watched like any promotion;
- with `routing.promote = "true"` under shadow routing, the shadow version is promoted (pinned the same
  way, so shadowing stops) once it is significantly better than the champion on the labelled
  predictions both scored: McNemar's exact test (below).

Split and bandit tests are unpaired: live traffic is not scored by both versions (each request has one answer), so the
learning loop's paired tests (McNemar, paired bootstrap) do not apply. It is the one-sided two-proportion
z-test on per-prediction correctness of each version's joined, labelled predictions (pooled variance),
with at least ROLLBACK_MIN_ROWS labelled predictions per version and p < ROLLBACK_ALPHA; without labels,
the same test on rewards read as success probabilities (clipped to [0, 1] on average). A shadow scores
the champion's requests, so its test is paired: McNemar's exact test, one-sided, on the labelled
predictions both versions scored (the live join's `Snapshot.shadow_pairs`): of the b + c discordant
pairs (b: the champion right and the shadow wrong, c: the other way), P(X >= c) for X ~ Binomial(b + c,
1/2), with at least ROLLBACK_MIN_ROWS paired predictions and p < ROLLBACK_ALPHA. Rewards are not
paired (a reward judges the answer given, the champion's), so a shadow is promoted on labels only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from scipy.special import bdtrc

from onnxgate.server.join import Pairs, Quality, Snapshot
from onnxgate.server.repository import Repository
from onnxgate.server.routing import BANDIT, SHADOW, Router

log = logging.getLogger(__name__)

ROLLBACK_ALPHA = 0.05  # the learning loop's default significance (learning/retrain.py)
ROLLBACK_MIN_ROWS = 30  # labelled predictions per version before anything is concluded
DECISIONS_FILE = "decisions.jsonl"  # a model's decision log: this module's and the learning loop's decisions
ROLLED_BACK = "rolled back"
PROMOTED = "promoted"


def successes(q: Quality | None) -> tuple[float, float]:
    """(successes, failures) of one version's joined feedback: correctness where there are labels, else
    the reward (read as a success probability: clipped to [0, 1] per prediction on average)."""
    if q is None:
        return 0.0, 0.0
    if q.labelled:
        return float(q.correct), float(q.labelled - q.correct)
    if q.rewarded:
        won = min(max(q.reward, 0.0), float(q.rewarded))
        return won, q.rewarded - won
    return 0.0, 0.0


def worse(new: tuple[float, float], old: tuple[float, float]) -> tuple[float, float, float] | None:
    """One-sided two-proportion z-test that `new`'s success rate is below `old`'s, from (successes,
    failures): (p-value, new rate, old rate), or None with fewer than ROLLBACK_MIN_ROWS rows either side."""
    n1, n0 = sum(new), sum(old)
    if n1 < ROLLBACK_MIN_ROWS or n0 < ROLLBACK_MIN_ROWS:
        return None
    p1, p0 = new[0] / n1, old[0] / n0
    pooled = (new[0] + old[0]) / (n1 + n0)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    if se == 0:
        return (0.0 if p1 < p0 else 1.0), p1, p0
    z = (p1 - p0) / se
    return 0.5 * math.erfc(-z / math.sqrt(2)), p1, p0  # P(Z <= z)


def mcnemar_better(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the second of a pair is better: P(X >= c), X ~ Bin(b + c, 1/2)
    (learning/stats.py's mcnemar_exact computes the same tail from the outcome arrays)."""
    # bdtrc(k, n, p) = P(X > k): scipy.special, not scipy.stats, whose import the serving process need not pay
    return float(bdtrc(c - 1, b + c, 0.5)) if b + c else 1.0


class Experiments:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    def on_round(self, snapshot: Snapshot) -> None:
        for served in self.repository.all_served():
            router = served.router
            if router is None:
                continue
            if router.config.kind == BANDIT:
                counts = {v: successes(snapshot.quality.get((served.name, str(v)))) for v in router.versions}
                router.update_bandit(counts)
            # a promoted version is watched, whether it answers by being the latest or by a live promotion's pin
            if router.watch is not None and router.pinned in (None, router.watch[0]):
                self._watch(served.name, router, snapshot)
            if router.config.promote and router.pinned is None:
                if router.config.kind == SHADOW:
                    self._promote_shadow(served.name, router, snapshot)
                else:
                    self._promote(served.name, router, snapshot)

    def _promote(self, name: str, router: Router, snapshot: Snapshot) -> None:
        champion = router.champion()
        if champion is None:
            return
        q_old = snapshot.quality.get((name, str(champion)))
        best: tuple[float, float, float, int] | None = None
        for challenger in router.challengers():
            # better: the champion significantly worse than the challenger
            result = worse(successes(q_old), successes(snapshot.quality.get((name, str(challenger)))))
            if result is not None and result[0] < ROLLBACK_ALPHA and (best is None or result[0] < best[0]):
                best = (*result, challenger)
        if best is None:
            return
        p_value, rate_old, rate_new, new = best
        q_new = snapshot.quality.get((name, str(new)))
        what = "accuracy" if (q_new and q_new.labelled) else "mean reward"
        reason = (
            f"live {what} of version {new} {rate_new:.3f} is significantly better than version {champion}'s "
            f"{rate_old:.3f} (two-proportion z-test, one-sided p={p_value:.2g} < {ROLLBACK_ALPHA}); version "
            f"{new} answers every request naming no version until the model's config changes"
        )
        router.pin(new)
        router.watch = (new, champion)  # the rollback watch applies to the promoted version
        router.stats.promotions += 1
        log.warning("model %s promoted version %s over %s: %s", name, new, champion, reason)
        self._record(name, PROMOTED, reason, new, champion, q_new, q_old, "p_value_better", p_value, rate_new, rate_old)

    def _promote_shadow(self, name: str, router: Router, snapshot: Snapshot) -> None:
        champion, shadow = router.champion(), router.config.shadow
        if champion is None or shadow is None or shadow == champion or shadow not in router.versions:
            return
        paired = snapshot.shadow_pairs.get((name, str(shadow)))
        if paired is None or paired.n < ROLLBACK_MIN_ROWS:
            return
        p_value = mcnemar_better(paired.b, paired.c)
        if p_value >= ROLLBACK_ALPHA:
            return
        rate_new, rate_old = (paired.both + paired.c) / paired.n, (paired.both + paired.b) / paired.n
        reason = (
            f"live accuracy of shadow version {shadow} {rate_new:.3f} is significantly better than version "
            f"{champion}'s {rate_old:.3f} on the {paired.n} labelled predictions both scored (McNemar's exact "
            f"test, b={paired.b} c={paired.c}, one-sided p={p_value:.2g} < {ROLLBACK_ALPHA}); version {shadow} "
            "answers every request naming no version until the model's config changes"
        )
        router.pin(shadow)  # the pinned version is the shadow: shadowing stops (Router._build)
        router.watch = (shadow, champion)
        router.stats.promotions += 1
        log.warning("model %s promoted shadow version %s over %s: %s", name, shadow, champion, reason)
        self._append_decision(name, PROMOTED, reason, shadow, champion, _mcnemar(paired, p_value))

    def _watch(self, name: str, router: Router, snapshot: Snapshot) -> None:
        assert router.watch is not None
        new, old = router.watch
        if new not in router.versions or old not in router.versions:
            router.watch = None  # one of them is no longer served: nothing to return to
            return
        q_new, q_old = (snapshot.quality.get((name, str(v))) for v in (new, old))
        result = worse(successes(q_new), successes(q_old))
        if result is None or result[0] >= ROLLBACK_ALPHA:
            return
        p_value, rate_new, rate_old = result
        what = "accuracy" if (q_new and q_new.labelled) else "mean reward"
        reason = (
            f"live {what} of version {new} {rate_new:.3f} is significantly worse than version {old}'s "
            f"{rate_old:.3f} (two-proportion z-test, one-sided p={p_value:.2g} < {ROLLBACK_ALPHA}); "
            f"version {old} serves as latest until the model's config changes"
        )
        router.pin(old)
        router.watch = None
        router.stats.rollbacks += 1
        router.stats.last_rollback = (str(new), str(old), reason)
        log.warning("model %s rolled back from version %s to %s: %s", name, new, old, reason)
        self._record(name, ROLLED_BACK, reason, new, old, q_new, q_old, "p_value_worse", p_value, rate_new, rate_old)

    def _record(
        self,
        name: str,
        outcome: str,
        reason: str,
        new: int,
        old: int,
        q_new: Quality | None,
        q_old: Quality | None,
        p_key: str,
        p_value: float,
        rate_new: float,
        rate_old: float,
    ) -> None:
        what = "accuracy" if (q_new and q_new.labelled) else "mean reward"
        test = {
            "test": "two_proportion_z",
            "metric": what,
            p_key: p_value,
            "challenger": rate_new,
            "champion": rate_old,
            "n": {str(new): sum(successes(q_new)), str(old): sum(successes(q_old))},
            "alpha": ROLLBACK_ALPHA,
            "min_rows": ROLLBACK_MIN_ROWS,
        }
        self._append_decision(name, outcome, reason, new, old, test)

    def _append_decision(
        self, name: str, outcome: str, reason: str, new: int, old: int, test: dict[str, object]
    ) -> None:
        decision = {
            "model": name,
            "outcome": outcome,
            "reason": reason,
            "champion": str(old),
            "version": str(new),
            "test": test,
            "trigger": "live evidence",
            "at": time.time(),
        }
        try:
            append_decision(self.repository.root / name, decision)
        except OSError as e:  # the decision stands; only its record is lost, and the log says so
            log.error("model %s: the decision (%s) could not be written to %s: %s", name, outcome, DECISIONS_FILE, e)


def _mcnemar(paired: Pairs, p_value: float) -> dict[str, object]:
    """A shadow promotion's test, with the numbers of the others' (rates, p, alpha, min_rows) and its table."""
    return {
        "test": "mcnemar_exact",
        "metric": "accuracy",
        "p_value_better": p_value,
        "challenger": (paired.both + paired.c) / paired.n,
        "champion": (paired.both + paired.b) / paired.n,
        "n": paired.n,
        "b": paired.b,
        "c": paired.c,
        "alpha": ROLLBACK_ALPHA,
        "min_rows": ROLLBACK_MIN_ROWS,
    }


class RoutingCollector(Collector):
    """Routing, shadow and bandit metrics of every served model, read at scrape time."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "onnxgate_route_requests",
            "Requests naming no version, by the version the routing chose and the route",
            labels=["model", "version", "route"],
        )
        share = GaugeMetricFamily(
            "onnxgate_route_traffic_share",
            "The probability each version has of answering a request naming no version",
            labels=["model", "version"],
        )
        runs = CounterMetricFamily(
            "onnxgate_shadow_runs", "Requests a shadow version scored", labels=["model", "version"]
        )
        dropped = CounterMetricFamily(
            "onnxgate_shadow_dropped", "Shadow runs dropped (server busy, or the shadow failed)", labels=["model"]
        )
        disagreement = GaugeMetricFamily(
            "onnxgate_shadow_disagreement_ratio",
            "Share of shadow runs whose primary output differs from the champion's",
            labels=["model", "version"],
        )
        posterior = GaugeMetricFamily(
            "onnxgate_bandit_posterior_mean",
            "Mean of each version's Beta posterior (bandit routing)",
            labels=["model", "version"],
        )
        for served in self.repository.all_served():
            router = served.router
            if router is None:
                continue
            name, stats = served.name, router.stats
            for (version, route), count in sorted(stats.requests.items()):
                requests.add_metric([name, version, route], count)
            for version, p in sorted(router.shares().items()):
                share.add_metric([name, version], p)
            for version, count in sorted(stats.shadow_runs.items()):
                runs.add_metric([name, version], count)
                disagreement.add_metric([name, version], stats.shadow_disagreements[version] / count)
            if router.shadow is not None or stats.shadow_dropped:
                dropped.add_metric([name], stats.shadow_dropped)
            for version, mean in sorted(stats.posterior_mean.items()):
                posterior.add_metric([name, version], mean)
        rollbacks = CounterMetricFamily(
            "onnxgate_rollbacks", "Rollbacks of a promoted version on live evidence", labels=["model"]
        )
        info = GaugeMetricFamily(
            "onnxgate_rollback_info",
            "The latest rollback of each model (value 1): from which version, to which, and why",
            labels=["model", "from", "to", "reason"],
        )
        promotions = CounterMetricFamily(
            "onnxgate_live_promotions",
            "Challengers promoted on live evidence (routing.promote)",
            labels=["model"],
        )
        for served in self.repository.all_served():
            router = served.router
            if router is None:
                continue
            rollbacks.add_metric([served.name], router.stats.rollbacks)
            if router.config.promote or router.stats.promotions:
                promotions.add_metric([served.name], router.stats.promotions)
            if router.stats.last_rollback is not None:
                info.add_metric([served.name, *router.stats.last_rollback], 1)
        yield from (requests, share, runs, dropped, disagreement, posterior, rollbacks, info, promotions)


def append_decision(model_dir: Path, decision: dict[str, object]) -> None:
    """Append one decision to `<model>/decisions.jsonl`: one line, fsynced, so a crash never leaves half a
    record readable. The gateway (rollbacks, live promotions) and the learning loop (learning/decisions.py)
    both write the model's decision log through this."""
    model_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(decision, sort_keys=True, default=str) + "\n"
    with open(model_dir / DECISIONS_FILE, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
