"""The config documents, declared once: frozen pydantic models with camelCase aliases.

These classes are the schema (the loader validates documents against them, ``dump`` and the
JSON Schema come from them) and the objects the data path reads: fields are plain attributes,
validation runs once per (re)load, never per connection.  Shapes follow ztunnel's local
config file (DESIGN §6).  Leaf values have their own validators so every message says what
is wrong in the user's terms; the loader maps each error to file:line:column and key path.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.dataclasses import dataclass as document
from pydantic_core import ArgsKwargs, PydanticCustomError

from ztunnel_cfg.errors import NodeproxyError
from ztunnel_cfg.spiffe import DEFAULT_TRUST_DOMAIN, NodeId, SpiffeId, check_trust_domain

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HBONE_PORT = 15008
DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_CANONICAL_REVISION = "latest"

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


def invalid(message: str, *sub: str | int) -> PydanticCustomError:
    """A validation error with our own message; ``sub`` narrows the location below the value.

    The message travels in the context so braces in it are never read as a template.
    """
    return PydanticCustomError("nodeproxy", "{message}", {"message": message, "sub": sub})


def describe(value: object) -> str:
    """A value as a message shows it: ``integer 5``, ``a list``, ``string 'x'``."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    return f"{type(value).__name__} {value!r}"


# --- leaf types ---------------------------------------------------------------------------

# Names that end up in identities, keys or node certificates: DNS-1123-like.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"
_NAME = re.compile(NAME_PATTERN)
# Label values and free-form names: no whitespace, no '/'.
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$"
_TOKEN = re.compile(LABEL_VALUE_PATTERN)
_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_WILDCARD_TAIL = re.compile(r"^[A-Za-z0-9._/:-]+$")
_HTTP_METHOD = re.compile(r"^[A-Z]+$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise invalid(f"expected a string, got {describe(value)}")
    if not value:
        raise invalid("must not be empty")
    return value


def _name_check(kind: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _text(value)
        if not _NAME.match(text):
            raise invalid(
                f"{text!r} is not a valid {kind} "
                "(lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"
            )
        return text

    return check


def _token(value: object) -> str:
    text = _text(value)
    if not _TOKEN.match(text):
        raise invalid(f"{text!r} may contain only letters, digits, '-', '_' and '.'")
    return text


def _free_text(value: object) -> str:
    text = _text(value)
    if any(c.isspace() for c in text):
        raise invalid(f"{text!r} must not contain whitespace")
    return text


def _abs_path(value: object) -> str:
    text = _free_text(value)
    if not text.startswith("/"):
        raise invalid(f"{text!r} must be an absolute path")
    return text


def _hostname(value: object) -> str:
    text = _free_text(value)
    if "/" in text:
        raise invalid(f"{text!r} must not contain '/'")
    return text


def _trust_domain(value: object) -> str:
    text = _text(value)
    try:
        return check_trust_domain(text)
    except NodeproxyError as exc:
        raise invalid(exc.message) from None


def _node_name(value: object) -> str:
    text = _text(value)
    try:
        NodeId.of(text)
    except NodeproxyError:
        raise invalid(f"{text!r} is not a valid node name (lowercase DNS name)") from None
    return text


def _spiffe_id(value: object) -> str:
    text = _text(value)
    try:
        SpiffeId.parse(text)
    except NodeproxyError as exc:
        raise invalid(exc.message) from None
    return text


def _service_key(value: object) -> str:
    text = _text(value)
    namespace, slash, hostname = text.partition("/")
    if not slash or not namespace or not hostname or "/" in hostname:
        raise invalid(f"{text!r} is not a service reference of the form 'namespace/hostname'")
    return text


def _int(value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)  # JSON documents can only have string keys
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"expected an integer, got {describe(value)}")
    return value


def _port(value: object) -> int:
    port = _int(value)
    if not 1 <= port <= 65535:
        raise invalid(f"port {port} is out of range (1-65535)")
    return port


def _ranged(what: str, low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise invalid(f"{what} {number} is out of range ({low}-{high})")
        return number

    return check


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"expected true or false, got {describe(value)}")
    return value


_MAX_SECONDS = 86400 * 365
# Go / Istio style: "250ms", "2s", "1.5s", "1m", "1h", or parts of those: "1m30s".
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|h|m|s))+$"
_DURATION = re.compile(DURATION_PATTERN)
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_EXAMPLES = "e.g. 250ms, 2s, 1.5s, 1m, 1h, or a number of seconds"


def _duration(*, allow_zero: bool = False) -> Callable[[object], float]:
    """A duration in seconds from ``2s``-style text or a number; 0 only with ``allow_zero``."""

    def check(value: object) -> float:
        if isinstance(value, str):
            text = value.strip()
            if not _DURATION.match(text):
                raise invalid(f"{value!r} is not a duration ({_DURATION_EXAMPLES})")
            seconds = sum(
                float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text)
            )
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"expected a duration ({_DURATION_EXAMPLES}), got {describe(value)}")
        else:
            seconds = float(value)
        if seconds != seconds or seconds >= _MAX_SECONDS or seconds < 0:  # NaN or out of range
            raise invalid(f"duration {value} is out of range (0 to 365 days)")
        if seconds == 0 and not allow_zero:
            raise invalid(f"duration {value} must be more than 0")
        return seconds

    return check


def _duration_schema(minimum_key: str) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", minimum_key: 0, "exclusiveMaximum": _MAX_SECONDS},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": f"seconds, or text: {_DURATION_EXAMPLES}",
        }
    )


def _ip(value: object) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    text = _text(value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise invalid(f"{text!r} is not an IP address") from None


def _vip(value: object) -> IPAddress:
    # ztunnel writes VIPs as "network/ip"; "/ip" is the default network.  A bare IP is accepted.
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    text = _text(value)
    try:
        return ipaddress.ip_address(text.rpartition("/")[2])
    except ValueError:
        raise invalid(f"{text!r} is not a VIP ('/10.96.0.10' or 'network/10.96.0.10')") from None


def _cidr(value: object) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    text = _text(value)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.ip_network(text, strict=False)
            raise invalid(f"{text!r} has host bits set (did you mean '{fixed}'?)") from None
        raise invalid(f"{text!r} is not an IP address or CIDR") from None


def _enum(kind: type[E], what: str) -> Callable[[object], E]:
    by_value = {m.value: m for m in kind}

    def check(value: object) -> E:
        if isinstance(value, kind):
            return value
        member = by_value.get(value) if isinstance(value, str) else None
        if member is None:
            allowed = ", ".join(repr(v) for v in by_value)
            shown = repr(value) if isinstance(value, str) else describe(value)
            raise invalid(f"{shown} is not a valid {what} ({allowed})")
        return member

    return check


def _string(pattern: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "minLength": 1, "pattern": pattern})


def _enum_schema(kind: type[enum.Enum]) -> WithJsonSchema:
    return WithJsonSchema({"enum": [m.value for m in kind]})


def _value_of(member: enum.Enum) -> Any:
    return member.value


def _vip_text(ip: IPAddress) -> str:
    return f"/{ip}"


Namespace = Annotated[str, PlainValidator(_name_check("namespace")), _string(NAME_PATTERN)]
ServiceAccount = Annotated[
    str, PlainValidator(_name_check("service account")), _string(NAME_PATTERN)
]
ServiceName = Annotated[str, PlainValidator(_name_check("service name")), _string(NAME_PATTERN)]
PolicyName = Annotated[str, PlainValidator(_name_check("policy name")), _string(NAME_PATTERN)]
WaypointName = Annotated[str, PlainValidator(_name_check("waypoint name")), _string(NAME_PATTERN)]
RouteName = Annotated[str, PlainValidator(_name_check("route name")), _string(NAME_PATTERN)]
Token = Annotated[str, PlainValidator(_token), _string(LABEL_VALUE_PATTERN)]
FreeText = Annotated[str, PlainValidator(_free_text), _string(r"^\S+$")]
AbsPath = Annotated[str, PlainValidator(_abs_path), _string(r"^/\S*$")]
Hostname = Annotated[str, PlainValidator(_hostname), _string(r"^[^\s/]+$")]
TrustDomain = Annotated[str, PlainValidator(_trust_domain), _string(r"^[a-z0-9._-]+$")]
NodeName = Annotated[str, PlainValidator(_node_name), _string(NAME_PATTERN)]
SpiffeIdText = Annotated[str, PlainValidator(_spiffe_id), _string(r"^spiffe://")]
ServiceKey = Annotated[str, PlainValidator(_service_key), _string(r"^[^/\s]+/[^/\s]+$")]
Port = Annotated[
    int,
    PlainValidator(_port),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535}),
]
Weight = Annotated[
    int,
    PlainValidator(_ranged("weight", 0, 1_000_000)),
    WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 1_000_000}),
]
Attempts = Annotated[
    int,
    PlainValidator(_ranged("attempts", 0, 100)),
    WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 100}),
]
Bool = Annotated[bool, PlainValidator(_bool), WithJsonSchema({"type": "boolean"})]


def _int_schema(low: int, high: int) -> WithJsonSchema:
    return WithJsonSchema({"type": "integer", "minimum": low, "maximum": high})


# Istio's "no limit" for connection pool settings.
UNLIMITED = 2**32 - 1
StatusCode = Annotated[int, PlainValidator(_ranged("status code", 100, 599)), _int_schema(100, 599)]
Percent = Annotated[int, PlainValidator(_ranged("percentage", 0, 100)), _int_schema(0, 100)]
Limit = Annotated[int, PlainValidator(_ranged("limit", 1, UNLIMITED)), _int_schema(1, UNLIMITED)]
LimitOrZero = Annotated[
    int, PlainValidator(_ranged("limit", 0, UNLIMITED)), _int_schema(0, UNLIMITED)
]
Count = Annotated[int, PlainValidator(_ranged("count", 0, UNLIMITED)), _int_schema(0, UNLIMITED)]
# Held as float seconds; written as a number or as text (``250ms``, ``1.5s``, ``1m``).
Duration = Annotated[float, PlainValidator(_duration()), _duration_schema("exclusiveMinimum")]
# 0 disables (a timeout of 0 is "no timeout", as in Gateway API).
DurationOrOff = Annotated[
    float, PlainValidator(_duration(allow_zero=True)), _duration_schema("minimum")
]
IP = Annotated[
    IPAddress,
    PlainValidator(_ip),
    PlainSerializer(str),
    WithJsonSchema({"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}),
]
VIP = Annotated[
    IPAddress,
    PlainValidator(_vip),
    PlainSerializer(_vip_text),
    WithJsonSchema({"type": "string", "pattern": r"^([^/]*/)?[0-9A-Fa-f.:]+$"}),
]
CIDR = Annotated[
    IPNetwork,
    PlainValidator(_cidr),
    PlainSerializer(str),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9A-Fa-f.:]+(/[0-9]+)?$"}),
]


# --- mappings written as YAML maps, held as ordered pairs -----------------------------------


def _pairs(value: object) -> object:
    """A YAML mapping becomes its (key, value) pairs, in file order (the data path's shape).

    Errors inside are located by pair index; the loader maps them back to the key.
    """
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, tuple):  # already pairs (built in Python, or a model re-validated)
        return value
    raise invalid(f"expected a mapping, got {describe(value)}")


def _as_dict(pairs: tuple[tuple[Any, Any], ...]) -> dict[Any, Any]:
    return dict(pairs)


def _as_dict_of_dicts(pairs: tuple[tuple[Any, Any], ...]) -> dict[Any, Any]:
    return {key: dict(inner) for key, inner in pairs}


def _map_schema(keys: dict[str, Any], values: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema({"type": "object", "propertyNames": keys, "additionalProperties": values})


_PORT_SCHEMA = {"type": "integer", "minimum": 1, "maximum": 65535}
_PORT_KEY_SCHEMA = {"pattern": r"^[0-9]+$"}


def _label_key(value: object) -> str:
    text = _text(value)
    if not _LABEL_KEY.match(text):
        raise invalid(f"{text!r} is not a valid label key")
    return text


def _header_name(value: object) -> str:
    text = _text(value).lower()
    if not _HEADER_NAME.match(text):
        raise invalid(f"{text!r} is not a valid header name")
    return text


def _header_value(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # `value: 1` is a number in YAML; header values are text.
        raise invalid(f'expected a string, got {describe(value)} (quote it: "{value}")')
    if not isinstance(value, str):
        raise invalid(f"expected a string, got {describe(value)}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise invalid(f"{value!r}: a header value must not contain CR, LF or NUL")
    return value


def _optional_pairs(value: object) -> object:
    return () if value is None else _pairs(value)


# (service port, target port) pairs, in the order the config lists them.
PortMap = Annotated[
    tuple[tuple[Port, Port], ...],
    BeforeValidator(_optional_pairs),
    PlainSerializer(_as_dict),
    _map_schema(_PORT_KEY_SCHEMA, _PORT_SCHEMA),
]
Labels = Annotated[
    tuple[
        tuple[
            Annotated[str, PlainValidator(_label_key)],
            Annotated[str, PlainValidator(_token)],
        ],
        ...,
    ],
    BeforeValidator(_pairs),
    PlainSerializer(_as_dict),
    _map_schema({"minLength": 1}, {"type": "string", "pattern": LABEL_VALUE_PATTERN}),
]
HeaderName = Annotated[
    str, PlainValidator(_header_name), _string(_HEADER_NAME.pattern.replace("a-z", "A-Za-z"))
]
HeaderValue = Annotated[str, PlainValidator(_header_value), WithJsonSchema({"type": "string"})]
WorkloadServices = Annotated[
    tuple[tuple[ServiceKey, PortMap], ...],
    BeforeValidator(_pairs),
    PlainSerializer(_as_dict_of_dicts),
    _map_schema(
        {"pattern": r"^[^/\s]+/[^/\s]+$"},
        {
            "type": ["object", "null"],
            "propertyNames": _PORT_KEY_SCHEMA,
            "additionalProperties": _PORT_SCHEMA,
        },
    ),
]


# --- enums --------------------------------------------------------------------------------


class Protocol(enum.Enum):
    """How a workload receives traffic: HBONE (in the mesh) or plain TCP (not in the mesh)."""

    HBONE = "HBONE"
    TCP = "TCP"


class Scope(enum.Enum):
    GLOBAL = "Global"
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class MtlsMode(enum.Enum):
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"


class TrafficType(enum.Enum):
    """Which traffic a waypoint handles (Istio's ``istio.io/waypoint-for``)."""

    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"


ProtocolField = Annotated[
    Protocol,
    PlainValidator(_enum(Protocol, "protocol")),
    PlainSerializer(_value_of),
    _enum_schema(Protocol),
]
ScopeField = Annotated[
    Scope, PlainValidator(_enum(Scope, "scope")), PlainSerializer(_value_of), _enum_schema(Scope)
]
ActionField = Annotated[
    Action,
    PlainValidator(_enum(Action, "action")),
    PlainSerializer(_value_of),
    _enum_schema(Action),
]
MtlsModeField = Annotated[
    MtlsMode,
    PlainValidator(_enum(MtlsMode, "mTLS mode")),
    PlainSerializer(_value_of),
    _enum_schema(MtlsMode),
]
TrafficTypeField = Annotated[
    TrafficType,
    PlainValidator(_enum(TrafficType, "traffic type")),
    PlainSerializer(_value_of),
    _enum_schema(TrafficType),
]


# --- documents ----------------------------------------------------------------------------


# Pydantic dataclasses, not BaseModel: slotted, so the data path's attribute reads cost what
# they did with plain frozen dataclasses (BaseModel's instance dict made authorize() ~15% slower).
_DOCUMENT = ConfigDict(
    extra="forbid",
    alias_generator=to_camel,
    validate_by_name=True,  # Python code constructs with field names
    validate_by_alias=True,
    serialize_by_alias=True,
)


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Doc:
    """Base of every config document: frozen, unknown keys rejected, camelCase keys.

    Python code may construct with field names; the loader validates by alias only.
    """

    # What a message calls a value of this type when it is not a mapping.
    expected: ClassVar[str] = "a mapping"

    @model_validator(mode="before")
    @classmethod
    def _not_set_when_null(cls, data: Any) -> Any:
        # `key:` with nothing after it means "not set", as if the key were absent.
        if isinstance(data, dict):
            if None in data.values():
                return {k: v for k, v in data.items() if v is not None}
            return data
        if isinstance(data, Doc | ArgsKwargs):
            return data
        raise invalid(f"expected {cls.expected}, got {describe(data)}{cls._shape_hint()}")

    @classmethod
    def _shape_hint(cls) -> str:
        return ""


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class WaypointRef(Doc):
    """Reference to the service fronting a waypoint: ``destination`` is ``ns/hostname``."""

    destination: ServiceKey
    hbone_mtls_port: Port = HBONE_PORT


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Workload(Doc):
    uid: FreeText = ""  # filled in: ztunnel's "<clusterId>//v1/Pod/<namespace>/<name>"
    name: Token
    namespace: Namespace
    service_account: ServiceAccount = "default"
    workload_ips: tuple[IP, ...]
    node: NodeName
    protocol: ProtocolField = Protocol.HBONE
    netns: AbsPath | None = None
    # The pod's cgroup v2 directory: where eBPF capture (--redirect ebpf) attaches.
    cgroup: AbsPath | None = None
    waypoint: WaypointRef | None = None
    # (("ns/hostname", ((port, target_port), ...)), ...)
    services: WorkloadServices = ()
    canonical_name: Token = ""  # filled in: ``name``
    canonical_revision: Token = DEFAULT_CANONICAL_REVISION
    trust_domain: TrustDomain = DEFAULT_TRUST_DOMAIN  # the document's trustDomain when absent
    cluster_id: Token = DEFAULT_CLUSTER_ID
    healthy: Bool = True
    labels: Labels = ()

    @field_validator("workload_ips")
    @classmethod
    def _ips(cls, ips: tuple[IPAddress, ...]) -> tuple[IPAddress, ...]:
        if not ips:
            raise invalid("must list at least one IP")
        if len(set(ips)) != len(ips):
            seen: set[IPAddress] = set()
            for index, ip in enumerate(ips):
                if ip in seen:
                    raise invalid(f"IP {ip} is listed twice", index)
                seen.add(ip)
        return ips

    @model_validator(mode="after")
    def _defaults(self) -> Workload:
        # Derived defaults; set once here, before anyone can see the object.
        if not self.uid:
            uid = f"{self.cluster_id}//v1/Pod/{self.namespace}/{self.name}"
            object.__setattr__(self, "uid", uid)
        if not self.canonical_name:
            object.__setattr__(self, "canonical_name", self.name)
        return self

    @property
    def identity(self) -> SpiffeId:
        # Parts were validated on load; building directly avoids re-parsing per call.
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        """``namespace/name``, for messages and tables."""
        return f"{self.namespace}/{self.name}"

    @property
    def app(self) -> str:
        return self.canonical_name or self.name

    def effective_labels(self) -> dict[str, str]:
        """Explicit ``labels`` plus ``app``/``version`` from the canonical name and revision."""
        labels = {"app": self.app, "version": self.canonical_revision}
        labels.update(self.labels)
        return labels

    def target_port(self, service_key: str, port: int) -> int | None:
        """The workload's own port mapping for ``service_key:port``, if it declares one."""
        for key, ports in self.services:
            if key == service_key:
                for svc_port, target in ports:
                    if svc_port == port:
                        return target
        return None


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Service(Doc):
    name: ServiceName
    namespace: Namespace
    hostname: Hostname = ""  # filled in: "<name>.<namespace>.svc.cluster.local"
    vips: tuple[VIP, ...] = ()
    ports: PortMap = ()
    subject_alt_names: tuple[SpiffeIdText, ...] = ()
    waypoint: WaypointRef | None = None

    @model_validator(mode="after")
    def _defaults(self) -> Service:
        if not self.hostname:
            object.__setattr__(self, "hostname", f"{self.name}.{self.namespace}.svc.cluster.local")
        return self

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def target_port(self, port: int) -> int | None:
        for svc_port, target in self.ports:
            if svc_port == port:
                return target
        return None


def _path_value(value: object) -> str:
    text = _free_text(value)
    if not text.startswith("/"):
        raise invalid(f"{text!r} must start with '/'")
    return text


def _method(value: object) -> str:
    text = _text(value)
    if not _HTTP_METHOD.match(text):
        raise invalid(f"{text!r} is not an HTTP method (upper case, e.g. GET)")
    return text


HttpPath = Annotated[str, PlainValidator(_path_value), _string(r"^/\S*$")]
HttpMethod = Annotated[str, PlainValidator(_method), _string(r"^[A-Z]+$")]


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio string match: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""

    text: str

    def matches(self, value: str) -> bool:
        t = self.text
        if t == "*":
            return True
        if t.endswith("*"):
            return value.startswith(t[:-1])
        if t.startswith("*"):
            return value.endswith(t[1:])
        return value == t

    def __str__(self) -> str:
        return self.text


def _string_match(kind: str) -> Callable[[object], StringMatch]:
    def check(value: object) -> StringMatch:
        if isinstance(value, StringMatch):
            return value
        text = _text(value)
        if text == "*":
            return StringMatch(text)
        core = text[:-1] if text.endswith("*") else text[1:] if text.startswith("*") else text
        if "*" in core or not core:
            raise invalid(f"{text!r}: '*' is allowed only alone, at the start or at the end")
        if any(c.isspace() for c in core):
            raise invalid(f"{text!r} must not contain whitespace")
        if kind == "principal":
            if text.endswith("*"):
                if not text.startswith("spiffe://"):
                    raise invalid(f"{text!r}: a principal prefix must start with 'spiffe://'")
            elif text.startswith("*"):
                if not _WILDCARD_TAIL.match(core):
                    raise invalid(f"{text!r} is not a valid principal suffix")
            else:
                try:
                    SpiffeId.parse(text)
                except NodeproxyError as exc:
                    raise invalid(
                        f"{exc.message} (principals are full SPIFFE IDs, "
                        "optionally with a leading or trailing '*')"
                    ) from None
        elif not text.startswith("*") and not text.endswith("*") and not _NAME.match(text):
            raise invalid(f"{text!r} is not a valid {kind}")
        return StringMatch(text)

    return check


_MATCH_SCHEMA = WithJsonSchema(
    {
        "type": "string",
        "minLength": 1,
        "description": "exact 'abc', prefix 'abc*', suffix '*abc' or presence '*'",
    }
)
NamespaceMatch = Annotated[
    StringMatch, PlainValidator(_string_match("namespace")), PlainSerializer(str), _MATCH_SCHEMA
]
ServiceAccountMatch = Annotated[
    StringMatch,
    PlainValidator(_string_match("service account")),
    PlainSerializer(str),
    _MATCH_SCHEMA,
]
PrincipalMatch = Annotated[
    StringMatch, PlainValidator(_string_match("principal")), PlainSerializer(str), _MATCH_SCHEMA
]


@dataclass(frozen=True, slots=True)
class PathPattern(StringMatch):
    """Istio path match: a :class:`StringMatch`, or a template with ``{*}`` / ``{**}``.

    ``{*}`` is exactly one non-empty segment; ``{**}`` is the rest of the path ('/'
    included, possibly empty) and only the last segment (Envoy's URI template matcher).
    """

    def matches(self, value: str) -> bool:
        if "{" in self.text:
            return _template_regex(self.text).fullmatch(value) is not None
        return StringMatch.matches(self, value)


@functools.lru_cache(maxsize=1024)
def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for segment in template.split("/"):
        if segment == "{*}":
            parts.append("[^/]+")
        elif segment == "{**}":
            parts.append(".*")
        else:
            parts.append(re.escape(segment))
    return re.compile("/".join(parts))


def _check_star(text: str) -> None:
    core = text[:-1] if text.endswith("*") else text[1:] if text.startswith("*") else text
    if text != "*" and ("*" in core or not core):
        raise invalid(f"{text!r}: '*' is allowed only alone, at the start or at the end")


def _path_pattern(value: object) -> PathPattern:
    if isinstance(value, PathPattern):
        return value
    text = _free_text(value)
    if "{" in text or "}" in text:
        segments = text.split("/")
        if not text.startswith("/"):
            raise invalid(f"{text!r}: a path template must start with '/'")
        for index, segment in enumerate(segments):
            if segment in ("{*}", "{**}"):
                if segment == "{**}" and index != len(segments) - 1:
                    raise invalid(f"{text!r}: '{{**}}' is allowed only as the last segment")
            elif "{" in segment or "}" in segment or "*" in segment:
                raise invalid(
                    f"{text!r}: in a path template, '{{*}}' (one segment) and '{{**}}' (the "
                    "rest) must each be a whole segment, and '*' may not appear elsewhere"
                )
        return PathPattern(text)
    _check_star(text)
    if not text.startswith(("/", "*")):
        raise invalid(f"{text!r} must start with '/' (or '*' for a suffix match)")
    return PathPattern(text)


def _host_match(value: object) -> StringMatch:
    if isinstance(value, StringMatch):
        return value
    text = _hostname(value).lower()  # hosts are compared case-insensitively
    _check_star(text)
    return StringMatch(text)


def _method_match(value: object) -> StringMatch:
    if isinstance(value, StringMatch):
        return value
    return StringMatch(_method(value))


def _header_value_match(value: object) -> StringMatch:
    if isinstance(value, StringMatch):
        return value
    text = _header_value(value)
    if not text:
        raise invalid("must not be empty (use '*' to require only that the header is present)")
    if text != "*" and text.strip("*") == "":
        raise invalid(f"{text!r}: '*' is allowed only alone, at the start or at the end")
    return StringMatch(text)


def _some_values(values: tuple[StringMatch, ...]) -> tuple[StringMatch, ...]:
    if not values:
        raise invalid("list at least one value ('*': the header is present)")
    return values


def _as_dict_of_texts(pairs: tuple[tuple[str, tuple[object, ...]], ...]) -> dict[str, Any]:
    return {key: [str(v) for v in values] for key, values in pairs}


MethodMatch = Annotated[
    StringMatch,
    PlainValidator(_method_match),
    PlainSerializer(str),
    _string(r"^[A-Z]+$"),
]
PathMatchText = Annotated[
    PathPattern,
    PlainValidator(_path_pattern),
    PlainSerializer(str),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "description": "exact '/a', prefix '/a*', suffix '*.html', presence '*', or a "
            "template: '/a/{*}/b' (one segment), '/a/{**}' (the rest)",
        }
    ),
]
HostMatch = Annotated[StringMatch, PlainValidator(_host_match), PlainSerializer(str), _MATCH_SCHEMA]
HeaderValueMatch = Annotated[
    StringMatch, PlainValidator(_header_value_match), PlainSerializer(str), _MATCH_SCHEMA
]
# Istio's `when: request.headers[name]`: header name -> values (string matches), ORed.
HeaderConditions = Annotated[
    tuple[
        tuple[
            HeaderName,
            Annotated[tuple[HeaderValueMatch, ...], AfterValidator(_some_values)],
        ],
        ...,
    ],
    BeforeValidator(_pairs),
    PlainSerializer(_as_dict_of_texts),
    _map_schema(
        {"pattern": _HEADER_NAME.pattern},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    ),
]

# Match fields only an HTTP-aware proxy (a waypoint) can check: (key, attribute).
HTTP_MATCH_FIELDS = (
    ("methods", "methods"),
    ("notMethods", "not_methods"),
    ("paths", "paths"),
    ("notPaths", "not_paths"),
    ("hosts", "hosts"),
    ("notHosts", "not_hosts"),
    ("requestHeaders", "request_headers"),
    ("notRequestHeaders", "not_request_headers"),
)

RULES_SHAPE = (
    "rules is a list of rules; a rule is a list of clauses (ANDed); a clause is a list of "
    "matches (ORed), e.g. rules: [[[{namespaces: [default]}]]]"
)


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Match(Doc):
    """One match of a clause.  Empty fields do not constrain; all set fields must hold."""

    expected: ClassVar[str] = "a match (a mapping)"

    namespaces: tuple[NamespaceMatch, ...] = ()
    not_namespaces: tuple[NamespaceMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[PrincipalMatch, ...] = ()
    not_principals: tuple[PrincipalMatch, ...] = ()
    source_ips: tuple[CIDR, ...] = ()
    not_source_ips: tuple[CIDR, ...] = ()
    destination_ips: tuple[CIDR, ...] = ()
    not_destination_ips: tuple[CIDR, ...] = ()
    destination_ports: tuple[Port, ...] = ()
    not_destination_ports: tuple[Port, ...] = ()
    # HTTP fields (Istio's `to.operation` and `when: request.headers[...]`): checked only by
    # waypoints; a node agent enforces them fail-closed (see authz).
    methods: tuple[MethodMatch, ...] = ()
    not_methods: tuple[MethodMatch, ...] = ()
    paths: tuple[PathMatchText, ...] = ()
    not_paths: tuple[PathMatchText, ...] = ()
    hosts: tuple[HostMatch, ...] = ()
    not_hosts: tuple[HostMatch, ...] = ()
    request_headers: HeaderConditions = ()
    not_request_headers: HeaderConditions = ()

    @classmethod
    def _shape_hint(cls) -> str:
        return f" ({RULES_SHAPE})"

    def http_fields(self) -> tuple[str, ...]:
        """The keys of the HTTP fields this match sets (what a node agent cannot check)."""
        return tuple(key for key, attr in HTTP_MATCH_FIELDS if getattr(self, attr))


def _list_of(what: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, list | tuple):
            raise invalid(f"expected {what}, got {describe(value)} ({RULES_SHAPE})")
        return value

    return check


# A clause is a list of matches ORed; a rule is a list of clauses ANDed (ztunnel's shape).
Clause = Annotated[tuple[Match, ...], BeforeValidator(_list_of("a clause (a list of matches)"))]
Rule = Annotated[tuple[Clause, ...], BeforeValidator(_list_of("a rule (a list of clauses)"))]


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class _Selecting(Doc):
    """Shared by policies and peerAuthentication: select workloads of the namespace."""

    # WorkloadSelector scope only: a workload in the namespace is selected when its uid is
    # listed, or when every selector label equals its effective label.
    selector: Labels = ()
    workload_uids: tuple[FreeText, ...] = ()


class TargetKind(enum.Enum):
    """What a policy's targetRef names (Istio: a Service, or a Gateway = a waypoint)."""

    SERVICE = "Service"
    GATEWAY = "Gateway"


TargetKindField = Annotated[
    TargetKind,
    PlainValidator(_enum(TargetKind, "targetRef kind")),
    PlainSerializer(_value_of),
    _enum_schema(TargetKind),
]
TargetName = Annotated[str, PlainValidator(_name_check("target name")), _string(NAME_PATTERN)]


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class TargetRef(Doc):
    """A service (by name) or a waypoint from ``waypoints:`` (kind Gateway), in the policy's
    namespace."""

    kind: TargetKindField
    name: TargetName


def _policy_schema(schema: dict[str, Any]) -> None:
    # `scope` is required unless the policy has targetRefs; JSON Schema here cannot say "unless".
    schema["required"] = [k for k in schema.get("required", []) if k != "scope"]
    scope = schema.get("properties", {}).get("scope")
    if isinstance(scope, dict):
        scope["description"] = "required unless targetRefs is set (then Namespace)"


@document(
    frozen=True,
    slots=True,
    kw_only=True,
    config=ConfigDict(**_DOCUMENT, json_schema_extra=_policy_schema),
)
class Policy(_Selecting):
    name: PolicyName
    namespace: Namespace
    scope: ScopeField  # optional with targetRefs (Namespace): see _scope_optional_with_targets
    action: ActionField
    rules: tuple[Rule, ...] = ()
    # Set: the policy applies at the waypoint for these targets, never at node agents.
    target_refs: tuple[TargetRef, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _scope_optional_with_targets(cls, data: Any) -> Any:
        # With targetRefs, scope may be left out (Namespace); without, it stays required.
        if isinstance(data, dict):
            if "scope" not in data and (data.get("targetRefs") or data.get("target_refs")):
                return {**data, "scope": Scope.NAMESPACE.value}
        elif isinstance(data, ArgsKwargs) and data.kwargs is not None:
            kwargs = data.kwargs
            if "scope" not in kwargs and kwargs.get("target_refs"):
                return ArgsKwargs(data.args, {**kwargs, "scope": Scope.NAMESPACE})
        return data

    @model_validator(mode="after")
    def _selector_needs_scope(self) -> Policy:
        if self.target_refs:
            for attr, key in (("selector", "selector"), ("workload_uids", "workloadUids")):
                if getattr(self, attr):
                    raise invalid(
                        f"{key!r} cannot be used with targetRefs: such a policy applies at the "
                        "waypoint to the targets it names; remove one of them",
                        key,
                    )
            if self.scope is not Scope.NAMESPACE:
                raise invalid(
                    f"scope {self.scope.value} does not apply to a policy with targetRefs "
                    "(the targets decide where it applies): leave 'scope' out",
                    "scope",
                )
            return self
        if self.scope is Scope.WORKLOAD_SELECTOR and not (self.selector or self.workload_uids):
            raise invalid("scope WorkloadSelector needs 'selector' or 'workloadUids'", "scope")
        if self.scope is not Scope.WORKLOAD_SELECTOR:
            for attr, key in (("selector", "selector"), ("workload_uids", "workloadUids")):
                if getattr(self, attr):
                    raise invalid(
                        f"{key!r} is only valid with scope WorkloadSelector "
                        f"(scope is {self.scope.value})",
                        key,
                    )
        return self

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def http_fields(self) -> tuple[str, ...]:
        """Keys of the HTTP fields any match of this policy sets, in first-seen order."""
        found: dict[str, None] = {}
        for rule in self.rules:
            for clause in rule:
                for match in clause:
                    for key in match.http_fields():
                        found[key] = None
        return tuple(found)


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class PeerAuthentication(_Selecting):
    """mTLS mode for the mesh (namespace None), a namespace, or selected workloads in it."""

    mode: MtlsModeField
    namespace: Namespace | None = None
    name: Token = ""

    @model_validator(mode="after")
    def _selector_needs_namespace(self) -> PeerAuthentication:
        if self.is_workload_specific and self.namespace is None:
            raise invalid("a workload-specific peerAuthentication needs a 'namespace'")
        return self

    @property
    def is_workload_specific(self) -> bool:
        return bool(self.selector or self.workload_uids)


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class WaypointConfig(Doc):
    """Declares that a service fronts a waypoint proxy (``waypoints:`` section)."""

    name: WaypointName
    namespace: Namespace
    service: ServiceKey  # "ns/hostname" of the waypoint's service
    traffic_type: TrafficTypeField = TrafficType.SERVICE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- L7: routes (Gateway API HTTPRoute) and traffic policies (Istio DestinationRule) -------


class PathMatchType(enum.Enum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


class ValueMatchType(enum.Enum):
    """How a header or query parameter value is compared."""

    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


class FilterType(enum.Enum):
    REQUEST_HEADER_MODIFIER = "RequestHeaderModifier"
    RESPONSE_HEADER_MODIFIER = "ResponseHeaderModifier"
    REQUEST_REDIRECT = "RequestRedirect"
    URL_REWRITE = "URLRewrite"
    REQUEST_MIRROR = "RequestMirror"


class PathModifierType(enum.Enum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


class Scheme(enum.Enum):
    HTTP = "http"
    HTTPS = "https"


class RetryOn(enum.Enum):
    """Envoy/Istio retry conditions."""

    CONNECT_FAILURE = "connect-failure"
    REFUSED_STREAM = "refused-stream"
    RESET = "reset"
    SERVER_ERROR = "5xx"
    GATEWAY_ERROR = "gateway-error"
    RETRIABLE_STATUS_CODES = "retriable-status-codes"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline-exceeded"
    RESOURCE_EXHAUSTED = "resource-exhausted"


class LoadBalancerPolicy(enum.Enum):
    LEAST_REQUEST = "LEAST_REQUEST"
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"


def _enum_field(kind: type[E], what: str) -> tuple[Any, ...]:
    return (PlainValidator(_enum(kind, what)), PlainSerializer(_value_of), _enum_schema(kind))


PathMatchTypeField = Annotated[PathMatchType, *_enum_field(PathMatchType, "path match type")]
ValueMatchTypeField = Annotated[ValueMatchType, *_enum_field(ValueMatchType, "match type")]
FilterTypeField = Annotated[FilterType, *_enum_field(FilterType, "filter type")]
PathModifierTypeField = Annotated[
    PathModifierType, *_enum_field(PathModifierType, "path modifier type")
]
SchemeField = Annotated[Scheme, *_enum_field(Scheme, "scheme")]
RetryOnField = Annotated[RetryOn, *_enum_field(RetryOn, "retry condition")]
LoadBalancerPolicyField = Annotated[
    LoadBalancerPolicy, *_enum_field(LoadBalancerPolicy, "load balancer")
]

# Istio's defaults (1.24+): 503 is no longer retried unless asked for.
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = (
    RetryOn.CONNECT_FAILURE,
    RetryOn.REFUSED_STREAM,
    RetryOn.UNAVAILABLE,
    RetryOn.CANCELLED,
)
DEFAULT_RETRY_BACKOFF = 0.025
REDIRECT_STATUS_CODES = (301, 302, 303, 307, 308)


def _regex(value: str, sub: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise invalid(f"{value!r} is not a valid regular expression: {exc}", sub) from None


def _request_path(value: object) -> str:
    text = _path_value(value)
    if "?" in text or "#" in text:
        raise invalid(
            f"{text!r}: a path must not contain '?' or '#' (match query parameters "
            "with 'queryParams')"
        )
    return text


def _prefix_replacement(value: object) -> str:
    # Gateway API allows "" (drop the matched prefix).
    if value == "":
        return ""
    return _request_path(value)


def _redirect_status(value: object) -> int:
    code = _int(value)
    if code not in REDIRECT_STATUS_CODES:
        allowed = ", ".join(map(str, REDIRECT_STATUS_CODES))
        raise invalid(f"redirect status code {code} is not one of {allowed}")
    return code


def _query_name(value: object) -> str:
    text = _free_text(value)
    if any(c in text for c in "&=#?"):
        raise invalid(f"{text!r} is not a valid query parameter name (no '&', '=', '#', '?')")
    return text


RequestPath = Annotated[str, PlainValidator(_request_path), _string(r"^/[^\s?#]*$")]
PrefixReplacement = Annotated[
    str, PlainValidator(_prefix_replacement), WithJsonSchema({"type": "string"})
]
RedirectStatus = Annotated[
    int, PlainValidator(_redirect_status), WithJsonSchema({"enum": list(REDIRECT_STATUS_CODES)})
]
QueryParamName = Annotated[str, PlainValidator(_query_name), _string(r"^[^\s&=#?]+$")]
AnyText = Annotated[str, PlainValidator(_text), _string(r"^.+$")]


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpPathMatch(Doc):
    """``Exact`` and ``PathPrefix`` compare path segments; ``RegularExpression`` must match
    the whole path (query excluded)."""

    type: PathMatchTypeField = PathMatchType.PATH_PREFIX
    value: AnyText = "/"

    @model_validator(mode="after")
    def _value_fits_type(self) -> HttpPathMatch:
        if self.type is PathMatchType.REGULAR_EXPRESSION:
            _regex(self.value, "value")
        else:
            try:
                _request_path(self.value)
            except PydanticCustomError as exc:
                raise invalid(str(exc), "value") from None
        return self

    @property
    def prefix(self) -> str:
        """The PathPrefix value without its trailing '/' (Gateway API ignores it); "" for /."""
        return self.value.rstrip("/")


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpHeaderMatch(Doc):
    type: ValueMatchTypeField = ValueMatchType.EXACT
    name: HeaderName
    value: HeaderValue

    @model_validator(mode="after")
    def _regex_compiles(self) -> HttpHeaderMatch:
        if self.type is ValueMatchType.REGULAR_EXPRESSION:
            _regex(self.value, "value")
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpQueryParamMatch(Doc):
    """Query parameter names are case-sensitive (Gateway API)."""

    type: ValueMatchTypeField = ValueMatchType.EXACT
    name: QueryParamName
    value: HeaderValue

    @model_validator(mode="after")
    def _regex_compiles(self) -> HttpQueryParamMatch:
        if self.type is ValueMatchType.REGULAR_EXPRESSION:
            _regex(self.value, "value")
        return self


def _unique_names(
    items: tuple[HttpHeaderMatch | HttpQueryParamMatch, ...], what: str, key: str
) -> None:
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.name in seen:
            raise invalid(
                f"{what} {item.name!r} is matched twice in one match (conditions are ANDed: "
                "keep one, or put the alternatives in separate matches)",
                key,
                index,
                "name",
            )
        seen.add(item.name)


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpRouteMatch(Doc):
    """Every condition set must hold.  No ``path`` is ``PathPrefix /`` (Gateway API)."""

    path: HttpPathMatch = HttpPathMatch()
    headers: tuple[HttpHeaderMatch, ...] = ()
    query_params: tuple[HttpQueryParamMatch, ...] = ()
    method: HttpMethod | None = None

    @model_validator(mode="after")
    def _names_once(self) -> HttpRouteMatch:
        _unique_names(self.headers, "header", "headers")
        _unique_names(self.query_params, "query parameter", "queryParams")
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpHeader(Doc):
    name: HeaderName
    value: HeaderValue


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HeaderModifier(Doc):
    """Applied as Envoy does: ``remove`` first, then ``set`` (replace), then ``add``."""

    set_headers: tuple[HttpHeader, ...] = Field(default=(), alias="set")
    add_headers: tuple[HttpHeader, ...] = Field(default=(), alias="add")
    remove_headers: tuple[HeaderName, ...] = Field(default=(), alias="remove")

    @model_validator(mode="after")
    def _names_once(self) -> HeaderModifier:
        for key, names in (
            ("set", [h.name for h in self.set_headers]),
            ("add", [h.name for h in self.add_headers]),
            ("remove", list(self.remove_headers)),
        ):
            seen: set[str] = set()
            for index, name in enumerate(names):
                if name in seen:
                    sub: tuple[str | int, ...] = (
                        (key, index) if key == "remove" else (key, index, "name")
                    )
                    raise invalid(f"header {name!r} is listed twice in {key!r}", *sub)
                seen.add(name)
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpPathModifier(Doc):
    type: PathModifierTypeField
    replace_full_path: RequestPath | None = None
    replace_prefix_match: PrefixReplacement | None = None

    @model_validator(mode="after")
    def _field_fits_type(self) -> HttpPathModifier:
        wanted = (
            "replaceFullPath"
            if self.type is PathModifierType.REPLACE_FULL_PATH
            else "replacePrefixMatch"
        )
        values = {
            "replaceFullPath": self.replace_full_path,
            "replacePrefixMatch": self.replace_prefix_match,
        }
        for key, value in values.items():
            if key != wanted and value is not None:
                raise invalid(
                    f"{key!r} does not go with type {self.type.value} (set {wanted!r} instead, "
                    f"or change the type)",
                    key,
                )
        if values[wanted] is None:
            raise invalid(f"type {self.type.value} needs {wanted!r}", wanted)
        return self

    @property
    def replacement(self) -> str:
        if self.type is PathModifierType.REPLACE_FULL_PATH:
            return self.replace_full_path or "/"
        return self.replace_prefix_match or ""


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RequestRedirect(Doc):
    """Unset parts keep the request's; the port follows Gateway API (see l7.rewrite)."""

    scheme: SchemeField | None = None
    hostname: Hostname | None = None
    path: HttpPathModifier | None = None
    port: Port | None = None
    status_code: RedirectStatus = 302


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class UrlRewrite(Doc):
    hostname: Hostname | None = None
    path: HttpPathModifier | None = None

    @model_validator(mode="after")
    def _rewrites_something(self) -> UrlRewrite:
        if self.hostname is None and self.path is None:
            raise invalid("set 'hostname' or 'path' (a URLRewrite that changes nothing)")
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class MirrorBackendRef(Doc):
    service: ServiceKey  # "ns/hostname"; must exist
    port: Port  # a port of that service


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RequestMirror(Doc):
    """A copy of the request goes to ``backendRef``; its response is dropped."""

    backend_ref: MirrorBackendRef
    percent: Percent = 100


# Filter type -> (attribute, key) of the one field it uses.
FILTER_FIELDS: dict[FilterType, tuple[str, str]] = {
    FilterType.REQUEST_HEADER_MODIFIER: ("request_header_modifier", "requestHeaderModifier"),
    FilterType.RESPONSE_HEADER_MODIFIER: ("response_header_modifier", "responseHeaderModifier"),
    FilterType.REQUEST_REDIRECT: ("request_redirect", "requestRedirect"),
    FilterType.URL_REWRITE: ("url_rewrite", "urlRewrite"),
    FilterType.REQUEST_MIRROR: ("request_mirror", "requestMirror"),
}


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpRouteFilter(Doc):
    """``type`` plus exactly the one field it names (Gateway API's shape)."""

    type: FilterTypeField
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None
    url_rewrite: UrlRewrite | None = None
    request_mirror: RequestMirror | None = None

    @model_validator(mode="after")
    def _field_fits_type(self) -> HttpRouteFilter:
        attr, key = FILTER_FIELDS[self.type]
        for other_type, (other_attr, other_key) in FILTER_FIELDS.items():
            if other_attr != attr and getattr(self, other_attr) is not None:
                raise invalid(
                    f"{other_key!r} does not match the filter's type {self.type.value} "
                    f"(set type: {other_type.value}, or move it to a filter of its own)",
                    other_key,
                )
        if getattr(self, attr) is None:
            raise invalid(f"a {self.type.value} filter needs {key!r}", key)
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class ParentRef(Doc):
    """The service a route attaches to; ``port`` None: every port of it."""

    service: ServiceKey
    port: Port | None = None


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class BackendRef(Doc):
    service: ServiceKey  # "ns/hostname"; must exist
    port: Port  # a port of that service
    weight: Weight = 1
    # Workload labels (effective labels: app/version included); must select an endpoint.
    subset: Labels = ()


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RouteTimeouts(Doc):
    """Gateway API: ``request`` is the whole request (retries included), ``backendRequest``
    each try.  0 means no timeout."""

    request: DurationOrOff | None = None
    backend_request: DurationOrOff | None = None

    @model_validator(mode="after")
    def _try_within_request(self) -> RouteTimeouts:
        if self.request and self.backend_request and self.backend_request > self.request:
            raise invalid(
                f"backendRequest ({self.backend_request:g}s) is longer than request "
                f"({self.request:g}s): each try must fit in the whole request's time",
                "backendRequest",
            )
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RouteRetry(Doc):
    """Retries after the first try.  Absent fields take Istio's defaults."""

    attempts: Attempts = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout: Duration | None = None
    backoff: Duration = DEFAULT_RETRY_BACKOFF
    retry_on: tuple[RetryOnField, ...] = DEFAULT_RETRY_ON
    # Retried when the response has one of these (implies retriable-status-codes).
    codes: tuple[StatusCode, ...] = ()


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RouteRule(Doc):
    matches: tuple[HttpRouteMatch, ...] = ()  # ORed; none: every request
    filters: tuple[HttpRouteFilter, ...] = ()  # applied in order
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: RouteTimeouts | None = None
    retry: RouteRetry | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RouteRule:
        seen: dict[FilterType, int] = {}
        for index, f in enumerate(self.filters):
            if f.type is not FilterType.REQUEST_MIRROR and f.type in seen:
                raise invalid(
                    f"a rule may have one {f.type.value} filter (another is filters"
                    f"[{seen[f.type]}]): merge them",
                    "filters",
                    index,
                    "type",
                )
            seen.setdefault(f.type, index)
        redirect = seen.get(FilterType.REQUEST_REDIRECT)
        if redirect is not None and FilterType.URL_REWRITE in seen:
            raise invalid(
                "a rule cannot both redirect and rewrite (RequestRedirect answers the client; "
                "URLRewrite changes what is sent to backends): keep one",
                "filters",
                seen[FilterType.URL_REWRITE],
                "type",
            )
        if redirect is None and not self.backend_refs:
            raise invalid(
                "list at least one backendRef (or add a RequestRedirect filter)", "backendRefs"
            )
        if redirect is not None and self.backend_refs:
            raise invalid(
                "a rule with a RequestRedirect filter answers the redirect itself and sends "
                "nothing to backends: remove 'backendRefs'",
                "backendRefs",
            )
        for index, f in enumerate(self.filters):
            action = f.url_rewrite or f.request_redirect
            path = action.path if action is not None else None
            if path is not None and path.type is PathModifierType.REPLACE_PREFIX_MATCH:
                kinds = {m.path.type for m in self.matches} or {PathMatchType.PATH_PREFIX}
                if kinds != {PathMatchType.PATH_PREFIX}:
                    raise invalid(
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix "
                        "match (it replaces the matched prefix): use ReplaceFullPath, or "
                        "PathPrefix matches",
                        "filters",
                        index,
                        FILTER_FIELDS[f.type][1],
                        "path",
                        "type",
                    )
        if self.retry is not None and self.retry.per_try_timeout is not None:
            timeouts = self.timeouts
            if timeouts is not None and timeouts.backend_request is not None:
                raise invalid(
                    "set the per-try timeout once: timeouts.backendRequest (Gateway API) or "
                    "retry.perTryTimeout (Istio)",
                    "retry",
                    "perTryTimeout",
                )
            if (
                timeouts is not None
                and timeouts.request
                and (self.retry.per_try_timeout > timeouts.request)
            ):
                raise invalid(
                    f"perTryTimeout ({self.retry.per_try_timeout:g}s) is longer than "
                    f"timeouts.request ({timeouts.request:g}s)",
                    "retry",
                    "perTryTimeout",
                )
        return self

    @property
    def redirect(self) -> RequestRedirect | None:
        for f in self.filters:
            if f.request_redirect is not None:
                return f.request_redirect
        return None


def _some(what: str) -> Callable[[tuple[T, ...]], tuple[T, ...]]:
    def check(items: tuple[T, ...]) -> tuple[T, ...]:
        if not items:
            raise invalid(f"list at least one {what}")
        return items

    return check


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpRoute(Doc):
    """HTTPRoute: L7 routing for requests to the services in ``parentRefs``, applied by
    their waypoint."""

    name: RouteName
    namespace: Namespace
    parent_refs: Annotated[tuple[ParentRef, ...], AfterValidator(_some("parentRef"))]
    rules: Annotated[tuple[RouteRule, ...], AfterValidator(_some("rule"))]

    @model_validator(mode="after")
    def _parents_once(self) -> HttpRoute:
        seen: set[tuple[str, int | None]] = set()
        for index, ref in enumerate(self.parent_refs):
            if (ref.service, ref.port) in seen:
                raise invalid(f"parentRef {ref.service!r} is listed twice", "parentRefs", index)
            seen.add((ref.service, ref.port))
        return self

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class TcpPoolSettings(Doc):
    max_connections: Limit = UNLIMITED


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpPoolSettings(Doc):
    http1_max_pending_requests: Limit = UNLIMITED
    http2_max_requests: Limit = UNLIMITED
    max_requests_per_connection: LimitOrZero = 0  # 0: unlimited
    max_retries: LimitOrZero = UNLIMITED  # retries in flight at once; 0: unlimited (Istio)


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class ConnectionPool(Doc):
    """Circuit-breaker limits (Istio's defaults: no limit); overflow is 503 with flag UO."""

    tcp: TcpPoolSettings = TcpPoolSettings()
    http: HttpPoolSettings = HttpPoolSettings()


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class OutlierDetection(Doc):
    """Ejection of failing endpoints; on only when given (as Istio).  0 errors: that check off."""

    consecutive_5xx_errors: Count = Field(default=5, alias="consecutive5xxErrors")
    consecutive_gateway_errors: Count = 0
    interval: Duration = 10.0
    base_ejection_time: Duration = 30.0  # x the endpoint's number of ejections
    max_ejection_percent: Percent = 10
    min_health_percent: Percent = 0


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class LoadBalancer(Doc):
    simple: LoadBalancerPolicyField = LoadBalancerPolicy.LEAST_REQUEST


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class TrafficPolicyConfig(Doc):
    """DestinationRule-shaped settings for one service (``trafficPolicies:`` section)."""

    name: PolicyName
    namespace: Namespace
    service: ServiceKey
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Config(Doc):
    """The whole document.  ``workloads`` is required: see the loader on empty documents."""

    trust_domain: TrustDomain = DEFAULT_TRUST_DOMAIN
    workloads: tuple[Workload, ...] = Field(
        default=(), json_schema_extra={"description": "required; `[]` for none"}
    )
    services: tuple[Service, ...] = ()
    policies: tuple[Policy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = Field(
        default=(), alias="peerAuthentication"
    )
    waypoints: tuple[WaypointConfig, ...] = ()
    routes: tuple[HttpRoute, ...] = ()
    traffic_policies: tuple[TrafficPolicyConfig, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _inherit_trust_domain(cls, data: Any) -> Any:
        # A workload without its own trustDomain is in the document's.
        if not isinstance(data, dict):
            return data
        td = data.get("trustDomain")
        workloads = data.get("workloads")
        if not isinstance(td, str) or td == DEFAULT_TRUST_DOMAIN or not isinstance(workloads, list):
            return data
        try:
            _trust_domain(td)
        except PydanticCustomError:
            return data  # reported on trustDomain itself
        inherited = [
            {**w, "trustDomain": td} if isinstance(w, dict) and "trustDomain" not in w else w
            for w in workloads
        ]
        return {**data, "workloads": inherited}


# Python construction (tests, tools) may leave "workloads" out; the loader insists on it.
REQUIRED_TOP_LEVEL = ("workloads",)
