"""The level-triggered reconciler: per tenant, compare the applied revision with what exists, and act.

Every ``BULKHEAD_RECONCILE_SECONDS`` (default 30) a beat tick picks the tenants whose ``next_run_at`` has
come (mode monitor or autocorrect) and queues one run each. A run:

1. takes the tenant's claim (a conditional update with a lease; an apply holds the same claim), so one
   run per tenant happens at a time and a second one simply skips;
2. parses the target revision, observes the tenant's resources from the database and computes the drift;
3. in ``autocorrect`` mode executes the plan steps of the drifted resources (never more than the flap
   breaker allows per resource and window; a resource with an operation in flight is left alone);
4. writes the conditions Ready, Drifted, Degraded and Flapping with ``observedRevision`` and reasons, and
   the next run time: the interval with jitter after a success, an exponential backoff (capped) after a
   failure.

Only the clock starts runs: writing status never triggers one (there are no signals on these rows).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from compute.compartments import NetworkRepair
from compute.desired import observe, services
from compute.desired.document import (
    DesiredResource,
    DocumentError,
    TenantConfig,
    ValidationIssue,
    network_key,
)
from compute.desired.flapping import FlapBreaker
from compute.desired.models import DesiredRevision, DesiredState, ReconcileMode, ResourceCorrection
from compute.desired.planning import DriftItem, FieldChange, compute_plan, detect_drift
from portal import events
from tenants import audit
from tenants.actors import Actor

log = logging.getLogger(__name__)

ACTIVE_MODES = (ReconcileMode.MONITOR, ReconcileMode.AUTOCORRECT)


def _setting(name: str, default: float) -> float:
    value: Any = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name, default)
    return float(value)


def interval_seconds() -> float:
    """The reconcile interval (``BULKHEAD_RECONCILE_SECONDS``, default 30)."""
    return _setting("BULKHEAD_RECONCILE_SECONDS", 30)


def max_backoff_seconds() -> float:
    return _setting("BULKHEAD_RECONCILE_MAX_BACKOFF_SECONDS", 600)


def breaker() -> FlapBreaker:
    """After ``BULKHEAD_FLAP_MAX_CORRECTIONS`` (3) corrections in ``BULKHEAD_FLAP_WINDOW_SECONDS`` (600)."""
    return FlapBreaker(
        int(_setting("BULKHEAD_FLAP_MAX_CORRECTIONS", 3)), int(_setting("BULKHEAD_FLAP_WINDOW_SECONDS", 600))
    )


def next_run_after_success(now: datetime, interval: float | None = None) -> datetime:
    """Now plus the interval minus up to 20% jitter: tenants spread out, and never later than one interval."""
    interval = interval_seconds() if interval is None else interval
    return now + timedelta(seconds=interval * random.uniform(0.8, 1.0))  # noqa: S311 - jitter


def backoff_seconds(failures: int, interval: float | None = None, cap: float | None = None) -> float:
    """interval * 2^(failures-1), capped, with up to 20% jitter below."""
    interval = interval_seconds() if interval is None else interval
    cap = max_backoff_seconds() if cap is None else cap
    delay = min(cap, interval * (2 ** max(0, failures - 1)))
    return delay * random.uniform(0.8, 1.0)  # noqa: S311 - jitter


# --------------------------------------------------------------------------------------------------------
# Scheduling


def due_tenants(now: datetime | None = None, limit: int = 1000) -> list[Any]:
    """Tenants whose run is due: active mode, next_run_at passed (or never set), nobody holding the claim.

    Each picked tenant's next_run_at is pushed one interval ahead with a conditional update, so a tick
    that comes before the run happened does not queue it twice.
    """
    now = now or timezone.now()
    interval = interval_seconds()
    candidates = list(
        DesiredState.objects.filter(mode__in=ACTIVE_MODES)
        .filter(Q(next_run_at__isnull=True) | Q(next_run_at__lte=now))
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .values_list("tenant_id", "next_run_at")[:limit]
    )
    picked = []
    for tenant_id, next_run_at in candidates:
        if DesiredState.objects.filter(tenant_id=tenant_id, next_run_at=next_run_at).update(
            next_run_at=now + timedelta(seconds=interval)
        ):
            picked.append(tenant_id)
    return picked


# --------------------------------------------------------------------------------------------------------
# One run

# Revisions are immutable: their parse (schema and semantic checks) is cached by id; images are still
# resolved on every run, since what a name:tag points at (or whether it is visible) can change.
_PARSED: dict[tuple[Any, int], TenantConfig] = {}
_PARSED_MAX = 2048


def config_of(tenant_id: Any, number: int) -> TenantConfig:
    """Revision ``number`` of the tenant, with image ids resolved now; raises InvalidDocument like
    parse_for_tenant. The parse is cached by (tenant, number): numbers are never reused, texts never
    change (the database refuses to), so a run reads no revision row once it has seen it."""
    parsed = _PARSED.get((tenant_id, number))
    if parsed is None:
        revision = DesiredRevision.objects.get(tenant_id=tenant_id, number=number)
        parsed = services.parse_for_tenant(tenant_id, revision.text, check_images=False)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[(tenant_id, number)] = parsed
    images = services.TenantImages(tenant_id)
    images.prefetch(workload.image for workload in parsed.workloads)
    workloads = []
    missing = []
    for index, workload in enumerate(parsed.workloads):
        image_id = images(workload.image)
        if image_id is None:
            missing.append(
                ValidationIssue(
                    f"spec.workloads[{index}].image",
                    parsed.lines.get(f"workload/{workload.name}"),
                    f"image not found: {workload.image!r}",
                )
            )
        workloads.append(replace(workload, image_id=image_id))
    if missing:
        raise services.InvalidDocument(DocumentError(missing))
    return replace(parsed, workloads=tuple(workloads))


def _condition(
    previous: Iterable[dict[str, Any]],
    kind: str,
    status: str,
    reason: str,
    message: str,
    revision: int | None,
    now: datetime,
) -> dict[str, Any]:
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now.isoformat()
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedRevision": revision,
        "lastTransitionTime": since,
    }


def _describe(items: list[DriftItem]) -> str:
    return "; ".join(f"{item.key} {item.kind}" for item in items[:10]) + (
        f" (and {len(items) - 10} more)" if len(items) > 10 else ""
    )


def reconcile_tenant(tenant_id: Any, *, now: datetime | None = None) -> dict[str, Any]:
    """One reconciler run for one tenant (see the module docstring); returns what it saw and did."""
    owner = services.new_owner("reconcile")
    interval = interval_seconds()
    if not services.claim(tenant_id, owner, lease_seconds=max(60.0, 4 * interval)):
        return {"skipped": "another run or an apply holds this tenant"}
    started = time.monotonic()
    try:
        state = DesiredState.objects.select_related("tenant").get(tenant_id=tenant_id)
        if state.mode not in ACTIVE_MODES:
            return {"skipped": f"mode is {state.mode}"}
        try:
            result = _run(state, now or timezone.now())
        except Exception as error:
            _record_failure(state, error, now or timezone.now(), started)
            raise
        return result
    finally:
        services.release(tenant_id, owner)


def _record_failure(state: DesiredState, error: Exception, now: datetime, started: float) -> None:
    failures = state.failures + 1
    message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
    conditions = [c for c in state.conditions if c.get("type") != "Degraded"]
    conditions.append(
        _condition(state.conditions, "Degraded", "True", "ReconcileFailed", str(message)[:1000], None, now)
    )
    DesiredState.objects.filter(pk=state.pk).update(
        failures=failures,
        last_error=str(message)[:4000],
        last_run_at=now,
        last_duration_ms=int((time.monotonic() - started) * 1000),
        conditions=conditions,
        next_run_at=now + timedelta(seconds=backoff_seconds(failures)),
    )
    log.warning("reconcile of tenant %s failed (%d in a row): %s", state.tenant_id, failures, message)


def _run(state: DesiredState, now: datetime) -> dict[str, Any]:
    tenant = state.tenant
    revision_number = state.target_revision
    started = time.monotonic()
    if revision_number is None:
        conditions = [
            _condition(
                state.conditions,
                "Ready",
                "Unknown",
                "NoRevisionApplied",
                "Apply a revision first.",
                None,
                now,
            ),
        ]
        _store(state, now, started, conditions, [], None, {})
        return {"drift": [], "corrected": [], "revision": None}
    config = config_of(tenant.pk, revision_number)
    desired: list[DesiredResource] = config.resources()
    observed = observe.observed_resources(tenant)
    managed_networks = any(r.kind == "network" and r.managed for r in observed)
    repairs = _host_repairs(state, now) if managed_networks else []
    drift = sorted(
        [*detect_drift(desired, observed), *repairs],
        key=lambda item: (item.resource_kind != "network", item.key),
    )

    corrected: list[dict[str, Any]] = []
    flapping: list[str] = []
    failed: list[dict[str, Any]] = []
    if drift and state.mode == ReconcileMode.AUTOCORRECT:
        corrected, flapping, failed = _correct(
            state, revision_number, desired, observed, drift, config.prune, now, config.prune_volumes
        )
    _announce_flapping(state, flapping, revision_number)

    degraded_by_key = {
        r.key: f"is {r.status['runtime_state']}"
        + (f": {r.status['message']}" if r.status.get("message") else "")
        for r in observed
        if r.kind == "workload" and r.managed and r.status.get("runtime_state") in ("failed", "unknown")
    }
    degraded_by_key.update({f["key"]: f"correction failed: {f['detail']}" for f in failed})
    degraded_reasons = [f"{key} {why}" for key, why in degraded_by_key.items()]

    pending = [item for item in drift if item.kind != "repaired"]
    if not pending:
        ready = (
            ("True", "Corrected", f"Restored on the host: {_describe(drift)}")
            if drift
            else ("True", "UpToDate", f"Resources match revision {revision_number}.")
        )
    elif corrected:
        ready = ("False", "Correcting", f"Correcting: {_describe(pending)}")
    else:
        ready = ("False", "Drifted", _describe(pending))
    conditions = [
        _condition(state.conditions, "Ready", *ready, revision_number, now),
        _condition(
            state.conditions,
            "Drifted",
            "True" if drift else "False",
            "DriftDetected" if drift else "NoDrift",
            _describe(drift) if drift else "",
            revision_number,
            now,
        ),
        _condition(
            state.conditions,
            "Degraded",
            "True" if degraded_reasons else "False",
            "ResourcesUnhealthy" if degraded_reasons else "Healthy",
            "; ".join(degraded_reasons)[:1000],
            revision_number,
            now,
        ),
        _condition(
            state.conditions,
            "Flapping",
            "True" if flapping else "False",
            "TooManyCorrections" if flapping else "Stable",
            (
                f"{', '.join(flapping)} keep changing back; not corrected until the window passes"
                if flapping
                else ""
            ),
            revision_number,
            now,
        ),
    ]
    per_resource = resource_conditions(
        [r.key for r in desired] + [r.key for r in observed if r.managed],
        drift,
        degraded_by_key,
        set(flapping),
        {c["key"] for c in corrected},
        revision_number,
    )
    drift_json = [item.to_dict() for item in drift]
    _store(state, now, started, conditions, drift_json, revision_number, per_resource)
    return {
        "revision": revision_number,
        "drift": drift_json,
        "corrected": corrected,
        "flapping": flapping,
        "failed": failed,
    }


def _unhealthy(status: dict[str, Any]) -> str:
    message = status.get("message")
    return f"is {status['runtime_state']}" + (f": {message}" if message else "")


def resource_conditions(
    keys: Iterable[str],
    drift: Iterable[DriftItem],
    degraded: dict[str, str],
    flapping: set[str],
    correcting: set[str],
    revision: int,
) -> dict[str, dict[str, Any]]:
    """Per managed resource: Ready, Drifted, Degraded and Flapping ("True"/"False") with one reason.

    Kept compact (one small dict per resource, the reason only where something is wrong): a tenant may
    have a thousand resources and this is written on every run.
    """
    drift_by_key = {item.key: item for item in drift}
    result: dict[str, dict[str, Any]] = {}
    for key in sorted(set(keys) | set(drift_by_key)):
        item = drift_by_key.get(key)
        pending = item is not None and item.kind != "repaired"
        entry: dict[str, Any] = {
            "Ready": "False" if pending or key in degraded else "True",
            "Drifted": "True" if item is not None else "False",
            "Degraded": "True" if key in degraded else "False",
            "Flapping": "True" if key in flapping else "False",
            "observedRevision": revision,
        }
        if key in flapping:
            entry["reason"] = "TooManyCorrections"
        elif key in degraded:
            entry["reason"], entry["message"] = "Unhealthy", degraded[key]
        elif item is not None:
            entry["reason"] = "Correcting" if key in correcting else f"Drift{item.kind.capitalize()}"
        result[key] = entry
    return result


def _host_repairs(state: DesiredState, now: datetime) -> list[DriftItem]:
    """Managed networks whose host-level pieces a host agent restored since the last run, as drift."""
    since = state.last_run_at or now - timedelta(seconds=interval_seconds())
    rows = (
        NetworkRepair.objects.filter(
            compartment__tenant_id=state.tenant_id,
            compartment__managed_revision__isnull=False,
            at__gt=since,
        )
        .select_related("compartment", "host")
        .order_by("at")
    )
    changes: dict[str, list[FieldChange]] = {}
    for row in rows:
        for detail in row.details:
            changes.setdefault(network_key(row.compartment.name), []).append(
                FieldChange(f"host/{row.host.name}", str(detail), "restored by the host agent")
            )
    return [DriftItem(key, "repaired", tuple(found), "network") for key, found in sorted(changes.items())]


def _announce_flapping(state: DesiredState, flapping: list[str], revision: int) -> None:
    """An audit entry and an event for each resource that has just started flapping (not every run)."""
    before = {
        key for key, entry in (state.resource_conditions or {}).items() if entry.get("Flapping") == "True"
    }
    for key in sorted(set(flapping) - before):
        details = {"key": key, "revision": revision, "window_seconds": breaker().window_seconds}
        audit.record(
            Actor.system("reconciler"), "desired.flapping", state, tenant=state.tenant, details=details
        )
        events.publish(state.tenant_id, {"type": "desired", "tenant": str(state.tenant_id), "flapping": key})


def _store(
    state: DesiredState,
    now: datetime,
    started: float,
    conditions: list[dict[str, Any]],
    drift: list[dict[str, Any]],
    revision: int | None,
    per_resource: dict[str, dict[str, Any]],
) -> None:
    DesiredState.objects.filter(pk=state.pk).update(
        conditions=conditions,
        drift=drift,
        resource_conditions=per_resource,
        observed_revision=revision,
        last_run_at=now,
        last_success_at=now,
        last_duration_ms=int((time.monotonic() - started) * 1000),
        failures=0,
        last_error="",
        next_run_at=next_run_after_success(now),
    )


def _correct(
    state: DesiredState,
    revision: int,
    desired: list[DesiredResource],
    observed: list[Any],
    drift: list[DriftItem],
    prune: bool,
    now: datetime,
    prune_volumes: bool = False,
) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """Execute the plan steps of the drifted resources the flap breaker lets through."""
    flap = breaker()
    ResourceCorrection.objects.filter(
        tenant=state.tenant, at__lt=now - timedelta(seconds=flap.window_seconds)
    ).delete()
    history: dict[str, list[datetime]] = {}
    for key, at in ResourceCorrection.objects.filter(tenant=state.tenant).values_list("key", "at"):
        history.setdefault(key, []).append(at)
    drift_kind = {item.key: item.kind for item in drift}
    plan = compute_plan(desired, observed, prune=prune, prune_volumes=prune_volumes)
    allowed = []
    flapping = []
    corrected: list[dict[str, Any]] = []
    # A host agent restored these already (the host's rules are shared by every tenant on it, so it
    # always does): they count towards the flap breaker like the reconciler's own corrections.
    for item in drift:
        if item.kind != "repaired":
            continue
        if flap.decide(history.get(item.key, []), now).correct:
            corrected.append(
                {"key": item.key, "action": "repaired", "outcome": "done", "detail": "by the host"}
            )
            ResourceCorrection.objects.create(
                tenant=state.tenant,
                key=item.key,
                action="repaired",
                drift="repaired",
                revision=revision,
                at=now,
            )
        else:
            flapping.append(item.key)
    for step in plan.changes:
        if step.key not in drift_kind:
            continue
        decision = flap.decide(history.get(step.key, []), now)
        if decision.correct:
            allowed.append(step)
        else:
            flapping.append(step.key)
    if not allowed:
        _audit_corrections(state, revision, corrected)
        return corrected, sorted(flapping), []
    executor = services.Executor(
        actor=Actor.system("reconciler"),
        tenant=state.tenant,
        revision=revision,
        wait=False,
        skip_in_flight=True,
    )
    from compute.desired.planning import Plan

    outcomes = executor.run(
        Plan(tuple(allowed), prune, plan.observed_fingerprint, plan.desired_fingerprint, prune_volumes)
    )
    failed = []
    seen: set[str] = set()
    for outcome in outcomes:
        if outcome.outcome == "failed":
            failed.append(outcome.to_dict())
        elif outcome.outcome in ("submitted", "done") and outcome.key not in seen:
            seen.add(outcome.key)
            corrected.append(outcome.to_dict())
            ResourceCorrection.objects.create(
                tenant=state.tenant,
                key=outcome.key,
                action=outcome.action,
                drift=drift_kind.get(outcome.key, ""),
                revision=revision,
                at=now,
            )
    _audit_corrections(state, revision, corrected)
    return corrected, sorted(flapping), failed


def _audit_corrections(state: DesiredState, revision: int, corrected: list[dict[str, Any]]) -> None:
    """One audit entry per run that corrected something (the operations it started are audited too)."""
    if corrected:
        audit.record(
            Actor.system("reconciler"),
            "desired.corrected",
            state,
            tenant=state.tenant,
            details={"revision": revision, "corrected": [f"{c['action']} {c['key']}" for c in corrected]},
        )
