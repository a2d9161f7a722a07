from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    LORA: _ClassVar[UpdateKind]
    ZO: _ClassVar[UpdateKind]

class SecAggPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_PHASE_UNSPECIFIED: _ClassVar[SecAggPhase]
    SECAGG_ADVERTISE_KEYS: _ClassVar[SecAggPhase]
    SECAGG_SHARE_KEYS: _ClassVar[SecAggPhase]
    SECAGG_MASKED_INPUT: _ClassVar[SecAggPhase]
    SECAGG_UNMASK: _ClassVar[SecAggPhase]
UPDATE_KIND_UNSPECIFIED: UpdateKind
LORA: UpdateKind
ZO: UpdateKind
SECAGG_PHASE_UNSPECIFIED: SecAggPhase
SECAGG_ADVERTISE_KEYS: SecAggPhase
SECAGG_SHARE_KEYS: SecAggPhase
SECAGG_MASKED_INPUT: SecAggPhase
SECAGG_UNMASK: SecAggPhase

class RegisterRequest(_message.Message):
    __slots__ = ("profile_json", "plan_json", "enrolment_token", "device_name")
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    profile_json: str
    plan_json: str
    enrolment_token: str
    device_name: str
    def __init__(self, profile_json: _Optional[str] = ..., plan_json: _Optional[str] = ..., enrolment_token: _Optional[str] = ..., device_name: _Optional[str] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("local_steps", "lr", "batch_size", "seed", "strategy", "target_modules", "task", "num_labels", "mode", "label_words")
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LABEL_WORDS_FIELD_NUMBER: _ClassVar[int]
    local_steps: int
    lr: float
    batch_size: int
    seed: int
    strategy: str
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    task: str
    num_labels: int
    mode: str
    label_words: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, local_steps: _Optional[int] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., strategy: _Optional[str] = ..., target_modules: _Optional[_Iterable[str]] = ..., task: _Optional[str] = ..., num_labels: _Optional[int] = ..., mode: _Optional[str] = ..., label_words: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("device_id", "device_token", "assigned_rank", "lora_alpha", "use_rslora", "config", "total_rounds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_token: str
    assigned_rank: int
    lora_alpha: float
    use_rslora: bool
    config: TrainingConfig
    total_rounds: int
    def __init__(self, device_id: _Optional[str] = ..., device_token: _Optional[str] = ..., assigned_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ..., total_rounds: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("round_id", "state", "assigned_rank", "local_steps", "lr", "seed", "deadline_unix", "download_id", "download_size", "download_sha256", "nonce", "mode", "retry_after_s", "lora_alpha", "use_rslora", "message", "secagg", "secagg_params", "secagg_payload")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Task.State]
        WAIT: _ClassVar[Task.State]
        TRAIN: _ClassVar[Task.State]
        DONE: _ClassVar[Task.State]
    STATE_UNSPECIFIED: Task.State
    WAIT: Task.State
    TRAIN: Task.State
    DONE: Task.State
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    SECAGG_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SECAGG_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    state: Task.State
    assigned_rank: int
    local_steps: int
    lr: float
    seed: int
    deadline_unix: float
    download_id: str
    download_size: int
    download_sha256: str
    nonce: str
    mode: str
    retry_after_s: float
    lora_alpha: float
    use_rslora: bool
    message: str
    secagg: bool
    secagg_params: bytes
    secagg_payload: bytes
    def __init__(self, round_id: _Optional[int] = ..., state: _Optional[_Union[Task.State, str]] = ..., assigned_rank: _Optional[int] = ..., local_steps: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., download_id: _Optional[str] = ..., download_size: _Optional[int] = ..., download_sha256: _Optional[str] = ..., nonce: _Optional[str] = ..., mode: _Optional[str] = ..., retry_after_s: _Optional[float] = ..., lora_alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., message: _Optional[str] = ..., secagg: _Optional[bool] = ..., secagg_params: _Optional[bytes] = ..., secagg_payload: _Optional[bytes] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round_id", "download_id", "offset")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    download_id: str
    offset: int
    def __init__(self, round_id: _Optional[int] = ..., download_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class TrainStats(_message.Message):
    __slots__ = ("num_examples", "train_loss", "train_time_s", "peak_memory_bytes", "upload_time_s", "download_time_s", "steps", "extra_json")
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TIME_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_TIME_S_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_TIME_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    num_examples: int
    train_loss: float
    train_time_s: float
    peak_memory_bytes: int
    upload_time_s: float
    download_time_s: float
    steps: int
    extra_json: str
    def __init__(self, num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_time_s: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., upload_time_s: _Optional[float] = ..., download_time_s: _Optional[float] = ..., steps: _Optional[int] = ..., extra_json: _Optional[str] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("round_id", "nonce", "total_size", "sha256", "kind", "stats", "upload_id")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    nonce: str
    total_size: int
    sha256: str
    kind: UpdateKind
    stats: TrainStats
    upload_id: str
    def __init__(self, round_id: _Optional[int] = ..., nonce: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., kind: _Optional[_Union[UpdateKind, str]] = ..., stats: _Optional[_Union[TrainStats, _Mapping]] = ..., upload_id: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "received_bytes", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    received_bytes: int
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., received_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("round_id", "upload_id")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    upload_id: str
    def __init__(self, round_id: _Optional[int] = ..., upload_id: _Optional[str] = ...) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("received_offset", "complete")
    RECEIVED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    received_offset: int
    complete: bool
    def __init__(self, received_offset: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id", "available_until_unix", "status")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    available_until_unix: float
    status: str
    def __init__(self, device_id: _Optional[str] = ..., available_until_unix: _Optional[float] = ..., status: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("current_round", "server_time_unix")
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    current_round: int
    server_time_unix: float
    def __init__(self, current_round: _Optional[int] = ..., server_time_unix: _Optional[float] = ...) -> None: ...

class ZoUpdate(_message.Message):
    __slots__ = ("round_id", "nonce", "seeds", "grads", "lr", "num_examples", "stats")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    nonce: str
    seeds: _containers.RepeatedScalarFieldContainer[int]
    grads: _containers.RepeatedScalarFieldContainer[float]
    lr: float
    num_examples: int
    stats: TrainStats
    def __init__(self, round_id: _Optional[int] = ..., nonce: _Optional[str] = ..., seeds: _Optional[_Iterable[int]] = ..., grads: _Optional[_Iterable[float]] = ..., lr: _Optional[float] = ..., num_examples: _Optional[int] = ..., stats: _Optional[_Union[TrainStats, _Mapping]] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("round_id", "nonce", "phase", "payload", "offset", "total_bytes")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    nonce: str
    phase: SecAggPhase
    payload: bytes
    offset: int
    total_bytes: int
    def __init__(self, round_id: _Optional[int] = ..., nonce: _Optional[str] = ..., phase: _Optional[_Union[SecAggPhase, str]] = ..., payload: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("phase", "payload", "wait", "retry_after_s", "message", "received_bytes")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    phase: SecAggPhase
    payload: bytes
    wait: bool
    retry_after_s: float
    message: str
    received_bytes: int
    def __init__(self, phase: _Optional[_Union[SecAggPhase, str]] = ..., payload: _Optional[bytes] = ..., wait: _Optional[bool] = ..., retry_after_s: _Optional[float] = ..., message: _Optional[str] = ..., received_bytes: _Optional[int] = ...) -> None: ...
