"""The tenant desired-state document: safe parsing with line numbers, validation, normalisation, export.

``parse_document`` turns YAML text into a :class:`TenantConfig` or raises :class:`DocumentError` listing
every :class:`ValidationIssue` with its path (``spec.workloads[1].memory_mib``) and line. The checks run in
three stages, each only when the previous one passed (a later stage needs the shape the earlier one
guarantees):

1. YAML: one document, no anchors/aliases/merge keys (billion-laughs), string keys only, no duplicate keys,
   bounded size and nesting, only the plain JSON-like tags.
2. The JSON Schema of :mod:`compute.desired.schema` (unknown fields are errors).
3. Semantics: unique names, references between resources, subnets, host ports, and images through the
   caller's ``resolve_image`` callback (what the tenant can see is decided by the caller, in the database).

Networks referenced by a workload must be declared in the document, or be named in ``known_networks`` (the
tenant's existing compartments the document does not manage). With ``prune: true`` an undeclared network
would be deleted, so there the reference must be declared.

:meth:`TenantConfig.resources` gives the normalised :class:`DesiredResource` list (networks, workloads,
ports) whose ``spec`` dicts have every default filled and whose ``spec_hash`` is the sha256 of the spec's
canonical JSON; the planner compares those against the observed resources.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, NoReturn

import jsonschema
import yaml

from compute.desired import schema as tenant_schema
from portal.errors import Explained
from volumes.paths import mount_path_problem

if TYPE_CHECKING:
    from compute.desired.planning import ObservedResource

ResourceKind = Literal["network", "volume", "workload", "port"]
# Dependency order: a workload needs its networks and volumes; a port needs its workload.
RESOURCE_KINDS: Final[tuple[ResourceKind, ...]] = ("network", "volume", "workload", "port")

DEFAULT_MAX_BYTES: Final = 2 * 1024 * 1024
# A valid document nests 5 levels deep (spec.workloads[i].env.KEY); the margin only helps error messages.
DEFAULT_MAX_DEPTH: Final = 32
# Narrowest and widest subnets a compartment may have (a /31 or /32 leaves no room for a gateway and hosts).
MIN_PREFIX_LENGTH: Final = 8
MAX_PREFIX_LENGTH: Final = 30

ImageResolver = Callable[[str], "str | None"]
PathPart = str | int
DocumentPath = tuple[PathPart, ...]

_YAML_TAG_PREFIX: Final = "tag:yaml.org,2002:"
_ALLOWED_SCALAR_TAGS: Final = frozenset(
    _YAML_TAG_PREFIX + name for name in ("null", "bool", "int", "float", "str", "timestamp")
)
_ALLOWED_MAPPING_TAGS: Final = frozenset({None, "!", _YAML_TAG_PREFIX + "map"})
_ALLOWED_SEQUENCE_TAGS: Final = frozenset({None, "!", _YAML_TAG_PREFIX + "seq"})
_STR_TAG: Final = _YAML_TAG_PREFIX + "str"
_ANCHOR_MESSAGE: Final = "YAML anchors and aliases (&name, *name) are not allowed"
_IDENTIFIER: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

_BaseSafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------------------------------------
# Issues


@dataclass(frozen=True, order=True)
class ValidationIssue:
    """One problem in a document: where (dotted path, 1-based line and column) and what."""

    path: str
    line: int | None
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "document"
        path = self.path or "(document)"
        return f"{where}: {path}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON shape the API and the UI show next to the editor."""
        return {"path": self.path, "line": self.line, "column": self.column, "message": self.message}


class DocumentError(Explained, ValueError):
    """The document is not a valid TenantConfig; ``issues`` says every reason found, sorted by line."""

    def __init__(self, issues: Sequence[ValidationIssue]) -> None:
        self.issues: list[ValidationIssue] = sorted(
            issues, key=lambda issue: (issue.line if issue.line is not None else 0, issue.path, issue.message)
        )
        summary = "; ".join(str(issue) for issue in self.issues[:5])
        more = f" (and {len(self.issues) - 5} more)" if len(self.issues) > 5 else ""
        super().__init__(f"invalid desired-state document: {summary}{more}")


def format_path(path: Iterable[PathPart]) -> str:
    """Render ``("spec", "workloads", 1, "env", "A B")`` as ``spec.workloads[1].env["A B"]``."""
    rendered = ""
    for part in path:
        if isinstance(part, int):
            rendered += f"[{part}]"
        elif _IDENTIFIER.match(part):
            rendered += f".{part}" if rendered else part
        else:
            rendered += f"[{json.dumps(part)}]"
    return rendered


# --------------------------------------------------------------------------------------------------------
# Safe YAML with positions


class SourcePosition(NamedTuple):
    """1-based line and column of a node in the YAML text (a tuple: the loader makes one per node)."""

    line: int
    column: int


class _LoadFailed(Exception):
    """Raised inside the loader to stop at the first issue that makes the rest meaningless."""

    def __init__(self, issue: ValidationIssue) -> None:
        super().__init__(issue.message)
        self.issue = issue


class _MissingKey:
    """Marks a mapping frame waiting for its next key (None is a possible YAML key value)."""


_AWAITING_KEY: Final = _MissingKey()


class _Frame:
    """An open mapping or sequence while the event stream is being turned into Python objects."""

    __slots__ = ("container", "key", "key_positions", "path")

    def __init__(self, container: dict[str, Any] | list[Any], path: DocumentPath) -> None:
        self.container = container
        self.path = path
        self.key: str | _MissingKey = _AWAITING_KEY
        self.key_positions: dict[str, SourcePosition] = {}


class PositionTrackingLoader(_BaseSafeLoader):  # type: ignore[valid-type,misc]
    """A safe YAML loader that records the position of every node by its path.

    It builds the Python objects straight from the parser's events instead of composing a node graph,
    so that it can refuse anchors and aliases as soon as it meets one (a billion-laughs document costs
    nothing), bound the nesting depth without recursion (libyaml's composer overflows the C stack on
    deeply nested flow collections), and report duplicate keys, which YAML loaders silently overwrite.
    Scalars are resolved and constructed by the safe resolver and constructor it inherits.
    """

    def __init__(self, text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        super().__init__(text)
        self.max_depth = max_depth
        self.positions: dict[DocumentPath, SourcePosition] = {}
        self.issues: list[ValidationIssue] = []

    def load_with_positions(self) -> Any:
        """Return the document's data; positions land in ``self.positions``, soft issues in ``self.issues``.

        Raises ``_LoadFailed`` for structural problems and ``yaml.YAMLError`` for syntax errors.
        """
        stack: list[_Frame] = []
        root: Any = None
        documents = 0
        # Dispatch on the exact event class, most frequent first: this loop runs once per node.
        while True:
            event = self.get_event()
            event_type = type(event)
            if event_type is yaml.ScalarEvent:
                if event.anchor is not None:
                    self._fail(event, _ANCHOR_MESSAGE, self._path(stack))
                value = self._construct_scalar(event, stack)
                if self._attach(value, event, stack):
                    root = value
            elif event_type is yaml.MappingStartEvent or event_type is yaml.SequenceStartEvent:
                is_mapping = event_type is yaml.MappingStartEvent
                if event.anchor is not None:
                    self._fail(event, _ANCHOR_MESSAGE, self._path(stack))
                if event.tag not in (_ALLOWED_MAPPING_TAGS if is_mapping else _ALLOWED_SEQUENCE_TAGS):
                    self._fail(event, f"unsupported YAML tag {event.tag!r}", self._path(stack))
                if len(stack) >= self.max_depth:
                    self._fail(event, f"nested deeper than {self.max_depth} levels", self._path(stack))
                container: dict[str, Any] | list[Any] = {} if is_mapping else []
                path = self._child_path(event, stack)
                if self._attach(container, event, stack):
                    root = container
                stack.append(_Frame(container, path))
            elif event_type is yaml.MappingEndEvent or event_type is yaml.SequenceEndEvent:
                stack.pop()
            elif event_type is yaml.AliasEvent:
                self._fail(event, _ANCHOR_MESSAGE, self._path(stack))
            elif event_type is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    self._fail(event, "only one YAML document is allowed (remove the second '---')", ())
            elif event_type is yaml.StreamEndEvent:
                return root
            elif event_type is not yaml.StreamStartEvent and event_type is not yaml.DocumentEndEvent:
                self._fail(event, f"unexpected YAML event {event_type.__name__}", self._path(stack))

    def _fail(self, event: yaml.Event, message: str, path: DocumentPath) -> NoReturn:
        position = self._position(event)
        raise _LoadFailed(
            ValidationIssue(
                format_path(path),
                position.line if position else None,
                message,
                position.column if position else None,
            )
        )

    @staticmethod
    def _position(event: yaml.Event) -> SourcePosition | None:
        mark = event.start_mark
        return SourcePosition(mark.line + 1, mark.column + 1) if mark is not None else None

    @staticmethod
    def _path(stack: list[_Frame]) -> DocumentPath:
        return stack[-1].path if stack else ()

    def _child_path(self, event: yaml.Event, stack: list[_Frame]) -> DocumentPath:
        if not stack:
            return ()
        frame = stack[-1]
        if isinstance(frame.container, list):
            return (*frame.path, len(frame.container))
        if isinstance(frame.key, _MissingKey):
            self._fail(event, "mapping keys must be plain strings, not lists or mappings", frame.path)
        assert isinstance(frame.key, str)
        return (*frame.path, frame.key)

    def _construct_scalar(self, event: yaml.ScalarEvent, stack: list[_Frame]) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return event.value  # quoted or block scalar without a tag: a string, nothing to resolve
            tag = self.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR_TAG:
            return event.value
        if tag == _YAML_TAG_PREFIX + "merge":
            self._fail(event, "YAML merge keys (<<) are not allowed", self._path(stack))
        if tag not in _ALLOWED_SCALAR_TAGS:
            self._fail(event, f"unsupported YAML tag {tag!r}", self._path(stack))
        # Marks stay None: positions are tracked here, constructors only use them in their messages.
        node = yaml.ScalarNode(tag, event.value, None, None, event.style)
        try:
            return self.yaml_constructors[tag](self, node)
        except (ValueError, yaml.YAMLError) as error:  # e.g. an integer with 100,000 digits
            self._fail(event, f"invalid scalar: {error}", self._path(stack))

    def _attach(self, value: Any, event: yaml.Event, stack: list[_Frame]) -> bool:
        """Put ``value`` where it belongs; return True when it is the document's root."""
        position = self._position(event) or SourcePosition(0, 0)
        if not stack:
            self.positions[()] = position
            return True
        frame = stack[-1]
        if isinstance(frame.container, list):
            self.positions[(*frame.path, len(frame.container))] = position
            frame.container.append(value)
            return False
        if isinstance(frame.key, _MissingKey):
            # This scalar is a key; containers as keys were refused in _child_path.
            if not isinstance(value, str):
                self._fail(
                    event,
                    f"mapping keys must be strings; quote {getattr(event, 'value', value)!r}",
                    frame.path,
                )
            if value in frame.key_positions:
                first = frame.key_positions[value]
                self.issues.append(
                    ValidationIssue(
                        format_path((*frame.path, value)),
                        position.line,
                        f"duplicate key {value!r} (first on line {first.line})",
                        position.column,
                    )
                )
            else:
                frame.key_positions[value] = position
                # A value is reported at its key's line: that is where people look.
                self.positions[(*frame.path, value)] = position
            frame.key = value
            return False
        frame.container[frame.key] = value
        frame.key = _AWAITING_KEY
        return False


# Characters after which a '[', '{' or quote starts a flow collection or a quoted scalar (else it is
# part of a plain scalar such as `echo [x]` or `it's`).
_VALUE_STARTS: Final = frozenset(":-,[{?")


def _first_flow_nesting_beyond(text: str, max_depth: int) -> tuple[int, int] | None:
    """Line and column of the first flow collection nested deeper than ``max_depth``, else None.

    The event loader bounds nesting too, but libyaml's scanner reads a flow collection's tokens ahead
    of the parser and stops on its own limit first; this pass keeps the refusal ours, whatever the
    parser version. It follows quotes and comments; anything it gets wrong, the parser refuses after.
    """
    depth = 0
    position = 0
    length = len(text)
    last_opener = -1  # a '[' after a bracket that began no collection is still inside a plain scalar
    while position < length:
        found = _FLOW_SIGNIFICANT.search(text, position)
        if found is None:
            return None
        index = found.start()
        char = text[index]
        position = index + 1
        if char == "#":
            if index == 0 or text[index - 1] in " \t\n":
                newline = text.find("\n", index)
                position = length if newline < 0 else newline
            continue
        if char in "]}":
            depth = max(depth - 1, 0)
            continue
        if not _starts_value(text, index, last_opener):
            continue
        if char in "'\"":
            position = _end_of_quoted(text, index)
            continue
        last_opener = index
        depth += 1
        if depth > max_depth:
            line_start = text.rfind("\n", 0, index) + 1
            return text.count("\n", 0, index) + 1, index - line_start + 1
    return None


_FLOW_SIGNIFICANT: Final = re.compile(r"[#'\"\[\]{}]")


def _starts_value(text: str, index: int, last_opener: int) -> bool:
    """Whether the character at ``index`` begins a node (not the inside of a plain scalar)."""
    before = index - 1
    while before >= 0 and text[before] in " \t\r":
        before -= 1
    if before < 0 or text[before] == "\n":
        return True
    if text[before] in "[{":
        return before == last_opener
    return text[before] in _VALUE_STARTS


def _end_of_quoted(text: str, start: int) -> int:
    """Index just past the quoted scalar opening at ``start`` (or the end of the text)."""
    quote = text[start]
    index = start + 1
    length = len(text)
    while index < length:
        char = text[index]
        if quote == '"' and char == "\\":
            index += 2
            continue
        if char == quote:
            if quote == "'" and index + 1 < length and text[index + 1] == "'":
                index += 2  # '' is an escaped quote inside single quotes
                continue
            return index + 1
        index += 1
    return length


def load_yaml_with_positions(
    text: str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[Any, dict[DocumentPath, SourcePosition]]:
    """Load one safe YAML document and the position of each of its nodes by path.

    Raises :class:`DocumentError` for oversized, malformed or unsafe YAML.
    """
    # len() counts characters, at most the byte count: a cheap first refusal before encoding a huge text.
    if len(text) > max_bytes or len(text.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise DocumentError([ValidationIssue("", None, f"document is larger than {max_bytes} bytes")])
    too_deep = _first_flow_nesting_beyond(text, max_depth)
    if too_deep is not None:
        line, column = too_deep
        raise DocumentError([ValidationIssue("", line, f"nested deeper than {max_depth} levels", column)])
    loader = PositionTrackingLoader(text, max_depth=max_depth)
    try:
        data = loader.load_with_positions()
    except _LoadFailed as failure:
        raise DocumentError([failure.issue]) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = " ".join(part for part in (error.context, error.problem) if part) or "invalid YAML"
        raise DocumentError(
            [
                ValidationIssue(
                    "",
                    mark.line + 1 if mark else None,
                    f"invalid YAML: {message}",
                    mark.column + 1 if mark else None,
                )
            ]
        ) from None
    except yaml.YAMLError as error:
        raise DocumentError([ValidationIssue("", None, f"invalid YAML: {error}")]) from None
    finally:
        loader.dispose()
    if loader.issues:
        raise DocumentError(loader.issues)
    return data, loader.positions


def _position_of(
    positions: Mapping[DocumentPath, SourcePosition], path: DocumentPath
) -> SourcePosition | None:
    """The position of ``path`` or of its nearest ancestor present in the text (a missing field)."""
    for length in range(len(path), -1, -1):
        position = positions.get(path[:length])
        if position is not None:
            return position
    return None


def _issue_at(
    positions: Mapping[DocumentPath, SourcePosition], path: DocumentPath, message: str
) -> ValidationIssue:
    position = _position_of(positions, path)
    return ValidationIssue(
        format_path(path),
        position.line if position else None,
        message,
        position.column if position else None,
    )


def issues_at(text: str, located: Iterable[tuple[DocumentPath, str]]) -> list[ValidationIssue]:
    """Issues found outside :func:`parse_document` (against the tenant's state), placed at their paths.

    ``text`` must be a document that parsed; each ``(path, message)`` gets the line of its path (or of the
    nearest ancestor present).
    """
    located = list(located)
    if not located:
        return []
    _, positions = load_yaml_with_positions(text)
    return [_issue_at(positions, path, message) for path, message in located]


# --------------------------------------------------------------------------------------------------------
# Schema validation with human messages


@cache
def _validator() -> jsonschema.protocols.Validator:
    validator_class = jsonschema.validators.validator_for(tenant_schema.SCHEMA)
    validator_class.check_schema(tenant_schema.SCHEMA)
    return validator_class(tenant_schema.SCHEMA)


_TYPE_WORDS: Final = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short_repr(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _schema_issues(data: Any, positions: Mapping[DocumentPath, SourcePosition]) -> list[ValidationIssue]:
    issues: list[ValidationIssue] = []
    for error in _validator().iter_errors(data):
        path: DocumentPath = tuple(error.absolute_path)
        keyword = str(error.validator)
        expected: Any = error.validator_value
        instance: Any = error.instance
        subschema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
        if keyword == "additionalProperties" and isinstance(instance, dict):
            allowed = sorted(subschema.get("properties", {}))
            for extra in sorted(set(instance) - set(allowed)):
                hint = difflib.get_close_matches(extra, allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else f" (allowed: {', '.join(allowed)})"
                issues.append(_issue_at(positions, (*path, extra), f"unknown field {extra!r}{suggestion}"))
            continue
        if keyword == "required" and isinstance(instance, dict):
            for missing in expected:
                if missing not in instance:
                    issues.append(_issue_at(positions, (*path, missing), "required field is missing"))
            continue
        if "propertyNames" in error.schema_path:
            path = (*path, str(instance))
        issues.append(
            _issue_at(positions, path, _schema_message(keyword, expected, instance, subschema, error.message))
        )
    return issues


def _schema_message(
    keyword: str, expected: Any, instance: Any, subschema: Mapping[str, Any], fallback: str
) -> str:
    """Say what is wrong in the document's words; ``fallback`` is jsonschema's message for other keywords."""
    got = _describe_value(instance)
    if keyword == "type":
        wanted = " or ".join(
            _TYPE_WORDS.get(name, name) for name in ([expected] if isinstance(expected, str) else expected)
        )
        quote_hint = " (quote it)" if "string" in str(expected) and isinstance(instance, int | float) else ""
        return f"must be {wanted}, not {got}{quote_hint}"
    if keyword == "pattern":
        description = subschema.get("x-pattern-description", f"matching {expected}")
        return f"{_short_repr(instance)} is not {description}"
    if keyword == "enum":
        return f"must be one of {', '.join(map(str, expected))}, not {got}"
    if keyword == "const":
        return f"must be {expected!r}, not {got}"
    if keyword == "minimum":
        return f"must be at least {expected}, not {instance!r}"
    if keyword == "maximum":
        return f"must be at most {expected}, not {instance!r}"
    if keyword == "exclusiveMinimum":
        return f"must be greater than {expected}, not {instance!r}"
    if keyword == "exclusiveMaximum":
        return f"must be less than {expected}, not {instance!r}"
    if keyword == "maxLength":
        return f"is longer than {expected} characters"
    if keyword == "maxItems":
        return f"has more than {expected} items"
    if keyword == "maxProperties":
        return f"has more than {expected} entries"
    if keyword == "uniqueItems":
        return "contains the same item twice"
    return fallback


# --------------------------------------------------------------------------------------------------------
# The typed document and its normalised resources


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value`` that hashes compare: sorted keys, no spaces, UTF-8 as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a resource spec; stored on managed resources at apply."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def network_key(name: str) -> str:
    """The plan key of a network: ``network/<name>``."""
    return f"network/{name}"


def workload_key(name: str) -> str:
    """The plan key of a workload: ``workload/<name>``."""
    return f"workload/{name}"


def volume_key(name: str) -> str:
    """The plan key of a volume: ``volume/<name>``."""
    return f"volume/{name}"


def port_key(workload: str, port: int, protocol: str) -> str:
    """The plan key of a published port: ``port/<workload>/<port>/<protocol>`` (host_port is a field)."""
    return f"port/{workload}/{port}/{protocol}"


def resource_key(kind: ResourceKind, spec: Mapping[str, Any]) -> str:
    """The plan key of a resource from its canonical spec."""
    if kind == "network":
        return network_key(spec["name"])
    if kind == "workload":
        return workload_key(spec["name"])
    if kind == "volume":
        return volume_key(spec["name"])
    return port_key(spec["workload"], spec["port"], spec["protocol"])


def normalise_vcpus(vcpus: float) -> int | float:
    """1.0 and 1 are the same request; keep one spelling so that spec hashes agree."""
    return int(vcpus) if float(vcpus).is_integer() else float(vcpus)


@dataclass(frozen=True)
class NetworkSpec:
    """A declared network compartment; ``subnet`` None means IPAM allocates one."""

    name: str
    subnet: str | None = None
    nat: bool = tenant_schema.DEFAULT_NAT

    def to_spec(self) -> dict[str, Any]:
        """The canonical spec dict (the planner's and the hash's view)."""
        return {"name": self.name, "subnet": self.subnet, "nat": self.nat}


@dataclass(frozen=True)
class VolumeSpec:
    """A declared volume; ``backups`` is its schedule (every_hours, keep_last), None for none."""

    name: str
    size_gib: int
    backups: tuple[int, int] | None = None

    def to_spec(self) -> dict[str, Any]:
        """The canonical spec dict (the planner's and the hash's view)."""
        return {"name": self.name, "size_gib": self.size_gib, **backups_field(self.backups)}


def backups_field(backups: tuple[int, int] | None) -> dict[str, dict[str, int]]:
    """``backups`` in a canonical volume spec only when the volume has a schedule."""
    if backups is None:
        return {}
    return {"backups": {"every_hours": backups[0], "keep_last": backups[1]}}


@dataclass(frozen=True, order=True)
class MountSpec:
    """A volume mounted into a workload at ``path``."""

    path: str
    volume: str
    read_only: bool = False

    def to_spec(self) -> dict[str, Any]:
        """The canonical mount dict."""
        return {"volume": self.volume, "path": self.path, "read_only": self.read_only}


def volumes_field(mounts: Iterable[MountSpec]) -> dict[str, list[dict[str, Any]]]:
    """``volumes`` in a canonical workload spec only when it has some (older specs and hashes stay the
    same), sorted by path: the order they are listed in changes nothing."""
    ordered = sorted(mounts)
    return {"volumes": [mount.to_spec() for mount in ordered]} if ordered else {}


@dataclass(frozen=True)
class WorkloadSpec:
    """A declared workload. None for command/args/workdir/user means "the image's own"."""

    name: str
    image: str
    image_id: str | None = None
    isolation: str = tenant_schema.DEFAULT_ISOLATION
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    vcpus: int | float = tenant_schema.DEFAULT_VCPUS
    memory_mib: int = tenant_schema.DEFAULT_MEMORY_MIB
    disk_gib: int = tenant_schema.DEFAULT_DISK_GIB
    restart: str = tenant_schema.DEFAULT_RESTART
    on_host_lost: str = "wait"
    state: str = tenant_schema.DEFAULT_STATE
    networks: tuple[str, ...] = ()
    volumes: tuple[MountSpec, ...] = ()

    def to_spec(self) -> dict[str, Any]:
        """The canonical spec dict (the planner's and the hash's view)."""
        return {
            "name": self.name,
            "image": self.image,
            "image_id": self.image_id,
            "isolation": self.isolation,
            "command": list(self.command) if self.command is not None else None,
            "args": list(self.args) if self.args is not None else None,
            "env": dict(sorted(self.env.items())),
            **secret_env_field(self.secret_env),
            "workdir": self.workdir,
            "user": self.user,
            "vcpus": normalise_vcpus(self.vcpus),
            "memory_mib": self.memory_mib,
            **disk_field(self.disk_gib),
            "restart": self.restart,
            **on_host_lost_field(self.on_host_lost),
            "state": self.state,
            "networks": list(self.networks),
            **volumes_field(self.volumes),
        }


def secret_env_field(secret_env: Mapping[str, str] | None) -> dict[str, dict[str, str]]:
    """``secret_env`` in a canonical spec only when there is one: older specs and hashes stay the same."""
    return {"secret_env": dict(sorted(secret_env.items()))} if secret_env else {}


def on_host_lost_field(policy: str) -> dict[str, str]:
    """``on_host_lost`` in a canonical spec only when it is not "wait" (older specs and hashes stay)."""
    return {"on_host_lost": policy} if policy and policy != "wait" else {}


def disk_field(disk_gib: int) -> dict[str, int]:
    """``disk_gib`` in a canonical spec only when it is not the default: the specs (and hashes) of
    workloads declared before disks had a size stay the same."""
    return {} if disk_gib == tenant_schema.DEFAULT_DISK_GIB else {"disk_gib": disk_gib}


@dataclass(frozen=True)
class PortSpec:
    """A declared published port; ``host_port`` None means the operator's range assigns one."""

    workload: str
    port: int
    protocol: str = tenant_schema.DEFAULT_PROTOCOL
    host_port: int | None = None

    def to_spec(self) -> dict[str, Any]:
        """The canonical spec dict (the planner's and the hash's view)."""
        return {
            "workload": self.workload,
            "port": self.port,
            "protocol": self.protocol,
            "host_port": self.host_port,
        }


@dataclass(frozen=True)
class DesiredResource:
    """One normalised resource of a document. Treat ``spec`` as read-only: ``spec_hash`` is computed from it.

    ``line`` is where the resource is declared (None when not built from text), so that the UI can point a
    plan step back at the document.
    """

    kind: ResourceKind
    key: str
    spec: dict[str, Any]
    spec_hash: str
    line: int | None = None

    @classmethod
    def from_spec(
        cls, kind: ResourceKind, spec: Mapping[str, Any], line: int | None = None
    ) -> DesiredResource:
        """Build a resource from a canonical spec dict, computing its key and hash."""
        canonical = dict(spec)
        return cls(kind, resource_key(kind, canonical), canonical, spec_hash(canonical), line)


@dataclass(frozen=True)
class TenantConfig:
    """A parsed, validated desired-state document."""

    name: str | None = None
    description: str | None = None
    prune: bool = False
    prune_volumes: bool = False
    networks: tuple[NetworkSpec, ...] = ()
    volumes: tuple[VolumeSpec, ...] = ()
    workloads: tuple[WorkloadSpec, ...] = ()
    ports: tuple[PortSpec, ...] = ()
    # Declaration line of each resource by key, to point plan steps and drift back at the text.
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    api_version: str = tenant_schema.API_VERSION
    kind: str = tenant_schema.KIND

    def resources(self) -> list[DesiredResource]:
        """The normalised resources in dependency order: networks, volumes, workloads, ports."""
        declared: list[tuple[ResourceKind, NetworkSpec | VolumeSpec | WorkloadSpec | PortSpec]] = [
            *(("network", network) for network in self.networks),
            *(("volume", volume) for volume in self.volumes),
            *(("workload", workload) for workload in self.workloads),
            *(("port", port) for port in self.ports),
        ]
        resources: list[DesiredResource] = []
        for kind, item in declared:
            spec = item.to_spec()
            key = resource_key(kind, spec)
            resources.append(DesiredResource(kind, key, spec, spec_hash(spec), self.lines.get(key)))
        return resources


# --------------------------------------------------------------------------------------------------------
# Parsing


def parse_document(
    text: str,
    resolve_image: ImageResolver | None = None,
    *,
    known_networks: Collection[str] = (),
    known_volumes: Collection[str] = (),
    host_port_range: tuple[int, int] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> TenantConfig:
    """Parse and validate a desired-state document; raise :class:`DocumentError` listing every issue.

    ``resolve_image(reference)`` returns the id of the image the tenant can see under that reference, or None
    (reported as "image not found" at the workload's image line). It is called once per distinct reference,
    after its ``prefetch(references)``, if it has one, was given them all.
    Without a resolver images are not checked and ``image_id`` stays None.
    ``known_networks`` are the tenant's existing networks a workload may attach to without declaring them
    (not allowed with ``prune: true``, which would delete them). ``host_port_range`` (inclusive) is the
    operator's range for published host ports. ``known_volumes`` are the tenant's existing volumes a
    workload may mount without declaring them (unless ``prune`` and ``prune_volumes`` would delete them);
    a volume of another tenant is never among them, so naming one reads exactly like a missing volume.
    """
    data, positions = load_yaml_with_positions(text, max_bytes=max_bytes, max_depth=max_depth)
    if data is None:
        raise DocumentError([ValidationIssue("", 1, "the document is empty")])
    issues = _schema_issues(data, positions)
    if issues:
        raise DocumentError(issues)
    config = _build_config(data, positions)
    issues = _semantic_issues(
        config, data, positions, set(known_networks), host_port_range, set(known_volumes)
    )
    if resolve_image is not None:
        config, image_issues = _resolve_images(config, data, positions, resolve_image)
        issues.extend(image_issues)
    if issues:
        raise DocumentError(issues)
    return config


def _build_config(data: Mapping[str, Any], positions: Mapping[DocumentPath, SourcePosition]) -> TenantConfig:
    metadata = data.get("metadata") or {}
    spec = data["spec"]
    lines: dict[str, int] = {}

    def line_of(path: DocumentPath) -> int:
        position = _position_of(positions, path)
        return position.line if position else 0

    networks = []
    for index, item in enumerate(spec.get("networks", [])):
        subnet = item.get("subnet")
        network = NetworkSpec(
            name=item["name"],
            # The canonical spelling (what IPAM stores); invalid ones are reported by the semantic checks.
            subnet=_canonical_subnet(subnet) if subnet is not None else None,
            nat=item.get("nat", tenant_schema.DEFAULT_NAT),
        )
        networks.append(network)
        lines.setdefault(network_key(network.name), line_of(("spec", "networks", index)))
    volumes = []
    for index, item in enumerate(spec.get("volumes", [])):
        schedule = item.get("backups")
        volume = VolumeSpec(
            name=item["name"],
            size_gib=item["size_gib"],
            backups=(schedule.get("every_hours", 24), schedule["keep_last"]) if schedule else None,
        )
        volumes.append(volume)
        lines.setdefault(volume_key(volume.name), line_of(("spec", "volumes", index)))
    workloads = []
    for index, item in enumerate(spec.get("workloads", [])):
        command = item.get("command")
        args = item.get("args")
        workload = WorkloadSpec(
            name=item["name"],
            image=item["image"],
            isolation=item.get("isolation", tenant_schema.DEFAULT_ISOLATION),
            command=tuple(command) if command is not None else None,
            args=tuple(args) if args is not None else None,
            env=dict(item.get("env", {})),
            secret_env=dict(item.get("secret_env", {})),
            workdir=item.get("workdir"),
            user=item.get("user"),
            vcpus=item.get("vcpus", tenant_schema.DEFAULT_VCPUS),
            memory_mib=item.get("memory_mib", tenant_schema.DEFAULT_MEMORY_MIB),
            disk_gib=item.get("disk_gib", tenant_schema.DEFAULT_DISK_GIB),
            restart=item.get("restart", tenant_schema.DEFAULT_RESTART),
            on_host_lost=item.get("on_host_lost", "wait"),
            state=item.get("state", tenant_schema.DEFAULT_STATE),
            networks=tuple(item.get("networks", ())),
            volumes=tuple(
                MountSpec(path=mount["path"], volume=mount["volume"], read_only=mount.get("read_only", False))
                for mount in item.get("volumes", ())
            ),
        )
        workloads.append(workload)
        lines.setdefault(workload_key(workload.name), line_of(("spec", "workloads", index)))
    ports = []
    for index, item in enumerate(spec.get("ports", [])):
        port = PortSpec(
            workload=item["workload"],
            port=item["port"],
            protocol=item.get("protocol", tenant_schema.DEFAULT_PROTOCOL),
            host_port=item.get("host_port"),
        )
        ports.append(port)
        lines.setdefault(port_key(port.workload, port.port, port.protocol), line_of(("spec", "ports", index)))
    return TenantConfig(
        name=metadata.get("name"),
        description=metadata.get("description"),
        prune=spec.get("prune", False),
        prune_volumes=spec.get("prune_volumes", False),
        networks=tuple(networks),
        volumes=tuple(volumes),
        workloads=tuple(workloads),
        ports=tuple(ports),
        lines=lines,
    )


def _canonical_subnet(subnet: str) -> str:
    try:
        return str(ipaddress.IPv4Network(subnet, strict=False))
    except ValueError:
        return subnet


def _semantic_issues(
    config: TenantConfig,
    data: Mapping[str, Any],
    positions: Mapping[DocumentPath, SourcePosition],
    known_networks: set[str],
    host_port_range: tuple[int, int] | None,
    known_volumes: Collection[str] = (),
) -> list[ValidationIssue]:
    issues: list[ValidationIssue] = []

    def first_line(path: DocumentPath) -> str:
        position = _position_of(positions, path)
        return f" (first declared on line {position.line})" if position else ""

    network_index: dict[str, int] = {}
    declared_subnets: list[tuple[ipaddress.IPv4Network, int]] = []
    for index, network in enumerate(config.networks):
        if network.name in network_index:
            first = ("spec", "networks", network_index[network.name])
            issues.append(
                _issue_at(
                    positions,
                    ("spec", "networks", index, "name"),
                    f"duplicate network name {network.name!r}{first_line(first)}",
                )
            )
        else:
            network_index[network.name] = index
        raw_subnet = data["spec"]["networks"][index].get("subnet")
        if raw_subnet is None:
            continue
        subnet_path = ("spec", "networks", index, "subnet")
        try:
            subnet = ipaddress.IPv4Network(raw_subnet, strict=True)
        except ValueError as error:
            hint = ""
            if "host bits set" in str(error):
                hint = f"; did you mean {ipaddress.IPv4Network(raw_subnet, strict=False)}?"
            issues.append(_issue_at(positions, subnet_path, f"invalid subnet {raw_subnet!r}: {error}{hint}"))
            continue
        if not MIN_PREFIX_LENGTH <= subnet.prefixlen <= MAX_PREFIX_LENGTH:
            issues.append(
                _issue_at(
                    positions,
                    subnet_path,
                    f"prefix length must be between /{MIN_PREFIX_LENGTH} and "
                    f"/{MAX_PREFIX_LENGTH}, not /{subnet.prefixlen}",
                )
            )
            continue
        for other, other_index in declared_subnets:
            if subnet.overlaps(other):
                other_name = config.networks[other_index].name
                issues.append(
                    _issue_at(
                        positions, subnet_path, f"subnet {subnet} overlaps {other} of network {other_name!r}"
                    )
                )
                break
        declared_subnets.append((subnet, index))

    volume_index: dict[str, int] = {}
    for index, volume in enumerate(config.volumes):
        if volume.name in volume_index:
            first = ("spec", "volumes", volume_index[volume.name])
            issues.append(
                _issue_at(
                    positions,
                    ("spec", "volumes", index, "name"),
                    f"duplicate volume name {volume.name!r}{first_line(first)}",
                )
            )
        else:
            volume_index[volume.name] = index
    if config.prune_volumes and not config.prune:
        issues.append(
            _issue_at(
                positions,
                ("spec", "prune_volumes"),
                "prune_volumes only takes effect with prune: true; set both to allow deleting volumes",
            )
        )
    issues.extend(_mount_issues(config, positions, volume_index, set(known_volumes)))

    workload_index: dict[str, int] = {}
    for index, workload in enumerate(config.workloads):
        path: DocumentPath = ("spec", "workloads", index)
        if workload.name in workload_index:
            first = ("spec", "workloads", workload_index[workload.name])
            issues.append(
                _issue_at(
                    positions,
                    (*path, "name"),
                    f"duplicate workload name {workload.name!r}{first_line(first)}",
                )
            )
        else:
            workload_index[workload.name] = index
        for variable in sorted(set(workload.env) & set(workload.secret_env)):
            issues.append(
                _issue_at(
                    positions,
                    (*path, "secret_env", variable),
                    f"{variable} is set both in env and in secret_env",
                )
            )
        if not math.isfinite(workload.vcpus):
            issues.append(_issue_at(positions, (*path, "vcpus"), "must be a finite number"))
        elif workload.isolation == "microvm" and not float(workload.vcpus).is_integer():
            issues.append(
                _issue_at(
                    positions,
                    (*path, "vcpus"),
                    f"a micro-VM needs a whole number of vCPUs, not {workload.vcpus}",
                )
            )
        for network_position, network_name in enumerate(workload.networks):
            network_path = (*path, "networks", network_position)
            if network_name in network_index:
                continue
            if network_name in known_networks:
                if config.prune:
                    issues.append(
                        _issue_at(
                            positions,
                            network_path,
                            f"network {network_name!r} exists but is not declared; with "
                            "prune: true it would be deleted, so declare it",
                        )
                    )
                continue
            issues.append(
                _issue_at(
                    positions,
                    network_path,
                    f"unknown network {network_name!r}: declare it under spec.networks",
                )
            )

    port_index: dict[str, int] = {}
    host_port_index: dict[tuple[int, str], int] = {}
    for index, port in enumerate(config.ports):
        path = ("spec", "ports", index)
        key = port_key(port.workload, port.port, port.protocol)
        if key in port_index:
            first = ("spec", "ports", port_index[key])
            issues.append(
                _issue_at(
                    positions,
                    (*path, "port"),
                    f"port {port.port}/{port.protocol} of workload {port.workload!r} is "
                    f"published twice{first_line(first)}",
                )
            )
        else:
            port_index[key] = index
        if port.workload not in workload_index:
            issues.append(
                _issue_at(
                    positions,
                    (*path, "workload"),
                    f"unknown workload {port.workload!r}: declare it under spec.workloads",
                )
            )
        if port.host_port is None:
            continue
        host_key = (port.host_port, port.protocol)
        if host_key in host_port_index:
            first = ("spec", "ports", host_port_index[host_key])
            issues.append(
                _issue_at(
                    positions,
                    (*path, "host_port"),
                    f"host port {port.host_port}/{port.protocol} is used twice{first_line(first)}",
                )
            )
        else:
            host_port_index[host_key] = index
        if host_port_range is not None and not host_port_range[0] <= port.host_port <= host_port_range[1]:
            issues.append(
                _issue_at(
                    positions,
                    (*path, "host_port"),
                    f"host port {port.host_port} is outside the operator's range "
                    f"{host_port_range[0]}-{host_port_range[1]}",
                )
            )
    return issues


def _mount_issues(
    config: TenantConfig,
    positions: Mapping[DocumentPath, SourcePosition],
    volume_index: Mapping[str, int],
    known_volumes: set[str],
) -> list[ValidationIssue]:
    """Mount paths, references to volumes, and one writer or many readers per volume."""
    issues: list[ValidationIssue] = []
    deletes_undeclared = config.prune and config.prune_volumes
    # volume name -> (workload, read_only, path) of each mount, in document order
    users: dict[str, list[tuple[str, bool, DocumentPath]]] = {}
    for index, workload in enumerate(config.workloads):
        seen_paths: set[str] = set()
        seen_volumes: set[str] = set()
        for position, mount in enumerate(workload.volumes):
            path: DocumentPath = ("spec", "workloads", index, "volumes", position)
            problem = mount_path_problem(mount.path)
            if problem is not None:
                issues.append(_issue_at(positions, (*path, "path"), problem))
            elif mount.path in seen_paths:
                issues.append(_issue_at(positions, (*path, "path"), f"two volumes at {mount.path}"))
            seen_paths.add(mount.path)
            if mount.volume in seen_volumes:
                issues.append(
                    _issue_at(positions, (*path, "volume"), f"volume {mount.volume!r} is mounted twice")
                )
                continue
            seen_volumes.add(mount.volume)
            if mount.volume not in volume_index:
                if mount.volume not in known_volumes:
                    issues.append(
                        _issue_at(
                            positions,
                            (*path, "volume"),
                            f"unknown volume {mount.volume!r}: declare it under spec.volumes",
                        )
                    )
                    continue
                if deletes_undeclared:
                    issues.append(
                        _issue_at(
                            positions,
                            (*path, "volume"),
                            f"volume {mount.volume!r} exists but is not declared; with prune: true and "
                            "prune_volumes: true it would be deleted, so declare it",
                        )
                    )
                    continue
            users.setdefault(mount.volume, []).append((workload.name, mount.read_only, path))
    for volume, mounts in users.items():
        writers = [entry for entry in mounts if not entry[1]]
        if writers and len(mounts) > 1:
            writer = writers[0]
            # Reported where the conflict appears, reading top down.
            conflicting = mounts[1] if mounts[0] is writer else writer
            issues.append(
                _issue_at(
                    positions,
                    (*conflicting[2], "volume"),
                    f"volume {volume!r} is mounted read-write by {writer[0]!r}; a volume has one "
                    "read-write workload or any number of read-only ones",
                )
            )
    return issues


def _resolve_images(
    config: TenantConfig,
    data: Mapping[str, Any],
    positions: Mapping[DocumentPath, SourcePosition],
    resolve_image: ImageResolver,
) -> tuple[TenantConfig, list[ValidationIssue]]:
    resolved: dict[str, str | None] = {}
    issues: list[ValidationIssue] = []
    workloads = []
    prefetch = getattr(resolve_image, "prefetch", None)
    if prefetch is not None:  # a resolver that can look every reference up at once (one query)
        prefetch({workload.image for workload in config.workloads})
    for index, workload in enumerate(config.workloads):
        if workload.image not in resolved:
            resolved[workload.image] = resolve_image(workload.image)
        image_id = resolved[workload.image]
        if image_id is None:
            issues.append(
                _issue_at(
                    positions, ("spec", "workloads", index, "image"), f"image not found: {workload.image!r}"
                )
            )
        workloads.append(replace(workload, image_id=image_id))
    return replace(config, workloads=tuple(workloads)), issues


# --------------------------------------------------------------------------------------------------------
# Revisions and export


def diff_documents(
    old_text: str, new_text: str, *, old_label: str = "previous", new_label: str = "new"
) -> str:
    """Unified diff between two revisions' texts (empty when they are identical)."""
    old_lines = old_text.splitlines(keepends=True)
    new_lines = new_text.splitlines(keepends=True)
    # A last line without newline would glue onto the next diff line.
    for lines in (old_lines, new_lines):
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
    return "".join(difflib.unified_diff(old_lines, new_lines, fromfile=old_label, tofile=new_label))


class _ExportDumper(yaml.SafeDumper):
    """Writes no anchors (the parser refuses them), indents lists, keeps lists of scalars on one line."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def represent_list(self, data: Any) -> yaml.SequenceNode:
        scalars_only = all(isinstance(item, str | int | float | bool) for item in data)
        return self.represent_sequence(_YAML_TAG_PREFIX + "seq", data, flow_style=scalars_only)


_ExportDumper.add_representer(list, _ExportDumper.represent_list)


_EXPORT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "network": ("name", "subnet", "nat"),
    "volume": ("name", "size_gib", "backups"),
    "workload": (
        "name",
        "image",
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
}


def _export_order(resource: ObservedResource) -> tuple[int, str, int, str]:
    # Ports in numeric order (80 before 443), which the string keys would not give.
    spec = resource.spec
    if resource.kind == "port":
        return (RESOURCE_KINDS.index("port"), str(spec["workload"]), int(spec["port"]), str(spec["protocol"]))
    return (RESOURCE_KINDS.index(resource.kind), resource.key, 0, "")


def export_document(
    observed: Iterable[ObservedResource], *, name: str | None = None, prune: bool = False
) -> str:
    """YAML of the current resources, so that a tenant can adopt what exists by submitting it.

    System-assigned values (subnet, host port) are written out, pinning them; ``image_id`` is not (the
    document names images by reference). The output parses back with :func:`parse_document` into
    resources whose declared fields equal the observed ones.
    """
    sections: dict[str, list[dict[str, Any]]] = {"networks": [], "volumes": [], "workloads": [], "ports": []}
    section_of_kind = {"network": "networks", "volume": "volumes", "workload": "workloads", "port": "ports"}
    for resource in sorted(observed, key=_export_order):
        entry: dict[str, Any] = {}
        for name_of_field in _EXPORT_FIELDS[resource.kind]:
            value = resource.spec.get(name_of_field)
            if value is None or value == {} or value == []:
                continue
            if name_of_field == "vcpus":
                value = normalise_vcpus(value)
            entry[name_of_field] = value
        sections[section_of_kind[resource.kind]].append(entry)
    document: dict[str, Any] = {"apiVersion": tenant_schema.API_VERSION, "kind": tenant_schema.KIND}
    if name:
        document["metadata"] = {"name": name}
    document["spec"] = {"prune": prune, **{section: items for section, items in sections.items() if items}}
    header = "# Exported by Bulkhead from the tenant's current resources.\n"
    body = yaml.dump(document, Dumper=_ExportDumper, sort_keys=False, allow_unicode=True, width=110)
    return header + body
