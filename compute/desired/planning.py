"""Plans and drift: the normalised desired resources compared with the observed ones.

Only *declared* fields are compared, which is what keeps system-filled values from looking like drift:

* each kind has a fixed table of comparable fields (:data:`FIELD_RULES`); anything else in an observed
  spec (ids, addresses, host, timestamps) is never looked at, and ``ObservedResource.status`` never is;
* fields the system assigns when the document leaves them out (a network's ``subnet``, a port's
  ``host_port``, a workload's resolved ``image_id``) are compared only when the desired value is not None:
  "the document did not say" is not a difference from "IPAM picked 10.42.3.0/24";
* a workload's observed ``state`` is its run state folded to ``running``/``stopped`` by
  :func:`observed_run_state`; None (host lost, state unknown) is not compared.

Override fields (``command``, ``args``, ``workdir``, ``user``) are different: there None means "the image's
own", so removing ``workdir: /app`` from the document is a change back to None that the plan shows.

A managed resource whose fields all agree but whose ``managed_spec_hash`` differs from the desired hash
(the document changed only in system-assigned fields) and an unmanaged resource the document now declares
(adoption) both get an ``update`` step without field changes: apply stamps the revision and hash, after
which the same plan is empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from compute.desired.document import (
    RESOURCE_KINDS,
    DesiredResource,
    ResourceKind,
    canonical_json,
    format_path,
    network_key,
    normalise_vcpus,
    volume_key,
)
from portal.errors import Explained

# "keep": a volume the plan would delete, kept because the document does not allow deleting volumes
# (prune and prune_volumes); applying it only stops managing the volume.
PlanAction = Literal["create", "update", "replace", "delete", "keep", "noop"]
ChangeEffect = Literal["update", "replace"]
# "repaired": the host agent restored a managed network's host-level pieces changed outside Bulkhead.
DriftKind = Literal["missing", "changed", "stopped", "started", "orphaned", "repaired"]

PLAN_FORMAT: Final = 1
_KIND_ORDER: Final = {kind: position for position, kind in enumerate(RESOURCE_KINDS)}


@dataclass(frozen=True)
class FieldRule:
    """How a difference in one field is applied: in place (``update``) or by re-creating (``replace``).

    ``system_assigned`` fields are compared only when the document declares them (desired value not None).
    """

    name: str
    on_change: ChangeEffect
    system_assigned: bool = False


# Identity fields (names, a port's workload/port/protocol) are part of the key and so never differ.
FIELD_RULES: Final[dict[ResourceKind, tuple[FieldRule, ...]]] = {
    "network": (
        FieldRule("subnet", "replace", system_assigned=True),
        FieldRule("nat", "replace"),
    ),
    "workload": (
        # A different image (by id) or runtime is a different root filesystem and a new domain/container.
        FieldRule("image_id", "replace", system_assigned=True),
        FieldRule("image", "replace"),
        FieldRule("isolation", "replace"),
        # Interfaces are created with the netns/domain; re-attaching is a re-creation.
        FieldRule("networks", "replace"),
        # Process settings: applied in place (the workload restarts, its writable layer survives).
        FieldRule("command", "update"),
        FieldRule("args", "update"),
        FieldRule("env", "update"),
        FieldRule("secret_env", "update"),
        FieldRule("workdir", "update"),
        FieldRule("user", "update"),
        # Limits and policies: cgroup/libvirt live updates.
        FieldRule("vcpus", "update"),
        FieldRule("memory_mib", "update"),
        # A filesystem of that size holds the writable layer: a new size is a new workload.
        FieldRule("disk_gib", "replace"),
        FieldRule("restart", "update"),
        FieldRule("on_host_lost", "update"),
        FieldRule("state", "update"),
        # Attachments need the workload stopped: apply stops it, detaches/attaches, starts it again.
        FieldRule("volumes", "update"),
    ),
    "port": (FieldRule("host_port", "replace", system_assigned=True),),
    # A volume grows in place (a shrink is refused by the plan); its backup schedule is a row beside it.
    "volume": (
        FieldRule("size_gib", "update"),
        FieldRule("backups", "update"),
    ),
}

SPEC_FIELDS: Final[dict[ResourceKind, tuple[str, ...]]] = {
    "network": ("name", "subnet", "nat"),
    "workload": (
        "name",
        "image",
        "image_id",
        "isolation",
        "command",
        "args",
        "env",
        "secret_env",
        "workdir",
        "user",
        "vcpus",
        "memory_mib",
        "disk_gib",
        "restart",
        "on_host_lost",
        "state",
        "networks",
        "volumes",
    ),
    "port": ("workload", "port", "protocol", "host_port"),
    "volume": ("name", "size_gib", "backups"),
}

# Run states of the runtimes (DESIGN.md) folded to the document's desired run states.
_RUN_STATE_OF_RUNTIME_STATE: Final[dict[str, str | None]] = {
    "pending": "running",
    "creating": "running",
    "running": "running",
    "stopping": "stopped",
    "stopped": "stopped",
    "failed": "stopped",
    "deleting": "stopped",
    "unknown": None,
}


def observed_run_state(runtime_state: str) -> str | None:
    """Fold a workload's runtime state into ``running``/``stopped`` for ``ObservedResource.spec["state"]``.

    States on the way to running count as running (not drift while a start is in progress); ``failed``
    counts as stopped (so a plan or autocorrect restarts it); ``unknown`` (host lost) gives None, which is
    not compared.
    """
    return _RUN_STATE_OF_RUNTIME_STATE.get(runtime_state)


@dataclass(frozen=True)
class ObservedResource:
    """A tenant's existing resource as read from the database and runtimes.

    ``spec`` has the canonical shape of :class:`DesiredResource.spec` (extra keys are ignored), with the
    values in effect, system-assigned ones included. ``managed`` resources were created or adopted by an
    apply, which recorded ``managed_revision`` and ``managed_spec_hash``. ``status`` is informative only.
    """

    kind: ResourceKind
    key: str
    spec: dict[str, Any]
    managed: bool = False
    managed_revision: int | None = None
    managed_spec_hash: str | None = None
    status: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FieldChange:
    """One field's value before (observed) and after (desired) a step; paths like ``env.DEBUG``."""

    path: str
    before: Any
    after: Any

    def to_dict(self) -> dict[str, Any]:
        """JSON shape."""
        return {"path": self.path, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class PlanStep:
    """One action on one resource. ``spec``/``spec_hash`` (the desired ones) let apply run the stored plan
    without re-reading the document; deletes and noops carry None.
    """

    action: PlanAction
    kind: ResourceKind
    key: str
    changes: tuple[FieldChange, ...] = ()
    reason: str = ""
    spec: dict[str, Any] | None = None
    spec_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON shape."""
        return {
            "action": self.action,
            "kind": self.kind,
            "key": self.key,
            "reason": self.reason,
            "changes": [change.to_dict() for change in self.changes],
            "spec": self.spec,
            "spec_hash": self.spec_hash,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanStep:
        """Inverse of :meth:`to_dict`; raises ValueError on an unknown action or kind."""
        action = data["action"]
        kind = data["kind"]
        if action not in get_args(PlanAction):
            raise ValueError(f"unknown plan action {action!r}")
        if kind not in RESOURCE_KINDS:
            raise ValueError(f"unknown resource kind {kind!r}")
        return cls(
            action=action,
            kind=kind,
            key=str(data["key"]),
            changes=tuple(FieldChange(c["path"], c["before"], c["after"]) for c in data.get("changes", ())),
            reason=str(data.get("reason", "")),
            spec=data.get("spec"),
            spec_hash=data.get("spec_hash"),
        )


@dataclass(frozen=True)
class Plan:
    """The steps that turn the observed state into the desired one, and fingerprints of both inputs.

    ``steps`` holds every delete first (ports, workloads, networks: dependents go before what they depend
    on, and freed names, host ports and subnets are available to what follows), then creates, replaces,
    updates and noops (networks, workloads, ports); by key within a kind. Apply runs a ``replace`` as delete
    then create: :meth:`teardown_steps` and :meth:`build_steps` give the two passes in that order.
    """

    steps: tuple[PlanStep, ...]
    prune: bool
    observed_fingerprint: str
    desired_fingerprint: str
    prune_volumes: bool = False

    @property
    def is_empty(self) -> bool:
        """True when applying would change no resource (every step is a noop or keeps a volume)."""
        return all(step.action in ("noop", "keep") for step in self.steps)

    @property
    def changes(self) -> tuple[PlanStep, ...]:
        """The steps that do something."""
        return tuple(step for step in self.steps if step.action != "noop")

    def summary(self) -> dict[str, int]:
        """Count of steps per action, e.g. for "3 to create, 1 to replace"."""
        counts = dict.fromkeys(get_args(PlanAction), 0)
        for step in self.steps:
            counts[step.action] += 1
        return counts

    def teardown_steps(self) -> tuple[PlanStep, ...]:
        """Deletes and the removal half of replaces, dependents first (ports, workloads, networks)."""
        selected = [step for step in self.steps if step.action in ("delete", "replace")]
        return tuple(sorted(selected, key=lambda step: (-_KIND_ORDER[step.kind], step.key)))

    def build_steps(self) -> tuple[PlanStep, ...]:
        """Creates, the creation half of replaces, and updates, dependencies first."""
        selected = [step for step in self.steps if step.action in ("create", "replace", "update")]
        return tuple(sorted(selected, key=lambda step: (_KIND_ORDER[step.kind], step.key)))

    def keep_steps(self) -> tuple[PlanStep, ...]:
        """Volumes kept instead of deleted (applying them stops managing the volume)."""
        return tuple(sorted((step for step in self.steps if step.action == "keep"), key=lambda s: s.key))

    def is_stale(self, observed: Iterable[ObservedResource]) -> bool:
        """True when the observed state changed since the plan was computed: apply must refuse it."""
        return observed_fingerprint(observed) != self.observed_fingerprint

    def to_dict(self) -> dict[str, Any]:
        """JSON shape stored with the plan row."""
        return {
            "format": PLAN_FORMAT,
            "prune": self.prune,
            "prune_volumes": self.prune_volumes,
            "observed_fingerprint": self.observed_fingerprint,
            "desired_fingerprint": self.desired_fingerprint,
            "summary": self.summary(),
            "steps": [step.to_dict() for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; raises ValueError for another format version."""
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {data.get('format')!r} (expected {PLAN_FORMAT})")
        return cls(
            steps=tuple(PlanStep.from_dict(step) for step in data["steps"]),
            prune=bool(data["prune"]),
            observed_fingerprint=str(data["observed_fingerprint"]),
            desired_fingerprint=str(data["desired_fingerprint"]),
            prune_volumes=bool(data.get("prune_volumes", False)),  # plans stored before volumes
        )


class PlanConflict(Explained, ValueError):
    """The desired and observed states cannot be reconciled by any order of steps (see ``problems``)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StalePlanError(Explained, RuntimeError):
    """The observed state changed since the plan was computed; plan again."""


@dataclass(frozen=True)
class DriftItem:
    """A managed resource that no longer looks like what the applied revision declared."""

    key: str
    kind: DriftKind
    changes: tuple[FieldChange, ...] = ()
    resource_kind: ResourceKind | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON shape."""
        return {
            "key": self.key,
            "kind": self.kind,
            "resource_kind": self.resource_kind,
            "changes": [change.to_dict() for change in self.changes],
        }


# --------------------------------------------------------------------------------------------------------
# Comparison


def _kind_position(kind: ResourceKind | None) -> int:
    return _KIND_ORDER[kind] if kind is not None else len(_KIND_ORDER)


def canonical_observed_spec(kind: ResourceKind, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable part of an observed spec: known fields only, lists as lists, one vcpus spelling."""
    canonical: dict[str, Any] = {}
    for name in SPEC_FIELDS[kind]:
        value = spec.get(name)
        if isinstance(value, tuple):
            value = list(value)
        elif name in ("env", "secret_env"):
            value = dict(value or {})
        elif name == "volumes":
            value = sorted((dict(mount) for mount in value or ()), key=lambda mount: str(mount["path"]))
        elif name == "vcpus" and isinstance(value, int | float) and not isinstance(value, bool):
            value = normalise_vcpus(value)
        canonical[name] = value
    return canonical


def compare_specs(
    kind: ResourceKind, desired: Mapping[str, Any], observed: Mapping[str, Any]
) -> list[tuple[FieldChange, ChangeEffect]]:
    """The declared fields where ``observed`` differs from ``desired``, each with how it is applied."""
    observed = canonical_observed_spec(kind, observed)
    differences: list[tuple[FieldChange, ChangeEffect]] = []
    for rule in FIELD_RULES[kind]:
        after = desired.get(rule.name)
        before = observed.get(rule.name)
        if rule.system_assigned and after is None:
            continue
        if rule.name == "state" and before is None:
            continue
        if rule.name == "secret_env":  # absent from a spec without secrets
            before, after = dict(before or {}), dict(after or {})
        if rule.name == "on_host_lost":  # absent from a spec with the default
            before, after = before or "wait", after or "wait"
        if rule.name == "volumes":  # absent from a spec without volumes
            before, after = list(before or []), list(after or [])
        if _same_value(before, after):
            continue
        effect = rule.on_change
        if (
            rule.name == "image"
            and desired.get("image_id") is not None
            and _same_value(desired.get("image_id"), observed.get("image_id"))
        ):
            # Another reference to the very same image (tag -> digest): only the recorded reference changes.
            effect = "update"
        if rule.name in ("env", "secret_env") and isinstance(before, dict) and isinstance(after, dict):
            for name in sorted(set(before) | set(after)):
                if before.get(name) != after.get(name):
                    path = format_path((rule.name, name))
                    differences.append((FieldChange(path, before.get(name), after.get(name)), effect))
            continue
        differences.append((FieldChange(rule.name, before, after), effect))
    return differences


def _same_value(before: Any, after: Any) -> bool:
    # bool is an int in Python: True == 1 must not hide a type change.
    if isinstance(before, bool) != isinstance(after, bool):
        return False
    return bool(before == after)


# --------------------------------------------------------------------------------------------------------
# Fingerprints


def observed_fingerprint(observed: Iterable[ObservedResource]) -> str:
    """sha256 of the observed state a plan depends on, independent of the order resources are listed in.

    It covers kind, key, managed flag, managed spec hash and the comparable spec fields (system-assigned
    ones included); not ``status``, ``managed_revision`` or other spec keys, so heartbeats and address
    changes do not make a plan stale while anything the plan compared does.
    """
    entries = sorted(
        (
            (
                resource.key,
                resource.kind,
                resource.managed,
                resource.managed_spec_hash,
                canonical_observed_spec(resource.kind, resource.spec),
            )
            for resource in observed
        ),
        key=lambda entry: entry[0],
    )
    return hashlib.sha256(canonical_json(entries).encode("utf-8")).hexdigest()


def desired_fingerprint(desired: Iterable[DesiredResource]) -> str:
    """sha256 of the desired resources' keys and spec hashes, independent of their order."""
    entries = sorted((resource.key, resource.spec_hash) for resource in desired)
    return hashlib.sha256(canonical_json(entries).encode("utf-8")).hexdigest()


def ensure_plan_is_current(plan: Plan, observed: Iterable[ObservedResource]) -> None:
    """Raise :class:`StalePlanError` when the observed state changed since ``plan`` was computed."""
    if plan.is_stale(observed):
        raise StalePlanError("the resources changed since this plan was made; plan again")


# --------------------------------------------------------------------------------------------------------
# Planning


def _index_by_key(resources: Iterable[Any], what: str) -> dict[str, Any]:
    indexed: dict[str, Any] = {}
    for resource in resources:
        if resource.kind not in _KIND_ORDER:
            raise ValueError(f"unknown resource kind {resource.kind!r} for {resource.key!r}")
        if resource.key in indexed:
            raise ValueError(f"{what} resource {resource.key!r} is listed twice")
        indexed[resource.key] = resource
    return indexed


def _creation_changes(spec: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    return tuple(
        FieldChange(name, None, value) for name, value in spec.items() if value not in (None, {}, [])
    )


def compute_plan(
    desired: Sequence[DesiredResource],
    observed: Sequence[ObservedResource],
    prune: bool,
    *,
    prune_volumes: bool = False,
    check_references: bool = True,
) -> Plan:
    """Compute the steps that make ``observed`` match ``desired``.

    Deletes only resources absent from the document that are managed, or, with ``prune``, unmanaged ones
    too; an unmanaged port whose workload goes away goes with it. Replacing a network replaces the workloads
    attached to it, and replacing a workload replaces its ports. The result does not depend on the order of
    either input. Raises :class:`PlanConflict` when a workload would attach to a network that neither
    exists nor is declared, or when an unmanaged workload is attached to a network the plan removes
    (``check_references=False`` skips these checks, for comparing two documents).

    Volumes hold data, so a volume absent from the document is deleted only with both ``prune`` and
    ``prune_volumes``; otherwise its step is ``keep``, whose reason says what would allow the delete.
    A volume smaller in the document than it is is a :class:`PlanConflict` (volumes only grow).
    """
    desired_by_key: dict[str, DesiredResource] = _index_by_key(desired, "desired")
    observed_by_key: dict[str, ObservedResource] = _index_by_key(observed, "observed")
    steps: dict[str, PlanStep] = {}

    for key, wanted in desired_by_key.items():
        current = observed_by_key.get(key)
        if current is None:
            steps[key] = PlanStep(
                "create",
                wanted.kind,
                key,
                _creation_changes(wanted.spec),
                "declared, does not exist",
                wanted.spec,
                wanted.spec_hash,
            )
            continue
        differences = compare_specs(wanted.kind, wanted.spec, current.spec)
        changes = tuple(change for change, _ in differences)
        replacing = [change.path for change, effect in differences if effect == "replace"]
        if replacing:
            action: PlanAction = "replace"
            reason = f"{', '.join(replacing)} cannot change in place"
        elif differences:
            action, reason = "update", f"{', '.join(change.path for change in changes)} changed"
        elif not current.managed:
            action, reason = "update", "adopt: declared in the document, exists unmanaged"
        elif current.managed_spec_hash != wanted.spec_hash:
            action, reason = "update", "record the new spec (only system-assigned fields differ)"
        else:
            action, reason = "noop", "up to date"
        spec = wanted.spec if action != "noop" else None
        spec_hash = wanted.spec_hash if action != "noop" else None
        steps[key] = PlanStep(action, wanted.kind, key, changes, reason, spec, spec_hash)

    for key, current in observed_by_key.items():
        if key in desired_by_key:
            continue
        if current.kind == "volume" and (current.managed or prune):
            steps[key] = _volume_removal(current, prune, prune_volumes)
            continue
        if current.managed:
            steps[key] = PlanStep("delete", current.kind, key, (), "managed, no longer in the document")
        elif prune:
            steps[key] = PlanStep("delete", current.kind, key, (), "prune: unmanaged, not in the document")
        else:
            steps[key] = PlanStep(
                "noop", current.kind, key, (), "unmanaged, not in the document (prune is off)"
            )

    _cascade(steps, desired_by_key, observed_by_key)
    if check_references:
        problems = _conflicts(steps, desired_by_key, observed_by_key)
        if problems:
            raise PlanConflict(problems)

    deletes = sorted(
        (s for s in steps.values() if s.action == "delete"),
        key=lambda step: (-_KIND_ORDER[step.kind], step.key),
    )
    others = sorted(
        (s for s in steps.values() if s.action != "delete"),
        key=lambda step: (_KIND_ORDER[step.kind], step.key),
    )
    return Plan(
        steps=(*deletes, *others),
        prune=prune,
        observed_fingerprint=observed_fingerprint(observed),
        desired_fingerprint=desired_fingerprint(desired),
        prune_volumes=prune_volumes,
    )


def _volume_removal(current: ObservedResource, prune: bool, prune_volumes: bool) -> PlanStep:
    """Delete a volume the document no longer declares only when it says both prune flags."""
    name = current.spec["name"]
    if prune and prune_volumes:
        why = (
            "managed, no longer in the document"
            if current.managed
            else "prune: unmanaged, not in the document"
        )
        return PlanStep("delete", "volume", current.key, (), f"{why}; prune_volumes: its data is deleted")
    missing = "prune_volumes: true" if prune else "prune: true and prune_volumes: true"
    return PlanStep(
        "keep",
        "volume",
        current.key,
        (),
        f"kept: volume {name} would be deleted with all its data; set {missing} to allow it",
    )


def _spec_of(
    key: str, desired: Mapping[str, DesiredResource], observed: Mapping[str, ObservedResource]
) -> Mapping[str, Any]:
    if key in desired:
        return desired[key].spec
    return observed[key].spec


def _cascade(
    steps: dict[str, PlanStep],
    desired: Mapping[str, DesiredResource],
    observed: Mapping[str, ObservedResource],
) -> None:
    """Spread replaces and deletes to the resources that hang off the replaced or deleted ones."""
    replaced_networks = {
        steps[key].key.split("/", 1)[1]
        for key in steps
        if steps[key].kind == "network" and steps[key].action == "replace"
    }
    for key, step in list(steps.items()):
        if step.kind != "workload" or step.action not in ("update", "noop") or key not in desired:
            continue
        affected = [name for name in desired[key].spec["networks"] if name in replaced_networks]
        if affected:
            steps[key] = _promote_to_replace(step, desired[key], f"network {affected[0]!r} is replaced")

    gone_workloads = {
        _spec_of(key, desired, observed)["name"]: step.action
        for key, step in steps.items()
        if step.kind == "workload" and step.action in ("replace", "delete")
    }
    for key, step in list(steps.items()):
        if step.kind != "port" or step.action not in ("update", "noop"):
            continue
        workload_name = _spec_of(key, desired, observed)["workload"]
        workload_action = gone_workloads.get(workload_name)
        if workload_action is None:
            continue
        if key in desired:
            steps[key] = _promote_to_replace(step, desired[key], f"workload {workload_name!r} is replaced")
        else:
            verb = "deleted" if workload_action == "delete" else "replaced"
            steps[key] = PlanStep("delete", "port", key, (), f"its workload {workload_name!r} is {verb}")


def _promote_to_replace(step: PlanStep, wanted: DesiredResource, reason: str) -> PlanStep:
    prefix = f"{step.reason}; " if step.action == "update" else ""
    return PlanStep(
        "replace", step.kind, step.key, step.changes, prefix + reason, wanted.spec, wanted.spec_hash
    )


def _conflicts(
    steps: Mapping[str, PlanStep],
    desired: Mapping[str, DesiredResource],
    observed: Mapping[str, ObservedResource],
) -> list[str]:
    problems: list[str] = []
    for key in sorted(desired):
        wanted = desired[key]
        current = observed.get(key)
        if wanted.kind == "volume" and current is not None:
            had, asked = current.spec.get("size_gib"), wanted.spec["size_gib"]
            if isinstance(had, int) and asked < had:
                problems.append(
                    f"volume {wanted.spec['name']} cannot shrink from {had} GiB to {asked} GiB: "
                    f"a volume only grows (declare size_gib: {had} or more)"
                )
    gone_volumes = {
        key.split("/", 1)[1]
        for key, step in steps.items()
        if step.kind == "volume" and step.action == "delete"
    }
    for key in sorted(desired):
        wanted = desired[key]
        if wanted.kind != "workload":
            continue
        for mount in wanted.spec.get("volumes") or ():
            if mount["volume"] in gone_volumes:
                problems.append(f"{key} mounts volume {mount['volume']!r}, which the plan deletes")
            elif volume_key(mount["volume"]) not in desired and volume_key(mount["volume"]) not in observed:
                problems.append(
                    f"{key} mounts volume {mount['volume']!r}, which neither exists nor is declared"
                )
    removed_networks = {
        key.split("/", 1)[1]: step.action
        for key, step in steps.items()
        if step.kind == "network" and step.action in ("delete", "replace")
    }
    for key in sorted(desired):
        wanted = desired[key]
        if wanted.kind != "workload":
            continue
        for name in wanted.spec["networks"]:
            network = network_key(name)
            if network not in desired and (network not in observed or steps[network].action == "delete"):
                problems.append(f"{key} attaches to network {name!r}, which is neither declared nor kept")
    for key in sorted(observed):
        step = steps[key]
        if observed[key].kind != "workload" or step.action != "noop" or key in desired:
            continue
        for name in observed[key].spec.get("networks") or ():
            if name in removed_networks:
                verb = "deletes" if removed_networks[name] == "delete" else "replaces"
                problems.append(
                    f"unmanaged {key} is attached to network {name!r}, which the plan {verb}; "
                    "declare the workload in the document or detach it"
                )
    return problems


def structural_diff(old: Sequence[DesiredResource], new: Sequence[DesiredResource]) -> list[PlanStep]:
    """What applying ``new`` over an applied ``old`` would do, resource by resource (for revision views)."""
    as_applied = [
        ObservedResource(
            resource.kind, resource.key, resource.spec, managed=True, managed_spec_hash=resource.spec_hash
        )
        for resource in old
    ]
    plan = compute_plan(new, as_applied, prune=False, check_references=False)
    return list(plan.changes)


# --------------------------------------------------------------------------------------------------------
# Drift


def detect_drift(desired: Sequence[DesiredResource], observed: Sequence[ObservedResource]) -> list[DriftItem]:
    """Compare the applied revision's resources with what exists now, sorted by resource kind and key.

    ``missing``: declared but gone. ``changed``: a declared field differs (state included when other fields
    differ too). ``stopped``/``started``: only the run state differs. ``orphaned``: a managed resource the
    revision does not declare (an apply did not finish deleting it). Unmanaged resources are never drift.
    """
    desired_by_key: dict[str, DesiredResource] = _index_by_key(desired, "desired")
    observed_by_key: dict[str, ObservedResource] = _index_by_key(observed, "observed")
    items: list[DriftItem] = []
    for key, wanted in desired_by_key.items():
        current = observed_by_key.get(key)
        if current is None:
            items.append(DriftItem(key, "missing", (), wanted.kind))
            continue
        changes = tuple(change for change, _ in compare_specs(wanted.kind, wanted.spec, current.spec))
        if not changes:
            continue
        if len(changes) == 1 and changes[0].path == "state":
            kind: DriftKind = "stopped" if changes[0].after == "running" else "started"
            items.append(DriftItem(key, kind, changes, wanted.kind))
        else:
            items.append(DriftItem(key, "changed", changes, wanted.kind))
    for key, current in observed_by_key.items():
        if current.managed and key not in desired_by_key:
            items.append(DriftItem(key, "orphaned", (), current.kind))
    return sorted(items, key=lambda item: (_kind_position(item.resource_kind), item.key))


__all__ = [
    "FIELD_RULES",
    "SPEC_FIELDS",
    "ChangeEffect",
    "DriftItem",
    "DriftKind",
    "FieldChange",
    "FieldRule",
    "ObservedResource",
    "Plan",
    "PlanAction",
    "PlanConflict",
    "PlanStep",
    "StalePlanError",
    "canonical_observed_spec",
    "compare_specs",
    "compute_plan",
    "desired_fingerprint",
    "detect_drift",
    "ensure_plan_is_current",
    "observed_fingerprint",
    "observed_run_state",
    "structural_diff",
]
