from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VipId(_message.Message):
    __slots__ = ("address", "port", "protocol")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    protocol: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("address", "weight", "effective_weight", "health", "last_result", "latency_seconds", "since", "packets", "bytes", "new_flows")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    NEW_FLOWS_FIELD_NUMBER: _ClassVar[int]
    address: str
    weight: int
    effective_weight: int
    health: str
    last_result: str
    latency_seconds: float
    since: float
    packets: int
    bytes: int
    new_flows: int
    def __init__(self, address: _Optional[str] = ..., weight: _Optional[int] = ..., effective_weight: _Optional[int] = ..., health: _Optional[str] = ..., last_result: _Optional[str] = ..., latency_seconds: _Optional[float] = ..., since: _Optional[float] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., new_flows: _Optional[int] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("kind", "port", "interval", "timeout", "rise", "fall", "path", "host", "expect", "via", "min_healthy")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    FALL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    MIN_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    port: int
    interval: float
    timeout: float
    rise: int
    fall: int
    path: str
    host: str
    expect: _containers.RepeatedScalarFieldContainer[int]
    via: str
    min_healthy: int
    def __init__(self, kind: _Optional[str] = ..., port: _Optional[int] = ..., interval: _Optional[float] = ..., timeout: _Optional[float] = ..., rise: _Optional[int] = ..., fall: _Optional[int] = ..., path: _Optional[str] = ..., host: _Optional[str] = ..., expect: _Optional[_Iterable[int]] = ..., via: _Optional[str] = ..., min_healthy: _Optional[int] = ...) -> None: ...

class Vip(_message.Message):
    __slots__ = ("id", "flags", "backends", "vip_id", "packets", "bytes", "health", "panic", "new_flows", "encap")
    ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    VIP_ID_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PANIC_FIELD_NUMBER: _ClassVar[int]
    NEW_FLOWS_FIELD_NUMBER: _ClassVar[int]
    ENCAP_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    flags: _containers.RepeatedScalarFieldContainer[str]
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    vip_id: int
    packets: int
    bytes: int
    health: HealthCheck
    panic: bool
    new_flows: int
    encap: str
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., flags: _Optional[_Iterable[str]] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., vip_id: _Optional[int] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., health: _Optional[_Union[HealthCheck, _Mapping]] = ..., panic: _Optional[bool] = ..., new_flows: _Optional[int] = ..., encap: _Optional[str] = ...) -> None: ...

class SetHealthCheckRequest(_message.Message):
    __slots__ = ("id", "health")
    ID_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    health: HealthCheck
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., health: _Optional[_Union[HealthCheck, _Mapping]] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("config_yaml", "dry_run")
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    config_yaml: str
    dry_run: bool
    def __init__(self, config_yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, changes: _Optional[_Iterable[str]] = ...) -> None: ...

class AddVipRequest(_message.Message):
    __slots__ = ("id", "flags", "backends", "encap")
    ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    ENCAP_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    flags: _containers.RepeatedScalarFieldContainer[str]
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    encap: str
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., flags: _Optional[_Iterable[str]] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., encap: _Optional[str] = ...) -> None: ...

class DeleteVipRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ...) -> None: ...

class DeleteVipResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVipsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVipsResponse(_message.Message):
    __slots__ = ("vips",)
    VIPS_FIELD_NUMBER: _ClassVar[int]
    vips: _containers.RepeatedCompositeFieldContainer[Vip]
    def __init__(self, vips: _Optional[_Iterable[_Union[Vip, _Mapping]]] = ...) -> None: ...

class GetVipRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ...) -> None: ...

class ModifyVipRequest(_message.Message):
    __slots__ = ("id", "flags", "encap")
    ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ENCAP_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    flags: _containers.RepeatedScalarFieldContainer[str]
    encap: str
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., flags: _Optional[_Iterable[str]] = ..., encap: _Optional[str] = ...) -> None: ...

class AddBackendsRequest(_message.Message):
    __slots__ = ("id", "backends")
    ID_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ...) -> None: ...

class RemoveBackendsRequest(_message.Message):
    __slots__ = ("id", "addresses")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class SetBackendWeightsRequest(_message.Message):
    __slots__ = ("id", "backends")
    ID_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ...) -> None: ...

class VipStats(_message.Message):
    __slots__ = ("id", "packets", "bytes", "new_flows", "backends")
    ID_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    NEW_FLOWS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    packets: int
    bytes: int
    new_flows: int
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ..., new_flows: _Optional[int] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("counters", "vips", "timestamp")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, int]
    vips: _containers.RepeatedCompositeFieldContainer[VipStats]
    timestamp: float
    def __init__(self, counters: _Optional[_Mapping[str, int]] = ..., vips: _Optional[_Iterable[_Union[VipStats, _Mapping]]] = ..., timestamp: _Optional[float] = ...) -> None: ...

class WatchStatsRequest(_message.Message):
    __slots__ = ("id", "interval_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    interval_seconds: float
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class Gateway(_message.Message):
    __slots__ = ("mac", "ip")
    MAC_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    mac: str
    ip: str
    def __init__(self, mac: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class SetGatewayRequest(_message.Message):
    __slots__ = ("mac", "ip")
    MAC_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    mac: str
    ip: str
    def __init__(self, mac: _Optional[str] = ..., ip: _Optional[str] = ...) -> None: ...

class GetGatewayRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("max_vips", "max_backends", "conntrack_entries", "ring_size", "kernel_bytes")
    MAX_VIPS_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    CONNTRACK_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    RING_SIZE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_vips: int
    max_backends: int
    conntrack_entries: int
    ring_size: int
    kernel_bytes: int
    def __init__(self, max_vips: _Optional[int] = ..., max_backends: _Optional[int] = ..., conntrack_entries: _Optional[int] = ..., ring_size: _Optional[int] = ..., kernel_bytes: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Status(_message.Message):
    __slots__ = ("interface", "attach_mode", "program_id", "vips", "backends", "uptime_seconds", "capacity", "conntrack_used", "announce_table", "drained", "announced", "digests", "panic", "next_hop", "interfaces")
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    ATTACH_MODE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_ID_FIELD_NUMBER: _ClassVar[int]
    VIPS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CONNTRACK_USED_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCE_TABLE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    PANIC_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interface: str
    attach_mode: str
    program_id: int
    vips: int
    backends: int
    uptime_seconds: float
    capacity: Capacity
    conntrack_used: int
    announce_table: int
    drained: bool
    announced: _containers.RepeatedScalarFieldContainer[str]
    digests: _containers.RepeatedCompositeFieldContainer[VipDigest]
    panic: _containers.RepeatedScalarFieldContainer[str]
    next_hop: str
    interfaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, interface: _Optional[str] = ..., attach_mode: _Optional[str] = ..., program_id: _Optional[int] = ..., vips: _Optional[int] = ..., backends: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., conntrack_used: _Optional[int] = ..., announce_table: _Optional[int] = ..., drained: _Optional[bool] = ..., announced: _Optional[_Iterable[str]] = ..., digests: _Optional[_Iterable[_Union[VipDigest, _Mapping]]] = ..., panic: _Optional[_Iterable[str]] = ..., next_hop: _Optional[str] = ..., interfaces: _Optional[_Iterable[str]] = ...) -> None: ...

class VipDigest(_message.Message):
    __slots__ = ("id", "ring", "backends")
    ID_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    ring: str
    backends: str
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., ring: _Optional[str] = ..., backends: _Optional[str] = ...) -> None: ...

class LookupFlowRequest(_message.Message):
    __slots__ = ("src", "dst", "sport", "dport", "protocol")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    SPORT_FIELD_NUMBER: _ClassVar[int]
    DPORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    sport: int
    dport: int
    protocol: str
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., sport: _Optional[int] = ..., dport: _Optional[int] = ..., protocol: _Optional[str] = ...) -> None: ...

class LookupFlowResponse(_message.Message):
    __slots__ = ("verdict", "backend", "from_conntrack", "vip", "hashed_on")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FROM_CONNTRACK_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    HASHED_ON_FIELD_NUMBER: _ClassVar[int]
    verdict: str
    backend: str
    from_conntrack: bool
    vip: str
    hashed_on: str
    def __init__(self, verdict: _Optional[str] = ..., backend: _Optional[str] = ..., from_conntrack: _Optional[bool] = ..., vip: _Optional[str] = ..., hashed_on: _Optional[str] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("src", "dst", "sport", "dport", "protocol", "backend", "stale")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    SPORT_FIELD_NUMBER: _ClassVar[int]
    DPORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    sport: int
    dport: int
    protocol: str
    backend: str
    stale: bool
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., sport: _Optional[int] = ..., dport: _Optional[int] = ..., protocol: _Optional[str] = ..., backend: _Optional[str] = ..., stale: _Optional[bool] = ...) -> None: ...

class ListFlowsRequest(_message.Message):
    __slots__ = ("id", "limit")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    limit: int
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListFlowsResponse(_message.Message):
    __slots__ = ("flows", "total")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[Flow]
    total: int
    def __init__(self, flows: _Optional[_Iterable[_Union[Flow, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class FlushFlowsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ...) -> None: ...

class FlushFlowsResponse(_message.Message):
    __slots__ = ("flushed",)
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    flushed: int
    def __init__(self, flushed: _Optional[int] = ...) -> None: ...

class WatchHealthRequest(_message.Message):
    __slots__ = ("id", "snapshot")
    ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    snapshot: bool
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class HealthEvent(_message.Message):
    __slots__ = ("id", "backend", "old_state", "new_state", "reason", "time", "panic", "snapshot")
    ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    OLD_STATE_FIELD_NUMBER: _ClassVar[int]
    NEW_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PANIC_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    id: VipId
    backend: str
    old_state: str
    new_state: str
    reason: str
    time: float
    panic: bool
    snapshot: bool
    def __init__(self, id: _Optional[_Union[VipId, _Mapping]] = ..., backend: _Optional[str] = ..., old_state: _Optional[str] = ..., new_state: _Optional[str] = ..., reason: _Optional[str] = ..., time: _Optional[float] = ..., panic: _Optional[bool] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class SetDrainRequest(_message.Message):
    __slots__ = ("drained",)
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    def __init__(self, drained: _Optional[bool] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("announce_table", "drained", "announced")
    ANNOUNCE_TABLE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    announce_table: int
    drained: bool
    announced: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, announce_table: _Optional[int] = ..., drained: _Optional[bool] = ..., announced: _Optional[_Iterable[str]] = ...) -> None: ...

class CaptureRequest(_message.Message):
    __slots__ = ("vip", "backend", "verdicts", "count", "duration_seconds", "snaplen")
    VIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SNAPLEN_FIELD_NUMBER: _ClassVar[int]
    vip: VipId
    backend: str
    verdicts: _containers.RepeatedScalarFieldContainer[str]
    count: int
    duration_seconds: float
    snaplen: int
    def __init__(self, vip: _Optional[_Union[VipId, _Mapping]] = ..., backend: _Optional[str] = ..., verdicts: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., snaplen: _Optional[int] = ...) -> None: ...

class CapturedPacket(_message.Message):
    __slots__ = ("timestamp_ns", "sent", "verdict", "vip", "backend", "length", "data", "cpu", "seq", "lost", "end", "packets")
    TIMESTAMP_NS_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    timestamp_ns: int
    sent: bool
    verdict: str
    vip: VipId
    backend: str
    length: int
    data: bytes
    cpu: int
    seq: int
    lost: int
    end: bool
    packets: int
    def __init__(self, timestamp_ns: _Optional[int] = ..., sent: _Optional[bool] = ..., verdict: _Optional[str] = ..., vip: _Optional[_Union[VipId, _Mapping]] = ..., backend: _Optional[str] = ..., length: _Optional[int] = ..., data: _Optional[bytes] = ..., cpu: _Optional[int] = ..., seq: _Optional[int] = ..., lost: _Optional[int] = ..., end: _Optional[bool] = ..., packets: _Optional[int] = ...) -> None: ...
