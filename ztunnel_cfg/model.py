"""The config documents, declared once: frozen pydantic models with camelCase aliases.

These classes are the schema (the loader validates documents against them, ``dump`` and the
JSON Schema come from them) and the objects the data path reads: fields are plain attributes,
validation runs once per (re)load, never per connection.  Shapes follow ztunnel's local
config file (DESIGN §6).  Leaf values have their own validators so every message says what
is wrong in the user's terms; the loader maps each error to file:line:column and key path.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
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


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"expected a number of seconds, got {describe(value)}")
    if not 0 < value < 86400 * 365:
        raise invalid(f"{value} is not a positive number of seconds")
    return float(value)


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
Seconds = Annotated[
    float,
    PlainValidator(_seconds),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 86400 * 365}),
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
    if not isinstance(value, str):
        raise invalid(f"expected a string, got {describe(value)}")
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
Headers = Annotated[
    tuple[
        tuple[
            Annotated[str, PlainValidator(_header_name)],
            Annotated[str, PlainValidator(_header_value)],
        ],
        ...,
    ],
    BeforeValidator(_pairs),
    PlainSerializer(_as_dict),
    _map_schema({"pattern": _HEADER_NAME.pattern}, {"type": "string"}),
]
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

    @classmethod
    def _shape_hint(cls) -> str:
        return f" ({RULES_SHAPE})"


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


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Policy(_Selecting):
    name: PolicyName
    namespace: Namespace
    scope: ScopeField
    action: ActionField
    rules: tuple[Rule, ...] = ()

    @model_validator(mode="after")
    def _selector_needs_scope(self) -> Policy:
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


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RouteMatch(Doc):
    """Match on an HTTP request; every set field must hold."""

    path_prefix: HttpPath | None = None
    path_exact: HttpPath | None = Field(default=None, alias="path")
    method: HttpMethod | None = None
    headers: Headers = ()

    @model_validator(mode="after")
    def _one_path(self) -> RouteMatch:
        if self.path_prefix is not None and self.path_exact is not None:
            raise invalid("use either 'pathPrefix' or 'path', not both")
        return self


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class Backend(Doc):
    service: ServiceKey  # "ns/hostname"
    port: Port
    weight: Weight = 1


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RouteRetries(Doc):
    attempts: Attempts
    per_try_timeout: Seconds | None = None  # seconds


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class RouteRule(Doc):
    matches: tuple[RouteMatch, ...] = ()  # empty: every request
    backends: tuple[Backend, ...]
    timeout: Seconds | None = None  # seconds
    retries: RouteRetries | None = None

    @field_validator("backends")
    @classmethod
    def _some_backend(cls, backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
        if not backends:
            raise invalid("must list at least one backend")
        return backends


@document(frozen=True, slots=True, kw_only=True, config=_DOCUMENT)
class HttpRoute(Doc):
    """L7 routing for requests to ``parent`` (a service key), applied by its waypoint."""

    name: RouteName
    namespace: Namespace
    parent: ServiceKey
    rules: tuple[RouteRule, ...] = ()

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
